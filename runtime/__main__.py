"""Command line: ``python -m runtime {bench,report,onnx,profile,env}``.

A thin layer over the library: each subcommand builds runners through the registry
(:func:`runtime.base.runner_class` → ``cli_options`` / ``bench_runners`` / ``from_path``; no backend is
named here), calls :func:`runtime.harness.benchmark` and writes through :mod:`runtime.report`. Heavy packages (torch, onnxruntime, matplotlib) are imported
only by the subcommand that needs them, so ``--help`` works without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowrank_core.checks import MAX_BATCH, MAX_ITERS, count_arg, duration_arg
from lowrank_core.cli import ArgumentParser, run_main
from lowrank_core.errors import UserInputError
from lowrank_core.integrity import INPUTS, file_digests, run_lock, verify_chain
from lowrank_core.rundir import (
    DENSE_ENGINE,
    DENSE_INT8_ONNX,
    DENSE_ONNX,
    DENSE_WEIGHTS,
    MODEL_ENGINE,
    MODEL_INT8_ONNX,
    MODEL_ONNX,
    MODEL_WEIGHTS,
)

PROG = "runtime"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = ArgumentParser(
        prog=f"python -m {PROG}",
        description="Measure exported models: latency benchmarks, run reports, environment capture.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench",
        help="benchmark dense vs compressed models of a run directory",
        description="Benchmark DIR/dense.onnx vs DIR/model.onnx (ort) or the run's PyTorch modules (torch), "
        "interleaved; writes latency.json, latency.md and latency.png into the run directory.",
    )
    bench.add_argument("--run-dir", required=True, type=Path, help="run directory of the compress/export stages")
    bench.add_argument("--backend", default="ort", help="runner backend: ort (default), torch or trt")
    _add_device_args(bench)
    gpu = bench.add_argument_group("GPU (torch backend with --device cuda; trt backend)")
    gpu.add_argument("--cuda-graph", action="store_true", help="torch: capture and replay a CUDA graph")
    gpu.add_argument("--channels-last", action="store_true", help="torch: channels-last memory format")
    gpu.add_argument("--autocast", choices=("fp16", "bf16"), default=None, help="torch: run under torch.autocast")
    gpu.add_argument(
        "--engine", type=Path, default=None, help="trt: engine to time (default DIR/model.plan, plus DIR/dense.plan)"
    )
    jetson = bench.add_argument_group("Jetson")
    jetson.add_argument(
        "--tegrastats",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample tegrastats (power, RAM, GPU load, clocks) beside the timed runs into latency.json "
        "(default: on when /etc/nv_tegra_release exists)",
    )
    jetson.add_argument("--tegrastats-interval", type=int, default=100, metavar="MS", help="sampling interval")
    _add_timing_args(bench)

    report = sub.add_parser(
        "report",
        help="assemble report.json/.md from a run directory",
        description="Assemble report.json and report.md from compress.json, parity.json, latency.json "
        "and the ONNX files of a run directory, and print the Markdown.",
    )
    report.add_argument("--run-dir", required=True, type=Path, help="run directory")

    onnx = sub.add_parser(
        "onnx",
        help="benchmark arbitrary ONNX files side by side",
        description="Benchmark ONNX files side by side with ONNX Runtime, interleaved. Inputs are seeded "
        "random tensors built from each model's input metadata; a dynamic axis 0 takes --batch.",
    )
    onnx.add_argument(
        "models", nargs="+", type=Path, metavar="MODEL.onnx", help="ONNX files; the first is the baseline"
    )
    onnx.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="NAME:DIMS",
        help="concrete input shape, e.g. input:1x3x224x224 (repeatable; needed for dynamic non-batch axes)",
    )
    onnx.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the full record here")
    _add_device_args(onnx)
    _add_timing_args(onnx)

    profile = sub.add_parser(
        "profile",
        help="per-layer profile of dense.onnx and model.onnx (ONNX Runtime profiler)",
        description="Profile DIR/dense.onnx and DIR/model.onnx with ONNX Runtime's profiler, map node times back "
        "to the plan's layers and write profile.json and profile.md (see runtime.profile).",
    )
    profile.add_argument("--run-dir", required=True, type=Path, help="run directory of the export stage")
    profile.add_argument("--backend", default="ort", choices=("ort",), help="profiler backend (ort only)")
    profile.add_argument(
        "--threads", type=count_arg("--threads", high=4096), default=1, help="intra-op threads (default 1)"
    )
    profile.add_argument("--iters", type=count_arg("--iters", high=MAX_ITERS), default=20, help="profiled runs")
    profile.add_argument("--warmup-iters", type=count_arg("--warmup-iters", low=0), default=5, help="untimed runs")
    profile.add_argument("--batch", type=count_arg("--batch", high=MAX_BATCH), default=1, help="batch size")

    sub.add_parser("env", help="print the captured environment as JSON", description="Print capture_environment().")
    return parser


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="cpu", help="cpu (default), cuda, or tensorrt (ort only)")
    group.add_argument(
        "--threads", type=count_arg("--threads", high=4096), default=None, help="intra-op threads (ort) / torch threads"
    )
    group.add_argument(
        "--spin",
        action="store_true",
        help="let ONNX Runtime threads spin-wait (its default; off here because interleaved sessions then "
        "steal each other's cores)",
    )
    ort_gpu = parser.add_argument_group("ONNX Runtime on GPU (ort with --device cuda / tensorrt)")
    ort_gpu.add_argument("--trt-fp16", action="store_true", help="TensorRT EP: trt_fp16_enable")
    ort_gpu.add_argument(
        "--trt-engine-cache", type=Path, default=None, metavar="DIR", help="TensorRT EP: engine/timing cache folder"
    )
    ort_gpu.add_argument(
        "--no-io-binding", action="store_true", help="feed host arrays to session.run instead of device bindings"
    )
    ort_gpu.add_argument(
        "--no-cpu-nodes", action="store_true", help="refuse models ONNX Runtime would partly place on the CPU"
    )


def _add_timing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timing")
    group.add_argument(
        "--batch",
        type=count_arg("--batch", high=MAX_BATCH),
        default=1,
        help="batch size of the generated inputs (default 1)",
    )
    group.add_argument(
        "--duration", type=duration_arg("--duration"), default=10.0, help="measurement budget in s for all models"
    )
    group.add_argument(
        "--iters",
        type=count_arg("--iters", low=-MAX_ITERS),  # the low end: BenchmarkConfig's message
        default=None,
        help="exact timed iterations per model (overrides --duration)",
    )
    group.add_argument(
        "--min-iters",
        type=count_arg("--min-iters", low=-MAX_ITERS),
        default=20,
        help="minimum timed iterations per model (default 20)",
    )
    group.add_argument(
        "--warmup",
        type=duration_arg("--warmup", allow_zero=True),
        default=1.0,
        help="minimum warm-up seconds per model (default 1.0)",
    )
    group.add_argument(
        "--warmup-iters",
        type=count_arg("--warmup-iters", low=0),
        default=10,
        help="minimum warm-up iterations per model (default 10)",
    )
    group.add_argument("--no-interleave", action="store_true", help="measure models one after the other")
    group.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    commands = {"bench": _cmd_bench, "report": _cmd_report, "onnx": _cmd_onnx, "env": _cmd_env, "profile": _cmd_profile}
    command = commands[args.command]
    if args.command in ("bench", "report", "profile"):  # one writer; what it makes stale goes
        with run_lock(args.run_dir, stage=args.command):
            return command(args)
    return command(args)


# Subcommands ------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from runtime.base import runner_class
    from runtime.env import capture_environment
    from runtime.harness import benchmark
    from runtime.latency_record import latency_markdown, write_latency

    cls = runner_class(args.backend)  # unknown name → one-line error listing the known backends
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise UserInputError(f"run directory {str(run_dir)!r} does not exist; run the compress and export stages first")
    config = _config(args)
    verify_chain(run_dir, "bench")  # the ONNX files are the ones the export checked, of the current weights
    timed = (DENSE_ONNX, MODEL_ONNX, DENSE_INT8_ONNX, MODEL_INT8_ONNX, DENSE_WEIGHTS, MODEL_WEIGHTS)
    inputs = file_digests(run_dir, (*timed, DENSE_ENGINE, MODEL_ENGINE))
    cli = vars(args)
    runners = cls.bench_runners(run_dir, **cls.cli_options(cli))

    from lowrank_core.progress import heartbeat
    from runtime.jetson import bench_sampler, jetson_record

    sampler = bench_sampler(args.tegrastats, interval_ms=args.tegrastats_interval)
    with heartbeat(f"bench: timing {', '.join(runners)}", expected=args.duration):  # lines in a log (issue 22)
        result = benchmark(runners, _feed_factory(args.batch, args.seed), config, monitor=sampler)
    env = capture_environment({**cls.cli_env(cli), "command": "bench", "device": args.device, "seed": args.seed})
    jetson = jetson_record(sampler)
    extra = {"jetson": jetson} if jetson is not None else None
    record = write_latency(run_dir, result, env, backend=args.backend, batch=args.batch, extra=extra)
    gpu_compute = _gpu_compute(runners, result)
    from lowrank_core.rundir import LatencyRecord, RunDir

    if gpu_compute:
        record["gpu_compute"] = gpu_compute
    record[INPUTS] = inputs  # what was timed: the report combines only files of one run
    LatencyRecord.from_dict(record).write(RunDir(run_dir).latency_json)
    print(latency_markdown(record))
    for key, stats in gpu_compute.items():
        host = record["results"][key]
        print(
            f"{key}: GPU compute p50 {stats['p50']:.3f} ms (p90 {stats['p90']:.3f}, p99 {stats['p99']:.3f}) "
            f"vs host latency p50 {host['p50']:.3f} ms"
        )
    return 0


def _gpu_compute(runners: dict[str, Any], result: Any) -> dict[str, Any]:
    """CUDA-event GPU compute stats (ms) over the timed inferences: the tail of each runner's gpu_times_s."""
    from runtime.harness import LatencyStats

    out = {}
    for key, runner in runners.items():
        times = getattr(runner, "gpu_times_s", None)
        n = result.stats[key].n
        if times and len(times) >= n:
            out[key] = LatencyStats.from_samples(times[-n:], result.config.batch).to_dict()
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    from lowrank_core.rundir import RunDir
    from runtime.report import write_report

    write_report(args.run_dir)
    print(RunDir(args.run_dir).report_md.read_text(encoding="utf-8"))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from lowrank_core.rundir import RunDir
    from runtime.profile import PROFILE_MD, write_profile

    write_profile(args.run_dir, threads=args.threads, iters=args.iters, warmup=args.warmup_iters, batch=args.batch)
    print(RunDir(args.run_dir).file(PROFILE_MD).read_text(encoding="utf-8"))
    return 0


def _cmd_onnx(args: argparse.Namespace) -> int:
    from lowrank_core.rundir import LatencyRecord
    from runtime.base import runner_class
    from runtime.env import capture_environment
    from runtime.harness import benchmark
    from runtime.latency_record import latency_markdown, latency_record

    shapes = _parse_shapes(args.shape)
    names = _unique_names(args.models)
    cls = runner_class("ort")
    cli = vars(args)
    options = cls.cli_options(cli)
    runners = {name: cls.from_path(path, name=name, **options) for name, path in zip(names, args.models, strict=True)}
    for name, path in zip(names, args.models, strict=True):
        if not path.is_file():
            raise UserInputError(f"ONNX file {str(path)!r} ({name}) does not exist")
    result = benchmark(runners, _feed_factory(args.batch, args.seed, shapes), _config(args))
    env = capture_environment({**cls.cli_env(cli), "command": "onnx", "device": args.device})
    record = latency_record(result, env, backend="ort", batch=args.batch)
    record["models"] = {name: str(path) for name, path in zip(names, args.models, strict=True)}
    record["speedups"] = {name: result.speedup(names[0], name).to_dict() for name in names[1:]}
    print(latency_markdown(record))
    for name, estimate in record["speedups"].items():
        lo, hi = estimate["ci95"]
        print(f"{name} vs {names[0]}: {estimate['p50_ratio']:.3f}× (95% CI {lo:.3f}–{hi:.3f})")
    if args.json is not None:
        LatencyRecord.from_dict(record).write(args.json)
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    from runtime.env import capture_environment
    from runtime.ort_runner import ort_install_problem

    print(json.dumps(capture_environment(), indent=2))
    problem = ort_install_problem()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


# Helpers ----------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from runtime.harness import BenchmarkConfig

    return BenchmarkConfig(
        warmup_iters=args.warmup_iters,
        warmup_s=args.warmup,
        iters=args.iters,
        duration_s=args.duration,
        min_iters=args.min_iters,
        interleave=not args.no_interleave,
        batch=args.batch,
    )


def _feed_factory(batch: int, seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
    from runtime.harness import random_feed

    def make(key: str, runner: Any) -> dict[str, Any]:
        return random_feed(runner.get_input_metadata(), batch=batch, seed=seed, shapes=shapes, model=key)

    return make


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.replace(",", "x").split("x") if d)
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise UserInputError(f"--shape {item!r} is not NAME:DIMS such as input:1x3x224x224")
        shapes[name] = shape
    return shapes


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name, i = path.stem, 2
        while name in names:
            name, i = f"{path.stem}-{i}", i + 1
        names.append(name)
    return names


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
