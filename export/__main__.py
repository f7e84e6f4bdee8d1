"""Command line of the export stage.

``python -m export onnx --run-dir DIR`` exports the dense and the compressed model of a compress run
to ``DIR/dense.onnx`` and ``DIR/model.onnx`` (both optimized), checks ONNX Runtime against PyTorch and
writes ``DIR/parity.json``. ``python -m export check FILE.onnx`` prints a graph summary as JSON.
``python -m export engine --run-dir DIR --precision fp16`` builds TensorRT engines ``DIR/model.plan``
(and ``DIR/dense.plan``) with JSON sidecars from those ONNX files; it needs TensorRT and a GPU (with
``--precision int8`` from ``DIR/model.int8.trt.onnx`` when present). ``python -m export quantize --run-dir DIR
--precision int8|fp16`` writes quantized copies and ``DIR/quantize.json`` (:mod:`export.quantize`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.merge_branches import merge_model
from export.onnx import MIN_EXPORT_OPSET, graph_summary, load_onnx, onnx_from_torch, save_onnx
from export.parity import DEFAULT_ATOL, DEFAULT_RTOL, check_onnx_parity
from export.passes import optimize
from lowrank_core.cli import ArgumentParser, run_main
from lowrank_core.errors import ParityError, UserInputError
from lowrank_core.integrity import DIGESTS, INPUTS, file_digests, run_lock, verify_chain
from lowrank_core.io import ensure_writable_dir
from lowrank_core.rundir import (
    COMPRESSED,
    DENSE,
    DENSE_ONNX,
    DENSE_WEIGHTS,
    MODEL_ENGINE,
    MODEL_ONNX,
    MODEL_WEIGHTS,
    PLAN_JSON,
    QUANTIZED_FILES,
    SPARSE_ONNX,
    ParityRecord,
    RunDir,
)

PROG = "python -m export"
#: (key in parity.json, file name) for the two models of a run.
OUTPUTS = ((DENSE, DENSE_ONNX), (COMPRESSED, MODEL_ONNX))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m export``."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("onnx", help="export a compress run directory to optimized ONNX and check parity")
    exp.add_argument("--run-dir", required=True, type=Path, help="directory written by `python -m compress`")
    exp.add_argument(
        "--opset",
        type=int,
        default=MIN_EXPORT_OPSET,
        help=f"ONNX opset of the written files, >= 17 (default {MIN_EXPORT_OPSET}; 17 is converted "
        "down after optimization)",
    )
    exp.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    exp.add_argument("--batch", type=int, default=None, help="batch size of the example/parity input")
    exp.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance ({DEFAULT_ATOL:g})")
    exp.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance ({DEFAULT_RTOL:g})")
    exp.add_argument(
        "--sparse-initializers",
        choices=("auto", "off"),
        default="auto",
        help="auto (default): when the compressed model has mostly-zero weights (LRSD's sparse branch), also "
        "write model.sparse.onnx storing them as ONNX sparse initializers (file size only; parity checked)",
    )

    eng = sub.add_parser(
        "engine",
        help=f"build TensorRT engines DIR/{MODEL_ENGINE} (+ dense) with sidecars from the run's ONNX files",
    )
    eng.add_argument("--run-dir", required=True, type=Path, help="run directory with model.onnx (and dense.onnx)")
    eng.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"), help="engine precision")
    eng.add_argument("--min-batch", type=int, default=None, help="profile min batch (default: --opt-batch)")
    eng.add_argument("--opt-batch", type=int, default=1, help="profile opt batch: the batch you will run (default 1)")
    eng.add_argument("--max-batch", type=int, default=None, help="profile max batch (default: --opt-batch)")
    eng.add_argument("--workspace-mib", type=int, default=None, help="workspace memory-pool limit in MiB")
    eng.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    eng.add_argument("--timing-cache", type=Path, default=None, help="timing cache file to load and update")
    eng.add_argument("--skip-dense", action="store_true", help="build model.plan only, not dense.plan")
    eng.add_argument(
        "--sparse-weights",
        choices=("auto", "on", "off"),
        default="auto",
        help="BuilderFlag.SPARSE_WEIGHTS: auto (default) sets it when weights follow the 2:4 pattern (LRSD --structured 2:4)",
    )
    eng.add_argument(
        "--skip-parity", action="store_true", help="do not compare the engine with ONNX Runtime after the build"
    )
    eng.add_argument("--parity-seed", type=int, default=0, help="seed of the parity inputs (default 0)")
    eng.add_argument("--parity-atol", type=float, default=None, help="parity atol (default by precision)")
    eng.add_argument("--parity-rtol", type=float, default=None, help="parity rtol (default by precision)")

    from export.quantize import add_parser as add_quantize_parser

    add_quantize_parser(sub)

    chk = sub.add_parser("check", help="validate an ONNX file and print its graph summary as JSON")
    chk.add_argument("file", type=Path, help="ONNX file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return _check(args.file)
    if args.command == "engine":
        with run_lock(args.run_dir, stage="engine"):
            return _build_engines(args)
    if args.command == "quantize":
        from export.quantize import run_cli

        with run_lock(args.run_dir, stage="quantize"):
            return run_cli(args)
    with run_lock(args.run_dir, stage="export"):
        if _onnx_input_run(args.run_dir):  # MODEL=path/to/model.onnx: agreement with the original ONNX
            from export.onnx_input import export_onnx_run

            return export_onnx_run(args)
        return _export_run(args)


def _onnx_input_run(run_dir: Path) -> bool:
    """Whether the run was compressed from an ONNX file (:mod:`compress.onnx_in`; False without the compress stage)."""
    try:
        from compress.onnx_in.run import is_onnx_run
    except ImportError:
        return False
    return is_onnx_run(run_dir)


def _check(path: Path) -> int:
    model = load_onnx(path)
    print(json.dumps(graph_summary(model, path=path), indent=2))
    return 0


def _export_run(args: argparse.Namespace) -> int:
    if args.opset < 17:
        raise UserInputError(f"--opset {args.opset} is too old; use 17 or newer (default {MIN_EXPORT_OPSET})")
    if args.batch is not None and args.batch < 1:
        raise UserInputError(f"--batch must be >= 1, got {args.batch}")
    try:
        from compress.artifacts import load_run
        from lowrank_core.progress import heartbeat
    except ImportError as exc:
        raise UserInputError(
            f"compress.artifacts is not available ({exc}); install the compress stage of lowrank-deploy"
        ) from None
    import torch

    verify_chain(args.run_dir, "export")  # plan and weights are the ones compress.json describes
    run = load_run(args.run_dir)  # validates the directory before anything is written into it
    run_dir = ensure_writable_dir(args.run_dir)
    input_shape = tuple(int(d) for d in run.input_shape)
    if args.batch is not None:
        input_shape = (args.batch, *input_shape[1:])

    record: dict[str, Any] = {
        "opset": args.opset,
        "dynamic_batch": bool(args.dynamic_batch),
        "atol": args.atol,
        "rtol": args.rtol,
        INPUTS: file_digests(run_dir, (PLAN_JSON, DENSE_WEIGHTS, MODEL_WEIGHTS)),
    }
    failures = []
    for stale in QUANTIZED_FILES:  # derived from the ONNX files rewritten below
        (run_dir / stale).unlink(missing_ok=True)
    for key, filename in OUTPUTS:
        model = run.dense if key == DENSE else run.compressed
        example = torch.zeros(input_shape, dtype=torch.float32)
        with heartbeat(f"export {key}: ONNX export, optimization and parity"):  # lines in a log (issue 22)
            start = time.perf_counter()
            raw = onnx_from_torch(
                model, example, opset=max(args.opset, MIN_EXPORT_OPSET), dynamic_batch=args.dynamic_batch
            )
            export_s = time.perf_counter() - start
            start = time.perf_counter()
            optimized = optimize(raw, opset=args.opset)
            if key != DENSE:  # Bi-JSVD: two summed conv pairs → one pair of rank r1 + r2, shared factors kept once
                optimized, _ = merge_model(optimized, shared=True)
            optimize_s = time.perf_counter() - start
            path = save_onnx(optimized, run_dir / filename)
            result = check_onnx_parity(
                model, path, input_shape=input_shape, atol=args.atol, rtol=args.rtol, raise_on_failure=False
            )
        summary = graph_summary(optimized, path=path)
        record[key] = {
            **result.to_dict(),
            "onnx_bytes": path.stat().st_size,
            "export_s": round(export_s, 3),
            "optimize_s": round(optimize_s, 3),
            "graph": summary,
        }
        print(_summary_line(key, path, summary, result))
        if not result.passed:
            failing = [name for name, r in (result.outputs or {}).items() if not r["passed"]]
            failures.append(f"{key} ({filename}{', outputs ' + ', '.join(failing) if failing else ''}): {result}")
        if key != DENSE and args.sparse_initializers == "auto":
            sparse = _sparse_copy(model, optimized, run_dir, input_shape, args)
            if sparse is not None:
                record["sparse_onnx"] = sparse
                if not sparse["passed"]:
                    failures.append(f"{key} ({SPARSE_FILE}): max_abs {sparse['max_abs']:.3g}")
    if "sparse_onnx" not in record:  # a sparse copy of an earlier run must not stay beside this one
        RunDir(run_dir).sparse_onnx.unlink(missing_ok=True)
    record[DIGESTS] = file_digests(run_dir, (DENSE_ONNX, MODEL_ONNX, SPARSE_ONNX))
    path = ParityRecord.from_dict(record).write(RunDir(run_dir).parity_json)
    print(f"wrote {path}")
    if failures:
        raise ParityError(f"ONNX Runtime vs PyTorch parity failed for {'; '.join(failures)}")
    return 0


def _build_engines(args: argparse.Namespace) -> int:
    from export.tensorrt import (
        BatchProfile,
        EngineFromOnnx,
        engine_parity,
        record_parity,
        require_tensorrt,
        save_engine,
    )

    rd = RunDir(args.run_dir)
    rd.require(rd.onnx(COMPRESSED))  # a wrong path is named as such, on any machine, before TensorRT is needed
    require_tensorrt()  # one-line error naming the container before anything is built
    opt = args.opt_batch
    profile = BatchProfile(
        args.min_batch if args.min_batch is not None else min(opt, args.max_batch or opt),
        opt,
        args.max_batch if args.max_batch is not None else opt,
    )
    models = [COMPRESSED]
    if not args.skip_dense and rd.onnx(DENSE).is_file():
        models.insert(0, DENSE)
    parity_failures: list[str] = []
    for which in models:
        plan_name = rd.engine(which).name
        start = time.perf_counter()
        source = rd.onnx(which)
        if args.precision == "int8" and rd.quantized(which, "int8", "tensorrt").is_file():
            source = rd.quantized(which, "int8", "tensorrt")  # symmetric Q/DQ: explicit quantization
        loader = EngineFromOnnx(
            source,
            precision=args.precision,
            batch=profile,
            workspace_mib=args.workspace_mib,
            opt_level=args.opt_level,
            timing_cache=args.timing_cache,
            sparse_weights={"auto": None, "on": True, "off": False}[args.sparse_weights],
        )
        built = loader()
        built.metadata["build_s"] = round(time.perf_counter() - start, 3)
        path = save_engine(built, rd.engine(which))
        check = built.metadata.get("precision_check", {})
        print(
            f"{plan_name:<11} {path.stat().st_size / 1e6:8.2f} MB  TensorRT {built.metadata['tensorrt_version']} "
            f"{args.precision} on {built.metadata['gpu_name']}  layers {check.get('layer_precisions')}  "
            f"built in {built.metadata['build_s']:.1f} s"
        )
        if not args.skip_parity:
            parity = engine_parity(
                path,
                rd.onnx(which),
                precision=args.precision,
                batch=profile.opt,
                seed=args.parity_seed,
                atol=args.parity_atol,
                rtol=args.parity_rtol,
            )
            record_parity(path, parity)
            verdict = "PASS" if parity["passed"] else "FAIL"
            print(
                f"{plan_name:<11} parity vs ONNX Runtime {verdict}: max_abs {parity['max_abs']:.3g} rel_l2 "
                f"{parity['rel_l2']:.3g} (atol {parity['atol']:g}, rtol {parity['rtol']:g}, batch {parity['batch']})"
            )
            if not parity["passed"]:
                parity_failures.append(f"{plan_name}: max_abs {parity['max_abs']:.3g}")
    if parity_failures:
        raise ParityError(f"TensorRT vs ONNX Runtime parity failed for {'; '.join(parity_failures)}")
    return 0


SPARSE_FILE = SPARSE_ONNX


def _sparse_copy(
    model: Any, optimized: Any, run_dir: Path, input_shape: tuple[int, ...], args: argparse.Namespace
) -> dict[str, Any] | None:
    """Write ``model.sparse.onnx`` (mostly-zero weights as sparse initializers) when that saves bytes."""
    from export.sparse import sparse_summary, sparsify_initializers

    sparse = sparsify_initializers(optimized)
    if not sparse.graph.sparse_initializer:
        return None
    path = save_onnx(sparse, run_dir / SPARSE_FILE)
    result = check_onnx_parity(
        model, path, input_shape=input_shape, atol=args.atol, rtol=args.rtol, raise_on_failure=False
    )
    print(
        f"compressed, sparse initializers: {path} ({path.stat().st_size / 1e6:.2f} MB, "
        f"{len(sparse.graph.sparse_initializer)} sparse tensors) parity max_abs={result.max_abs:.2e}"
    )
    return {
        "file": SPARSE_FILE,
        "onnx_bytes": path.stat().st_size,
        "max_abs": result.max_abs,
        "passed": result.passed,
        **sparse_summary(sparse),
        "note": "storage only: ONNX has no sparse Conv/Gemm, runtimes densify sparse initializers on load",
    }


def _summary_line(key: str, path: Path, summary: dict[str, Any], result: Any) -> str:
    ops = ", ".join(f"{op} {n}" for op, n in summary["node_counts"].items())
    verdict = "PASS" if result.passed else "FAIL"
    return (
        f"{key:<10} {path.name:<11} {summary['file_bytes'] / 1e6:8.2f} MB  "
        f"{summary['n_params'] / 1e6:7.3f} M params  "
        f"{summary['n_nodes']} nodes ({ops})  shared={len(summary['shared_initializers'])}  "
        f"parity {verdict} max_abs={result.max_abs:.2e} rel_l2={result.rel_l2:.2e}" + _per_output(result)
    )


def _per_output(result: Any) -> str:
    """`` [out PASS max_abs=…, aux PASS max_abs=…]`` for a model with several named outputs, else ``""``."""
    outputs = getattr(result, "outputs", None) or {}
    if len(outputs) < 2:
        return ""
    parts = [f"{name} {'PASS' if r['passed'] else 'FAIL'} max_abs={r['max_abs']:.2e}" for name, r in outputs.items()]
    return " [" + ", ".join(parts) + "]"


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
