"""Paths of every command are right whether given absolute or relative, from any working directory (issue 22).

``make export`` (default ``OUT=artifacts``, relative) once failed at the bench stage: the run directory was
joined onto a path that already held it (``artifacts/…/artifacts/…/dense.onnx``), and ``compress.json``
recorded a ``file.py:fn`` model spec relative to the compress stage's folder, so a later stage run from
elsewhere rebuilt the model from a file it could not find.

Every command that takes a path runs here with it spelled four ways: ``absolute``; ``relative`` and ``dot``
(``./rel``) from the folder that holds it; ``up`` (``../work/rel``) from a sibling folder. The model factory,
the weights file and the data folder are spelled the same way. One finished run (made by the
``lowrank-deploy`` console script from the sibling folder, ``OUT=../work/out``) is shared: each case works
on its own copy. Each case checks the exit code, that the files are where the path says, that no path
doubled, and what the command is for (report.json's speedup, an accuracy record, TensorRT's one line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from lowrank_core.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny.tiny_resnet"  # the run-directory name of factory/tiny.py:tiny_resnet
METHOD = "tucker2"
FORMS = ("absolute", "relative", "dot", "up")
COMMON = ["--weights", "random", "--ratio", "2", "--round-to", "2", "--threads", "1", "--duration", "0.3"]
COMPRESS_ARGS = "--input-size 32 --min-rank 2"
TRT_ABSENT = "TensorRT is not installed"


def spell(base: Path, target: Path, form: str) -> tuple[Path, str]:
    """(working directory, how ``target`` under ``base/work`` is written there) for one path form."""
    rel = target.relative_to(base / "work")
    return {
        "absolute": (base / "work", str(target)),
        "relative": (base / "work", str(rel)),
        "dot": (base / "work", f"./{rel}"),
        "up": (base / "sibling", f"../work/{rel}"),
    }[form]


def assert_no_doubled_path(base: Path) -> None:
    """No file under ``base`` sits in a run directory nested in itself (``out/m/x/out/m/x/…``)."""
    for path in base.rglob("*"):
        parts = path.relative_to(base).parts
        assert parts.count(MODEL) <= 1, f"doubled path: {path}"
        assert parts.count("work") <= 1, f"doubled path: {path}"


def _main(module: str) -> Callable[[Sequence[str] | None], int]:
    if module == "lowrank-deploy":
        from lowrank_deploy.__main__ import dispatch as pipeline_main

        return lambda argv: pipeline_main(argv, environ={})  # the test process's LRD_* never leak in
    if module == "compress":
        from compress.cli import main
    elif module == "export":
        from export.__main__ import main
    else:
        from runtime.__main__ import main
    return main


def call(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cwd: Path, module: str, argv: list[str]
) -> tuple[int, str, str]:
    """Run ``module``'s command line in this process from ``cwd``; return (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = run_main(module, _main(module), argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return code, out.out, out.err


def _layout(base: Path) -> None:
    """``base/work`` (factory, data) and ``base/sibling`` (a working directory beside it)."""
    (base / "work" / "factory").mkdir(parents=True)
    (base / "sibling").mkdir()
    shutil.copy(ROOT / "tests" / "compress" / "models.py", base / "work" / "factory" / "tiny.py")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run, made by the console script from a sibling folder with ``OUT=../work/out``.

    Returns the base folder; the run directory is ``base/work/out/tiny.tiny_resnet/tucker2``, the data
    ``base/work/data/cifar-10-batches-py`` and a state_dict ``base/work/weights.pt``.
    """
    import torch

    from tests.data.test_data import make_cifar10

    base = tmp_path_factory.mktemp("relpaths")
    _layout(base)
    make_cifar10(base / "work" / "data", per_batch=8, n_test=8)
    sys.path.insert(0, str(base / "work" / "factory"))
    try:
        import tiny  # the factory file of this layout

        torch.save(tiny.tiny_resnet().state_dict(), base / "work" / "weights.pt")
    finally:
        sys.path.remove(str(base / "work" / "factory"))
        sys.modules.pop("tiny", None)
    script = Path(sys.executable).parent / "lowrank-deploy"  # the venv's console script
    if not script.is_file():
        pytest.skip(f"the console script {script} is not installed (pip install -e .)")
    cmd = [str(script), "export", "--model", "../work/factory/tiny.py:tiny_resnet", *COMMON]
    cmd += ["--out", "../work/out", "--compress-args", COMPRESS_ARGS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRD_")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=base / "sibling", capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return base


def test_console_script_from_another_folder(shared: Path) -> None:
    run_dir = shared / "work" / "out" / MODEL / METHOD
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ratios"]["speedup_p50"] > 0
    assert report["compressed"]["latency_ms"]["p50"] > 0
    spec = json.loads((run_dir / "compress.json").read_text())["model_spec"]
    assert spec == f"{shared / 'work' / 'factory' / 'tiny.py'}:tiny_resnet"  # absolute: readable from any folder
    assert not (shared / "sibling" / "work").exists()  # ../work/out is not taken as sibling/work/out
    assert_no_doubled_path(shared)


@pytest.fixture
def case(shared: Path, tmp_path: Path) -> Path:
    """A private layout (``tmp_path/work``, ``tmp_path/sibling``) holding a copy of the shared run and inputs."""
    _layout(tmp_path)
    shutil.copytree(shared / "work" / "out", tmp_path / "work" / "out")
    shutil.copytree(shared / "work" / "data", tmp_path / "work" / "data")
    shutil.copy(shared / "work" / "weights.pt", tmp_path / "work" / "weights.pt")
    return tmp_path


def _run_dir(base: Path) -> Path:
    return base / "work" / "out" / MODEL / METHOD


# One command per case: (module, argv builder(form → spelled paths), check(base, stdout, stderr)).


@pytest.mark.parametrize("form", FORMS)
def test_compress_plan_show_run_apply(
    case: Path, form: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, factory = spell(case, case / "work" / "factory" / "tiny.py", form)
    _, weights = spell(case, case / "work" / "weights.pt", form)
    _, new = spell(case, case / "work" / "new", form)
    model = ["--model", f"{factory}:tiny_resnet", "--weights", weights, "--input-size", "32"]
    method = ["--ratio", "2", "--round-to", "2", "--min-rank", "2"]

    code, _, err = call(capsys, monkeypatch, cwd, "compress", ["plan", *model, *method, "--out", f"{new}/plan.json"])
    assert code == 0, err
    assert (case / "work" / "new" / "plan.json").is_file()
    code, out, err = call(capsys, monkeypatch, cwd, "compress", ["show", f"{new}/plan.json"])
    assert code == 0, err
    assert "conv1" in out

    code, _, err = call(capsys, monkeypatch, cwd, "compress", ["run", *model, *method, "--run-dir", f"{new}/run"])
    assert code == 0, err
    record = json.loads((case / "work" / "new" / "run" / "compress.json").read_text())
    assert record["model_spec"] == f"{case / 'work' / 'factory' / 'tiny.py'}:tiny_resnet"
    assert record["weights"] == str(case / "work" / "weights.pt")  # the file, whichever way it was named
    if form == "relative":  # a later stage from another folder rebuilds the model from the recorded spec
        other_cwd, other = spell(case, case / "work" / "new" / "run", "up")
        code, _, err = call(capsys, monkeypatch, other_cwd, "export", ["onnx", "--run-dir", other])
        assert code == 0, err  # was: "model factory file 'factory/tiny.py' does not exist"
        assert (case / "work" / "new" / "run" / "model.onnx").is_file()

    argv = ["apply", *model, "--plan", f"{new}/plan.json", "--run-dir", f"{new}/applied"]
    code, _, err = call(capsys, monkeypatch, cwd, "compress", argv)
    assert code == 0, err
    assert {"plan.json", "compress.json", "model.safetensors"} <= {
        p.name for p in (case / "work" / "new" / "applied").iterdir()
    }
    assert_no_doubled_path(case)


STAGE_COMMANDS: dict[str, tuple[str, Callable[[str], list[str]], tuple[str, ...]]] = {
    # name: (module, argv from the spelled run directory, files that must then be in the run directory)
    "export-onnx": ("export", lambda d: ["onnx", "--run-dir", d], ("dense.onnx", "model.onnx", "parity.json")),
    "export-check": ("export", lambda d: ["check", f"{d}/model.onnx"], ()),
    "export-quantize": (
        "export",
        lambda d: ["quantize", "--run-dir", d, "--precision", "int8", "--format", "qdq-u8s8", "--calibration", "4"],
        ("model.int8.onnx", "quantize.json"),
    ),
    "runtime-bench": (
        "runtime",
        lambda d: ["bench", "--run-dir", d, "--duration", "0.3", "--threads", "1"],
        ("latency.json", "latency.md"),
    ),
    "runtime-report": ("runtime", lambda d: ["report", "--run-dir", d], ("report.json", "report.md")),
    "runtime-profile": ("runtime", lambda d: ["profile", "--run-dir", d, "--iters", "2"], ("profile.json",)),
    "runtime-onnx": (
        "runtime",
        lambda d: ["onnx", f"{d}/dense.onnx", f"{d}/model.onnx", "--duration", "0.3", "--json", f"{d}/onnx.json"],
        ("onnx.json",),
    ),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", list(STAGE_COMMANDS))
def test_stage_command_on_a_run_directory(
    case: Path, command: str, form: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, argv, files = STAGE_COMMANDS[command]
    run_dir = _run_dir(case)
    for name in files:
        (run_dir / name).unlink(missing_ok=True)
    cwd, spelled = spell(case, run_dir, form)
    code, out, err = call(capsys, monkeypatch, cwd, module, argv(spelled))
    assert code == 0, err
    for name in files:
        assert (run_dir / name).is_file(), name
    if command == "export-check":
        assert json.loads(out)["n_nodes"] > 0
    if command == "runtime-report":
        assert json.loads((run_dir / "report.json").read_text())["ratios"]["speedup_p50"] > 0
    assert_no_doubled_path(case)


def assert_one_error(code: int, err: str, expected: str, *, absent: str) -> None:
    """Exit 1 with one stderr line that says ``expected`` and not ``absent``."""
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert absent not in err, err


@pytest.mark.parametrize("form", FORMS)
def test_engine_fails_on_tensorrt_after_the_paths_are_checked(
    case: Path, form: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: this checks a machine without it")
    cwd, spelled = spell(case, _run_dir(case), form)
    _, nowhere = spell(case, case / "work" / "nowhere", form)
    code, _, err = call(capsys, monkeypatch, cwd, "export", ["engine", "--run-dir", spelled])
    assert_one_error(code, err, TRT_ABSENT, absent="missing")
    code, _, err = call(capsys, monkeypatch, cwd, "export", ["engine", "--run-dir", nowhere])
    assert_one_error(code, err, "model.onnx is missing", absent=TRT_ABSENT)

    _, factory = spell(case, case / "work" / "factory" / "tiny.py", form)
    _, out = spell(case, case / "work" / "out", form)
    argv = ["engine", "--model", f"{factory}:tiny_resnet", "--precision", "fp16"]
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", [*argv, "--out", out])
    assert_one_error(code, err, TRT_ABSENT, absent="missing")
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", [*argv, "--out", nowhere])
    assert_one_error(code, err, "model.onnx is missing", absent=TRT_ABSENT)
    assert not list(_run_dir(case).glob("*.plan"))


@pytest.mark.parametrize("form", FORMS)
def test_lowrank_deploy_export_train_finetune(
    case: Path, form: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, factory = spell(case, case / "work" / "factory" / "tiny.py", form)
    _, out = spell(case, case / "work" / "out", form)
    _, data = spell(case, case / "work" / "data" / "cifar-10-batches-py", form)
    model = ["--model", f"{factory}:tiny_resnet"]
    run_dir = _run_dir(case)
    (run_dir / "report.json").unlink()

    argv = ["export", *model, *COMMON, "--out", out, "--compress-args", COMPRESS_ARGS]
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", argv)
    assert code == 0, err
    assert json.loads((run_dir / "report.json").read_text())["ratios"]["speedup_p50"] > 0

    small = ["--data", data, "--train-args", "--batch-size 8", "--eval-samples", "8"]
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", ["finetune", *model, "--out", out, *small])
    assert code == 0, err
    accuracy = json.loads((run_dir / "compress.json").read_text())["accuracy"]
    assert accuracy["finetuned"]["n"] == 8
    if form == "relative":  # a second fine-tune resumes the checkpoint with the run directory named otherwise
        other_cwd, other_out = spell(case, case / "work" / "out", "up")
        _, other_data = spell(case, case / "work" / "data" / "cifar-10-batches-py", "up")
        argv = ["finetune", "--model", f"{case / 'work' / 'factory' / 'tiny.py'}:tiny_resnet", "--out", other_out]
        argv += ["--data", other_data, "--train-args", "--batch-size 8", "--eval-samples", "8"]
        code, _, err = call(capsys, monkeypatch, other_cwd, "lowrank-deploy", [*argv, "--finetune-epochs", "2"])
        assert code == 0, err  # was: "… holds a training run with other settings"
        assert json.loads((run_dir / "compress.json").read_text())["accuracy"]["finetune"]["epochs"] == 2

    argv = ["train", *model, "--weights", "random", "--out", out, *small, "--epochs", "1"]
    if form == "dot":  # DATA=. from inside the data folder names the same training folder (it was train-)
        cwd = case / "work" / "data" / "cifar-10-batches-py"
        small = ["--data", ".", "--train-args", "--batch-size 8", "--eval-samples", "8"]
        argv = ["train", "--model", "../../factory/tiny.py:tiny_resnet", "--weights", "random", "--out", "../../out"]
        argv += [*small, "--epochs", "1"]
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", argv)
    assert code == 0, err
    assert (case / "work" / "out" / MODEL / "train-cifar-10-batches-py" / "model.safetensors").is_file()
    assert_no_doubled_path(case)


def test_lowrank_deploy_compare(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, factory = spell(case, case / "work" / "factory" / "tiny.py", "up")  # one form: two full chains each
    _, out = spell(case, case / "work" / "cmp", "up")
    argv = ["compare", "--model", f"{factory}:tiny_resnet", "--methods", "tucker2 svd", *COMMON, "--out", out]
    code, _, err = call(capsys, monkeypatch, cwd, "lowrank-deploy", [*argv, "--compress-args", COMPRESS_ARGS])
    assert code == 0, err
    record = json.loads((case / "work" / "cmp" / MODEL / "compare.json").read_text())
    for method, entry in record["methods"].items():
        assert entry["error"] is None
        assert entry["run_dir"] == str(case / "work" / "cmp" / MODEL / method)  # absolute: readable from any folder
        assert (case / "work" / "cmp" / MODEL / method / "model.onnx").is_file()
    assert record["dense"]["latency_ms"]["p50"] > 0
    assert_no_doubled_path(case)


def test_latency_table_in_a_relative_cache_folder(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOWRANK_DEPLOY_CACHE", "./cache")  # relative to the folder the command runs in
    cwd, factory = spell(case, case / "work" / "factory" / "tiny.py", "up")
    _, run = spell(case, case / "work" / "lat", "up")
    argv = ["run", "--model", f"{factory}:tiny_resnet", "--weights", "random", "--input-size", "32"]
    argv += ["--speedup", "1.1", "--latency-threads", "1", "--round-to", "2", "--min-rank", "2", "--run-dir", run]
    code, _, err = call(capsys, monkeypatch, cwd, "compress", argv)
    assert code == 0, err
    tables = list((case / "sibling" / "cache").glob("latency-*.json"))
    assert len(tables) == 1
    plan = json.loads((case / "work" / "lat" / "plan.json").read_text())
    assert plan["target"]["latency_model"]["table"]["path"] == str(tables[0])  # absolute: readable from anywhere
    assert_no_doubled_path(case)
