"""``lowrank-deploy``: the whole chain as one command, with every option validated before anything is written.

``lowrank-deploy export --model resnet34 [--method tucker2] [--ratio 4 | --flops 0.5] ...`` runs
``compress run`` → ``export onnx`` → ``runtime bench`` → ``runtime report`` into ``OUT/<model>/<method>``,
in this process, holding the run directory's lock (:func:`lowrank_core.integrity.run_lock`).
``train``, ``finetune`` and ``engine`` wrap ``python -m compress train|finetune`` and
``python -m export engine`` the same way.

Every option may also come from the environment as ``LRD_<NAME>`` (``LRD_MODEL``, ``LRD_RATIO``,
``LRD_COMPRESS_ARGS``, ...): the Makefile exports its variables that way, so a value reaches Python as
one string and never passes through a shell. A flag on the command line wins over the environment; an
empty value counts as not given. ``--compress-args``/``--train-args``/``--engine-args`` are split with
:func:`shlex.split` (quotes group, nothing is executed).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lowrank_core.checks import MAX_BATCH, check_count, check_duration, check_memory, check_path_length
from lowrank_core.cli import ArgumentParser
from lowrank_core.errors import UserInputError
from lowrank_core.integrity import STAGE_OUTPUTS, clear_downstream, run_lock
from lowrank_core.io import before_first_write
from lowrank_core.progress import heartbeat

__all__ = ["PROG", "Stage", "build_parser", "commands", "plan_export", "resolve", "run_dir_of", "run_stages"]

PROG = "lowrank-deploy"
ENV_PREFIX = "LRD_"
PRECISIONS = ("fp32", "fp16", "int8")
MAX_INPUT_SIZE = 8192
"""Largest accepted INPUT_SIZE (pixels per side)."""

# (flag, Makefile variable, default, help); every flag is also read from LRD_<VARIABLE>.
_EXPORT_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--model", "MODEL", "resnet34", "zoo/torchvision name, timm:<name> or path/to/file.py:function"),
    ("--method", "METHOD", "tucker2", "compression method (python -m compress methods)"),
    ("--ratio", "RATIO", None, "parameter compression factor of the whole model (> 1)"),
    ("--flops", "FLOPS", None, "fraction of the FLOPs to remove, in (0, 1)"),
    ("--speedup", "SPEEDUP", None, "measured speedup target (> 1)"),
    ("--latency-ms", "LATENCY_MS", None, "measured p50 latency target in ms"),
    ("--weights", "WEIGHTS", "auto", "auto | imagenet | random | path to a weights file"),
    ("--batch", "BATCH", "1", "batch size of export and timing"),
    (
        "--input-size",
        "INPUT_SIZE",
        None,
        "square input size of compress, export and timing (default: the model's, e.g. 224; 520 for segmentation)",
    ),
    ("--out", "OUT", "artifacts", "output folder; the run directory is OUT/<model>/<method>"),
    ("--backend", "BACKEND", "ort", "runtime backend (ort, torch, trt, ...)"),
    ("--duration", "DURATION", "10", "benchmark budget in seconds (finite, > 0)"),
    ("--threads", "THREADS", None, "intra-op threads of the benchmark"),
    ("--round-to", "ROUND_TO", None, "round ranks to a multiple of N"),
    ("--rank-rule", "RANK_RULE", None, "uniform | param-reduction | evbmf | energy"),
    ("--expansion", "EXPANSION", None, "vbmf-tucker2: ExpandNets rate"),
    ("--orthogonality", "ORTHO", None, "vbmf-tucker2: so | srip | none"),
    ("--stages", "STAGES", None, "vbmf-tucker2: MUSCO stages"),
    ("--data", "DATA", None, "fashion-mnist or a dataset folder"),
    ("--train-epochs", "TRAIN_EPOCHS", "0", "with --data: train the dense model first"),
    ("--finetune-epochs", "FINETUNE_EPOCHS", "0", "with --data: fine-tune the compressed model"),
    ("--eval-samples", "EVAL_SAMPLES", None, "with --data: evaluate on N test images"),
    (
        "--precision",
        "PRECISION",
        None,
        "export: fp32 (default) | int8 | fp16 adds `export quantize` before bench; engine: fp16 (default) | fp32 | int8",
    ),
    ("--dynamic-batch", "DYNAMIC_BATCH", None, "1: export a dynamic batch axis (for engine --max-batch)"),
    ("--compress-args", "COMPRESS_ARGS", None, "extra flags of `python -m compress run`, one string"),
)
_TRAIN_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--epochs", "EPOCHS", "3", "training epochs"),
    ("--nproc", "NPROC", "1", "processes (torchrun DDP when > 1)"),
    ("--train-args", "TRAIN_ARGS", None, "extra flags of `python -m compress train|finetune`, one string"),
    ("--engine-args", "ENGINE_ARGS", None, "extra flags of `python -m export engine`, one string"),
    ("--methods", "METHODS", None, 'compare: the methods to run at one target, e.g. "tucker2 tai auto cc"'),
)
_OPTIONS = _EXPORT_OPTIONS + _TRAIN_OPTIONS


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lowrank-deploy`` (every option string-typed: :func:`plan_export` validates them)."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "export": "compress → export ONNX → benchmark → report, into OUT/<model>/<method>",
        "train": "train the dense model on --data into OUT/<model>/train-<data>",
        "finetune": "fine-tune the compressed model of a run directory on --data",
        "engine": "build TensorRT engines from the run directory's ONNX files",
        "compare": "run several METHODS at one target into OUT/<model>/<method>, time all in one run: "
        "OUT/<model>/compare.json|md|png",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        for flag, var, default, help_text in _OPTIONS:
            shown = f" (default {default})" if default is not None else ""
            p.add_argument(flag, default=None, help=f"{help_text}{shown}; env {ENV_PREFIX}{var}")
    return parser


def resolve(args: argparse.Namespace, environ: os._Environ[str] | dict[str, str]) -> dict[str, str | None]:
    """Each option: the flag, else ``LRD_<VAR>`` from the environment, else the default ('' = not given)."""
    values: dict[str, str | None] = {}
    for flag, var, default, _ in _OPTIONS:
        value = getattr(args, _dest(flag), None)
        if value is None:
            value = environ.get(ENV_PREFIX + var)
        values[_dest(flag)] = default if value is None or value.strip() == "" else value
    return values


# Validation -------------------------------------------------------------------------------------------


def _no_controls(value: str, name: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserInputError(f"{name} must not contain control characters, got {value!r}")
    return value


def model_name_of(spec: str) -> str:
    """The run directory's model folder: the spec, or ``file.fn`` for a factory ``path/file.py:fn``."""
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        file_part, fn = spec.split(":", 1)
        return f"{Path(file_part).stem}.{fn}"
    if spec.lower().endswith(".onnx"):  # MODEL=path/to/foo.onnx → OUT/foo/<method>
        return Path(spec).stem
    return spec


def run_dir_of(out: str, model: str, method: str) -> Path:
    """``OUT/<model>/<method>`` as the Makefile has always named it."""
    return Path(out) / model_name_of(model) / method


def check_model_spec(spec: str) -> str:
    """Refuse a model spec that no loader accepts (checked without building the model)."""
    _no_controls(spec, "MODEL")
    if spec.lower().endswith(".onnx"):
        if not Path(spec).is_file():
            raise UserInputError(f"MODEL ONNX file {spec!r} does not exist; use MODEL=path/to/model.onnx")
        return spec
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        file_part, fn = spec.split(":", 1)
        if not Path(file_part).is_file():
            raise UserInputError(f"MODEL factory file {file_part!r} does not exist; use MODEL=path/to/file.py:function")
        if not fn.isidentifier():
            raise UserInputError(f"MODEL {spec!r}: {fn!r} is not a Python function name; use path/to/file.py:function")
        return spec
    if spec.startswith("timm:"):
        if not re.fullmatch(r"timm:[A-Za-z0-9_.\-]+", spec):
            raise UserInputError(f"MODEL {spec!r} is not a timm model name (timm:<name>)")
        return spec
    from compress.models import list_models
    from compress.zoo import is_zoo_spec, parse_zoo_name

    if is_zoo_spec(spec):
        parse_zoo_name(spec)
        return spec
    if spec not in list_models():
        import difflib

        close = difflib.get_close_matches(spec, list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserInputError(
            f"unknown MODEL {spec!r}{hint}; use a zoo or torchvision name (python -m compress models), "
            "timm:<name> or path/to/file.py:function"
        )
    return spec


def check_out_writable(out: str) -> Path:
    """OUT (or its nearest existing ancestor) must be a writable folder; nothing is created."""
    _no_controls(out, "OUT")
    if not out:
        raise UserInputError("OUT must name a folder, got ''")
    check_path_length(out, "OUT")
    path = Path(out)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserInputError(f"OUT {out!r} is not a folder ({str(probe)!r} is a file); choose another OUT")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"OUT {out!r} is not writable ({str(probe)!r}); choose another OUT")
    return path


def _split(text: str | None, name: str) -> list[str]:
    if not text:
        return []
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserInputError(f"{name} {text!r} cannot be split into arguments ({exc})") from None


def _flag(values: dict[str, str | None], flag: str) -> list[str]:
    value = values[_dest(flag)]
    return [] if value is None else [flag, value]


@dataclass
class Stage:
    """One step of the chain: a name and the argument list of its ``python -m`` command."""

    name: str
    module: str
    argv: list[str]
    run: Callable[[Sequence[str]], int] = field(repr=False)

    def command(self) -> str:
        """The equivalent shell command (quoted), for the log."""
        return shlex.join(["python", "-m", self.module, *self.argv])


def _parse_stage(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a stage's arguments now (its parser prints one line and exits 2 on an error)."""
    return parser.parse_args(argv)


def _refuse_data_options(train_epochs: int, finetune_epochs: int, eval_samples: str | None) -> None:
    """TRAIN_EPOCHS, FINETUNE_EPOCHS and EVAL_SAMPLES act on DATA: without it they are refused, not ignored."""
    given = [f"{var}={n}" for var, n in (("TRAIN_EPOCHS", train_epochs), ("FINETUNE_EPOCHS", finetune_epochs)) if n]
    given += [] if eval_samples is None else [f"EVAL_SAMPLES={eval_samples}"]
    if given:
        names = " and ".join(g.split("=")[0] for g in given)
        raise UserInputError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} DATA (training, fine-tuning and evaluation run on a dataset); "
            f"give DATA=fashion-mnist or DATA=<folder>, or leave {names} out"
        )


def _check_int8_backend(precision: str, name: str, backend: type) -> None:
    """PRECISION=int8 adds ONNX Runtime INT8 files that only the ``ort`` runner times: refuse another backend."""
    from runtime.ort_runner import OrtRunner

    if precision == "int8" and not issubclass(backend, OrtRunner):
        raise UserInputError(
            f"PRECISION=int8 is timed with BACKEND=ort (ONNX Runtime runs the INT8 files), not BACKEND={name}; "
            "use BACKEND=ort, or PRECISION=fp32 with BACKEND=" + name + " (TensorRT INT8: make engine PRECISION=int8)"
        )


def plan_export(values: dict[str, str | None]) -> tuple[Path, list[Stage]]:
    """Validate every option of ``export`` and return the run directory and the four stages.

    Raises:
        UserInputError: the first invalid option (one line naming it); argument errors of a stage's own
            parser exit with status 2 and one line.
    """
    from compress.cli import build_parser as compress_parser
    from compress.cli import main as compress_main
    from compress.cli.options import config_from_args, target_from_args
    from export.__main__ import build_parser as export_parser
    from export.__main__ import main as export_main
    from runtime.__main__ import build_parser as runtime_parser
    from runtime.__main__ import main as runtime_main

    model = check_model_spec(values["model"] or "")
    method = _no_controls(values["method"] or "", "METHOD")
    from compress.methods import get_method

    get_method(method)
    if model.lower().endswith(".onnx"):  # compress.onnx_in: refuse what needs the PyTorch model, in one line
        from compress.onnx_in.run import check_onnx_export

        check_onnx_export(values)
    batch = check_count(values["batch"], "BATCH", high=MAX_BATCH)
    input_size = None
    if values["input_size"] is not None:
        input_size = check_count(values["input_size"], "INPUT_SIZE", high=MAX_INPUT_SIZE)
    duration = check_duration(values["duration"], "DURATION")
    if values["threads"] is not None:
        check_count(values["threads"], "THREADS", high=4096)
    from runtime.base import runner_class

    backend = runner_class(values["backend"] or "")
    precision = values["precision"] or "fp32"
    if precision not in PRECISIONS:
        raise UserInputError(f"PRECISION must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _check_int8_backend(precision, values["backend"] or "", backend)
    weights = _no_controls(values["weights"] or "", "WEIGHTS")
    if weights not in ("auto", "imagenet", "random") and not Path(weights).is_file():
        raise UserInputError(f"WEIGHTS {weights!r} is not auto, imagenet, random or an existing file")
    data = values["data"]
    if data is not None:
        _no_controls(data, "DATA")
        if data != "fashion-mnist" and not Path(data).is_dir():
            raise UserInputError(f"DATA {data!r} is not fashion-mnist or an existing folder")
        from compress.task_models import check_data_supported

        check_data_supported(model, data)
    train_epochs = check_count(values["train_epochs"], "TRAIN_EPOCHS", low=0, high=100_000)
    finetune_epochs = check_count(values["finetune_epochs"], "FINETUNE_EPOCHS", low=0, high=100_000)
    if values["eval_samples"] is not None:
        check_count(values["eval_samples"], "EVAL_SAMPLES", high=10**9)
    if data is None:
        _refuse_data_options(train_epochs, finetune_epochs, values["eval_samples"])
    dynamic = values["dynamic_batch"] not in (None, "0", "no", "false")
    if values["dynamic_batch"] not in (None, "0", "1", "no", "yes", "false", "true"):
        raise UserInputError(f"DYNAMIC_BATCH must be 0 or 1, got {values['dynamic_batch']!r}")
    out = check_out_writable(values["out"] or "")
    run_dir = run_dir_of(str(out), model, method)
    check_path_length(run_dir, "the run directory OUT/<model>/<method>")

    c_argv = ["run", "--model", model, "--method", method]
    for flag in ("--ratio", "--flops", "--speedup", "--latency-ms"):
        c_argv += _flag(values, flag)
    c_argv += ["--weights", weights, "--batch", str(batch), "--run-dir", str(run_dir)]
    c_argv += [] if input_size is None else ["--input-size", str(input_size)]
    for flag in ("--round-to", "--rank-rule", "--expansion", "--orthogonality", "--stages"):
        c_argv += _flag(values, flag)
    if data is not None:
        c_argv += ["--data", data, "--train-epochs", str(train_epochs), "--finetune-epochs", str(finetune_epochs)]
        c_argv += _flag(values, "--eval-samples")
    if values["threads"] is not None and (values["speedup"] is not None or values["latency_ms"] is not None):
        c_argv += ["--latency-threads", values["threads"]]  # predict and check at the threads the bench uses
    if precision == "int8" and (values["speedup"] is not None or values["latency_ms"] is not None):
        c_argv += ["--latency-precision", "int8"]  # plan ranks with int8 block latencies, not float ones
    c_argv += _split(values["compress_args"], "COMPRESS_ARGS")
    c_args = _parse_stage(compress_parser(), c_argv)
    target_from_args(c_args)  # one of RATIO/FLOPS/SPEEDUP/LATENCY_MS (the run parser has all four)
    config_from_args(c_args)  # method, target and method options, as the compress stage will check them
    size = c_args.input_size or 224
    channels = 1 if data == "fashion-mnist" else 3
    check_memory((max(8, batch), channels, size, size), f"the input of {model}")

    e_argv = ["onnx", "--run-dir", str(run_dir), "--batch", str(batch)] + (["--dynamic-batch"] if dynamic else [])
    _parse_stage(export_parser(), e_argv)
    b_argv = ["bench", "--run-dir", str(run_dir), "--backend", values["backend"] or "", "--batch", str(batch)]
    b_argv += ["--duration", repr(duration) if not math.isinf(duration) else "inf", *_flag(values, "--threads")]
    _parse_stage(runtime_parser(), b_argv)
    q_argv = ["quantize", "--run-dir", str(run_dir), "--precision", precision, *_flag(values, "--threads")]
    q_argv += ["--data", data, *_flag(values, "--eval-samples")] if data is not None else []
    stages = [
        Stage("compress", "compress", c_argv, compress_main),
        Stage("export", "export", e_argv, export_main),
        *([Stage("quantize", "export", q_argv, export_main)] if precision != "fp32" else []),
        Stage("bench", "runtime", b_argv, runtime_main),
        Stage("report", "runtime", ["report", "--run-dir", str(run_dir)], runtime_main),
    ]
    return run_dir, stages


# Running ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _owned_run_dir(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` (locked) for the block; on failure remove the folders this call created if empty."""
    created = []
    probe = run_dir
    while not probe.exists():
        created.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    ok = False
    try:
        with run_lock(run_dir, create=True):
            yield
        ok = True
    finally:
        if not ok:
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _clearing_downstream(run_dir: Path, stage: str) -> contextlib.AbstractContextManager[None]:
    """Once ``stage`` has put its first file in ``run_dir``, remove the files of the stages made from its files."""
    if stage not in STAGE_OUTPUTS:
        return contextlib.nullcontext()

    def clear(first: Path) -> None:
        clear_downstream(run_dir, stage, keep=(first.name,))

    return before_first_write(run_dir, clear)


def run_stages(run_dir: Path, stages: list[Stage]) -> int:
    """Run ``stages`` in order inside ``run_dir`` (created and locked); a failing stage raises UserInputError.

    As soon as a stage has put its first file in place, the files of every later stage are removed
    (:func:`lowrank_core.integrity.clear_downstream`): a run killed mid-way leaves no report or latency of an
    earlier run beside its new plan, and a stage that refuses its input (or finds the disk full) leaves the
    run directory untouched.
    """
    with _owned_run_dir(run_dir):
        for i, stage in enumerate(stages, 1):
            print(f"[{i}/{len(stages)}] {stage.name}: {stage.command()}", flush=True)
            # A stage that writes its own progress lines silences this beat; any other still says it runs.
            with _clearing_downstream(run_dir, stage.name), heartbeat(f"[{i}/{len(stages)}] {stage.name}"):
                code = stage.run(stage.argv)
            if code:
                raise UserInputError(f"stage {stage.name} failed with exit code {code}")
    return 0


def _train_dir(values: dict[str, str | None]) -> Path:
    data = values["data"] or ""
    name = "fashion-mnist" if data == "fashion-mnist" else Path(data).resolve().name  # DATA=. or ../x/ too
    return Path(values["out"] or "") / model_name_of(values["model"] or "") / f"train-{name}"


def _need_data(values: dict[str, str | None], command: str) -> str:
    data = values["data"]
    if not data:
        raise UserInputError(f"{command} needs DATA=fashion-mnist or DATA=<folder>")
    _no_controls(data, "DATA")
    if data != "fashion-mnist" and not Path(data).is_dir():
        raise UserInputError(f"DATA {data!r} is not fashion-mnist or an existing folder")
    return data


def _launch(values: dict[str, str | None], argv: list[str]) -> int:
    """``python -m compress ARGV`` in this process, or under torchrun with NPROC > 1 (an argument list, no shell)."""
    from compress.cli import main as compress_main

    nproc = check_count(values["nproc"], "NPROC", high=1024)
    print(shlex.join(["python", "-m", "compress", *argv]), flush=True)
    if nproc == 1:
        return compress_main(argv)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), "-m", "compress", *argv]
    return subprocess.run(cmd, check=False).returncode


def _train(values: dict[str, str | None]) -> int:
    from compress.cli import build_parser as compress_parser

    data = _need_data(values, "train")
    model = check_model_spec(values["model"] or "")
    epochs = check_count(values["epochs"], "EPOCHS", low=0, high=100_000)
    check_out_writable(values["out"] or "")
    folder = _train_dir(values)
    argv = ["train", "--model", model, "--weights", values["weights"] or "auto", "--data", data]
    argv += ["--epochs", str(epochs), "--out", str(folder), *_flag(values, "--eval-samples")]
    argv += _split(values["train_args"], "TRAIN_ARGS")
    _parse_stage(compress_parser(), argv)
    code = _launch(values, argv)
    if code == 0:
        print(f"weights: {folder / 'model.safetensors'}")
    return code


def _finetune(values: dict[str, str | None]) -> int:
    from compress.cli import build_parser as compress_parser

    data = _need_data(values, "finetune")
    run_dir = run_dir_of(values["out"] or "", values["model"] or "", values["method"] or "")
    epochs = check_count(values["finetune_epochs"], "FINETUNE_EPOCHS", low=0, high=100_000) or 1
    argv = ["finetune", "--run-dir", str(run_dir), "--data", data, "--epochs", str(epochs)]
    argv += _flag(values, "--eval-samples") + _split(values["train_args"], "TRAIN_ARGS")
    _parse_stage(compress_parser(), argv)
    return _launch(values, argv)


def _engine(values: dict[str, str | None]) -> int:
    from export.__main__ import build_parser as export_parser
    from export.__main__ import main as export_main

    run_dir = run_dir_of(values["out"] or "", values["model"] or "", values["method"] or "")
    if not (run_dir / "model.onnx").is_file():
        raise UserInputError(
            f"{run_dir / 'model.onnx'} is missing; run `make export MODEL={values['model']} METHOD={values['method']}` first"
        )
    precision = values["precision"] or "fp16"
    if precision not in PRECISIONS:
        raise UserInputError(f"PRECISION must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":  # TensorRT builds INT8 from symmetric Q/DQ: model.int8.trt.onnx (export.quantize)
        q_argv = ["quantize", "--run-dir", str(run_dir), "--precision", "int8", "--target", "tensorrt"]
        q_argv += ["--data", values["data"], *_flag(values, "--eval-samples")] if values["data"] else []
        print(shlex.join(["python", "-m", "export", *q_argv]), flush=True)
        if export_main(q_argv) != 0:
            return 1
    argv = ["engine", "--run-dir", str(run_dir), "--precision", precision]
    argv += _split(values["engine_args"], "ENGINE_ARGS")
    _parse_stage(export_parser(), argv)
    print(shlex.join(["python", "-m", "export", *argv]), flush=True)
    return export_main(argv)


def commands() -> dict[str, Callable[[dict[str, str | None]], int]]:
    """The chain's single-stage commands by name (``export`` and ``compare`` are :mod:`lowrank_deploy.__main__`'s)."""
    return {"train": _train, "finetune": _finetune, "engine": _engine}
