"""ONNX Runtime runner (``"ort"``): CPU, and CUDA / TensorRT execution providers with I/O binding.

``onnxruntime`` is imported inside the methods, so importing this module (and ``runtime``) stays cheap
and works where ONNX Runtime is not installed.

On a GPU provider (``cuda``, ``tensorrt``) the runner uses I/O binding: each input lives in a CUDA
``OrtValue`` bound once (later calls copy the new host values into it with ``update_inplace``) and
outputs are bound to the device, so ``session.run_with_iobinding`` alone is the *device* time (no host
copies; kept per inference in ``gpu_times_s``), while the host timer around :meth:`Runner.infer`
(host → device, run, device → host) is the *end-to-end* figure. The first inference is profiled
(``SessionOptions.enable_profiling``) to tell which provider ran which nodes
(:attr:`OrtRunner.placement`); a GPU request that ends up with every node on the CPU is refused.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowrank_core.errors import RuntimeUnavailableError, UserInputError
from runtime.base import Feed, Runner, TensorMeta, register_runner

if TYPE_CHECKING:
    from lowrank_core.rundir import RunDir

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""Short provider names accepted by :class:`OrtRunner` → ONNX Runtime execution provider."""

DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "tensorrt": ("tensorrt", "cuda"),
}
"""The CLI's ``--device`` → providers in priority order."""

ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-training",
)
"""Distributions that all install the same ``onnxruntime`` package folder (only one may be installed)."""

_PROVIDER_PACKAGES: dict[str, str] = {
    "CPUExecutionProvider": "onnxruntime",
    "CUDAExecutionProvider": "onnxruntime-gpu (with CUDA and cuDNN libraries matching it)",
    "TensorrtExecutionProvider": "onnxruntime-gpu (with TensorRT libraries matching it)",
}

_OPT_LEVELS: dict[str, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

_ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

_CPU = "CPUExecutionProvider"
_KERNEL_SUFFIX = "_kernel_time"


def installed_ort_distributions() -> list[str]:
    """The ONNX Runtime distributions installed in this environment (``importlib.metadata``, no import)."""
    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def ort_install_problem(dists: Sequence[str] | None = None) -> str | None:
    """One line saying how to fix an environment with several ONNX Runtime distributions, else ``None``.

    ``onnxruntime`` and ``onnxruntime-gpu`` install the same package folder; with both, whichever was
    installed last wins file by file, and uninstalling one removes files the other needs.

    Args:
        dists: installed distributions (default :func:`installed_ort_distributions`).
    """
    dists = list(installed_ort_distributions() if dists is None else dists)
    if len(dists) < 2:
        return None
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in dists else dists[-1]
    return (
        f"{' and '.join(dists)} are all installed and overwrite each other's files; keep one: "
        f"`pip uninstall -y {' '.join(dists)} && pip install {keep}`"
    )


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError(
            "the ort backend needs ONNX Runtime: `pip install 'lowrank-deploy[cpu]'` (CPU) or "
            "`pip install 'lowrank-deploy[gpu]'` (CUDA/TensorRT), never both"
        ) from None
    return onnxruntime


def resolve_provider(name: str) -> str:
    """Map a short name (``cpu``, ``cuda``, ``tensorrt``) or a full provider name to the full name.

    Raises:
        UserInputError: for an unknown name.
    """
    if name in PROVIDERS:
        return PROVIDERS[name]
    if name in PROVIDERS.values():
        return name
    known = ", ".join(PROVIDERS)
    raise UserInputError(f"unknown ONNX Runtime provider {name!r}; use one of: {known}")


def node_placement(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Which provider ran which nodes, from ONNX Runtime profiling events (``end_profiling()``'s JSON).

    Only ``cat == "Node"`` events named ``<node>_kernel_time`` count (one per node run); a TensorRT EP
    subgraph shows up as one fused node (``TensorrtExecutionProvider_TRTKernel_...``).

    Returns:
        provider → ``{"nodes": count, "ops": {op_type: count}, "kernel_us": summed duration,
        "node_names": [...]}``, providers in order of first appearance.
    """
    out: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        args = event.get("args") or {}
        provider = str(args.get("provider") or "unknown")
        node = name[: -len(_KERNEL_SUFFIX)]
        entry = out.setdefault(provider, {"nodes": 0, "ops": collections.Counter(), "kernel_us": 0, "node_names": []})
        entry["kernel_us"] += int(event.get("dur") or 0)
        if (provider, node) in seen:
            continue
        seen.add((provider, node))
        entry["nodes"] += 1
        entry["ops"][str(args.get("op_name") or "?")] += 1
        entry["node_names"].append(node)
    for entry in out.values():
        entry["ops"] = dict(entry["ops"])
    return out


def placement_lines(placement: Mapping[str, Any] | None) -> list[str]:
    """Markdown bullet text per provider, e.g. ``CUDAExecutionProvider: 40 nodes (Conv 36, Add 4)``."""
    if not placement:
        return []
    lines = []
    for provider, entry in placement.items():
        ops = ", ".join(f"{op} {n}" for op, n in sorted(entry.get("ops", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"{provider}: {entry.get('nodes')} node(s) ({ops}), {entry.get('kernel_us', 0) / 1e3:.3f} ms")
    return lines


@register_runner("ort")
class OrtRunner(Runner):
    """Run an ONNX file with ONNX Runtime.

    Args:
        onnx_path: the model file, or a serialized model (``ModelProto.SerializeToString()``).
        providers: execution providers in priority order, short (``cpu``, ``cuda``, ``tensorrt``) or full
            names. ONNX Runtime always adds CPU as the fallback for nodes other providers reject.
        intra_op_threads: threads inside one operator; ``None`` lets ONNX Runtime choose (all cores).
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        allow_spinning: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off by
            default here: when two sessions are timed interleaved, the spinning pool of the one that just
            ran steals cores from the other (seen on this project's 2-core machine as a bimodal dense
            latency, 37 ms alone vs 40/70 ms interleaved), which biases every A/B comparison.
        device_id: CUDA device of the GPU providers.
        trt_fp16: TensorRT EP ``trt_fp16_enable`` (FP16 kernels where TensorRT picks them).
        trt_engine_cache: directory for the TensorRT EP engine cache (``trt_engine_cache_enable`` and
            ``trt_engine_cache_path``; also its timing cache); ``None`` builds engines at every activation.
        io_binding: bind inputs/outputs on the device; ``None`` = on for GPU providers, off for CPU.
        placement: profile the first inference to record which provider ran each node; ``None`` = on
            for GPU providers.
        allow_cpu_nodes: let ONNX Runtime place some nodes on the CPU next to a GPU provider (it does for
            shape computations); ``False`` sets ``session.disable_cpu_ep_fallback`` so such a model fails
            to load instead.
        name: instance name; default the file stem.

    Attributes:
        providers: the requested providers (full names).
        providers_in_use: the providers of the live session, recorded at activation.
        placement: provider → nodes it ran (see :func:`node_placement`) after the first inference, or
            ``None`` when not profiled.
        gpu_times_s: device time of every inference with I/O binding (``run_with_iobinding`` with inputs
            and outputs on the device), warm-up included; empty without I/O binding.

    Raises:
        UserInputError: for an unknown provider or optimisation level, ``intra_op_threads`` < 1, or
            GPU-only options without a GPU provider.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str] | bytes,
        *,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        allow_spinning: bool = False,
        device_id: int = 0,
        trt_fp16: bool = False,
        trt_engine_cache: str | os.PathLike[str] | None = None,
        io_binding: bool | None = None,
        placement: bool | None = None,
        allow_cpu_nodes: bool = True,
        name: str | None = None,
    ) -> None:
        if isinstance(providers, str):
            providers = (providers,)
        if not providers:
            raise UserInputError("OrtRunner needs at least one provider, e.g. providers=('cpu',)")
        resolved = tuple(resolve_provider(p) for p in providers)
        if graph_optimization_level not in _OPT_LEVELS:
            raise UserInputError(
                f"unknown graph_optimization_level {graph_optimization_level!r}; use one of: {', '.join(_OPT_LEVELS)}"
            )
        if intra_op_threads is not None and intra_op_threads < 1:
            raise UserInputError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        if device_id < 0:
            raise UserInputError(f"device_id must be >= 0, got {device_id}")
        gpu = any(p != _CPU for p in resolved)
        if (trt_fp16 or trt_engine_cache is not None) and PROVIDERS["tensorrt"] not in resolved:
            raise UserInputError("trt_fp16 / trt_engine_cache need the tensorrt provider (--device tensorrt)")
        if io_binding and not gpu:
            raise UserInputError("io_binding needs a GPU provider (cuda or tensorrt); the CPU runs session.run")
        self._model_bytes = bytes(onnx_path) if isinstance(onnx_path, bytes) else None
        self.onnx_path = Path(onnx_path) if not isinstance(onnx_path, bytes) else Path("in-memory.onnx")
        device = f"cuda:{device_id}" if gpu and device_id else ("cuda" if gpu else "cpu")
        super().__init__(name=name if name is not None else self.onnx_path.stem, device=device)
        self.providers = resolved
        self.intra_op_threads = intra_op_threads
        self.graph_optimization_level = graph_optimization_level
        self.allow_spinning = allow_spinning
        self.device_id = device_id
        self.trt_fp16 = trt_fp16
        self.trt_engine_cache = Path(trt_engine_cache) if trt_engine_cache is not None else None
        self.io_binding = gpu if io_binding is None else bool(io_binding)
        self.profile_placement = gpu if placement is None else bool(placement)
        self.allow_cpu_nodes = allow_cpu_nodes
        self.providers_in_use: tuple[str, ...] = ()
        self.placement: dict[str, dict[str, Any]] | None = None
        self.gpu_times_s: list[float] = []
        self._session: Any = None
        self._ort: Any = None
        self._binding: Any = None
        self._device_inputs: dict[str, Any] = {}
        self._output_names: list[str] = []
        self._profile_dir: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options: Any) -> OrtRunner:
        """``OrtRunner(path, **options)``."""
        return cls(path, **options)

    @classmethod
    def run_dir_file(cls, run_dir: RunDir, which: str) -> Path:
        """``dense.onnx`` or ``model.onnx``."""
        return run_dir.onnx(which)

    @classmethod
    def bench_runners(cls, run_dir: str | os.PathLike[str], **options: Any) -> dict[str, Runner]:
        """Dense and compressed, plus ``dense_int8`` / ``compressed_int8`` when ``export quantize`` wrote them.

        All four are timed interleaved in one run (the harness rotates any number of runners).
        """
        from lowrank_core.rundir import MODELS, RunDir, quantized_key

        runners = super().bench_runners(run_dir, **options)
        rd = RunDir(run_dir)
        if all(rd.quantized(key, "int8").is_file() for key in MODELS):
            for key in MODELS:
                name = quantized_key(key, "int8")
                runners[name] = cls.from_path(rd.quantized(key, "int8"), **{**options, "name": name})
        return runners

    @classmethod
    def cli_options(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """``--device`` (cpu, cuda, tensorrt) → providers, ``--threads``, ``--spin``, and the GPU flags.

        GPU flags: ``--trt-fp16``, ``--trt-engine-cache DIR``, ``--no-io-binding``, ``--no-cpu-nodes``
        (each read only when present in ``args``).

        Raises:
            UserInputError: for an unknown device, or TensorRT EP flags without ``--device tensorrt``.
        """
        device = str(args.get("device") or "cpu")
        if device not in DEVICE_PROVIDERS:
            raise UserInputError(f"unknown --device {device!r} for ort; use one of: {', '.join(DEVICE_PROVIDERS)}")
        options: dict[str, Any] = {
            "providers": DEVICE_PROVIDERS[device],
            "intra_op_threads": args.get("threads"),
            "allow_spinning": bool(args.get("spin", False)),
        }
        trt_fp16, cache = bool(args.get("trt_fp16")), args.get("trt_engine_cache")
        if (trt_fp16 or cache) and device != "tensorrt":
            raise UserInputError("--trt-fp16 / --trt-engine-cache apply to --device tensorrt only")
        if trt_fp16:
            options["trt_fp16"] = True
        if cache:
            options["trt_engine_cache"] = cache
        if device != "cpu":
            if args.get("no_io_binding"):
                options["io_binding"] = False
            if args.get("no_cpu_nodes"):
                options["allow_cpu_nodes"] = False
        return options

    @classmethod
    def cli_env(cls, args: Mapping[str, Any]) -> dict[str, Any]:
        """The intra-op thread setting (and the TensorRT EP settings with ``--device tensorrt``)."""
        env: dict[str, Any] = {"ort_intra_op_threads": args.get("threads")}
        if args.get("device") == "tensorrt":
            cache = args.get("trt_engine_cache")
            env.update(ort_trt_fp16=bool(args.get("trt_fp16")), ort_trt_engine_cache=str(cache) if cache else None)
        return env

    def provider_options(self) -> list[tuple[str, dict[str, str]]]:
        """``(provider, options)`` pairs passed to ``InferenceSession(providers=...)``, in priority order."""
        out: list[tuple[str, dict[str, str]]] = []
        for provider in self.providers:
            opts: dict[str, str] = {}
            if provider == PROVIDERS["cuda"]:
                opts = {"device_id": str(self.device_id)}
            elif provider == PROVIDERS["tensorrt"]:
                opts = {"device_id": str(self.device_id), "trt_fp16_enable": str(self.trt_fp16)}
                if self.trt_engine_cache is not None:
                    cache = str(self.trt_engine_cache)
                    opts.update(
                        trt_engine_cache_enable="True",
                        trt_engine_cache_path=cache,
                        trt_timing_cache_enable="True",
                        trt_timing_cache_path=cache,
                    )
            out.append((provider, opts))
        return out

    def activate_impl(self) -> None:
        """Check the installation and providers, then create the session (and the device bindings)."""
        ort = _import_ort()
        problem = ort_install_problem()
        gpu = self.device != "cpu"
        available = ort.get_available_providers()
        for provider in self.providers:
            if provider not in available:
                fix = (
                    f"; {problem}"
                    if problem
                    else f"; install {_PROVIDER_PACKAGES[provider]} instead of the CPU-only package"
                )
                raise RuntimeUnavailableError(
                    f"ONNX Runtime provider {provider} is not available in the installed onnxruntime "
                    f"{ort.__version__} (available: {', '.join(available)}){fix}"
                )
        if problem:
            if gpu:
                raise RuntimeUnavailableError(problem)
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
        if self._model_bytes is None and not self.onnx_path.is_file():
            raise UserInputError(f"ONNX file {str(self.onnx_path)!r} does not exist")
        if self.trt_engine_cache is not None:
            self.trt_engine_cache.mkdir(parents=True, exist_ok=True)
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[self.graph_optimization_level]
        )
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if gpu and not self.allow_cpu_nodes:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if self.profile_placement:
            self._profile_dir = tempfile.TemporaryDirectory(prefix="ort-profile-")
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(self._profile_dir.name) / "ort")
        options.log_severity_level = 3
        errors = _ort_errors()
        try:
            source = self._model_bytes if self._model_bytes is not None else str(self.onnx_path)
            session = ort.InferenceSession(source, sess_options=options, providers=self.provider_options())
        except errors as exc:
            self._cleanup_profile()
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(f"ONNX Runtime cannot load {str(self.onnx_path)!r}: {first_line}") from None
        in_use = tuple(session.get_providers())
        fell_back = [p for p in self.providers if p not in in_use]
        if fell_back:
            self._cleanup_profile()
            raise RuntimeUnavailableError(
                f"ONNX Runtime could not initialise {', '.join(fell_back)} for {self.onnx_path.name} "
                f"and fell back to {', '.join(in_use)}; check that the CUDA/cuDNN/TensorRT libraries "
                f"match onnxruntime-gpu {ort.__version__}"
            )
        self._ort = ort
        self._session = session
        self.providers_in_use = in_use
        self._output_names = [o.name for o in session.get_outputs()]
        self.placement = None
        self.gpu_times_s = []
        self._device_inputs = {}
        self._binding = None
        if self.io_binding:
            self._binding = session.io_binding()
            for out_name in self._output_names:
                self._binding.bind_output(out_name, "cuda", self.device_id)

    @property
    def output_names(self) -> list[str]:
        """Output names of the active session, in model order (empty before :meth:`activate`)."""
        return list(self._output_names)

    def get_input_metadata_impl(self) -> Mapping[str, TensorMeta]:
        """Read names, dtypes and shapes (symbolic dims as strings or ``None``) from the session."""
        meta = {}
        for node in self._session.get_inputs():
            dtype = _ORT_TYPES.get(node.type)
            if dtype is None:
                raise UserInputError(
                    f"input {node.name!r} of {self.onnx_path.name} has type {node.type}, which this runner "
                    "does not feed"
                )
            shape = None if node.shape is None else tuple(node.shape)
            meta[node.name] = TensorMeta(np.dtype(dtype), shape)
        return meta

    def infer_impl(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run the session (host arrays in and out); with I/O binding, time the device part alone."""
        bound = self._binding is not None
        outputs = self._run_bound(feed) if bound else self._session.run(self._output_names, dict(feed))
        if self.profile_placement and self.placement is None:
            self._record_placement()
        return dict(zip(self._output_names, outputs, strict=True))

    def deactivate_impl(self) -> None:
        """Drop the bindings and the session."""
        self._binding = None
        self._device_inputs = {}
        self._session = None
        self._cleanup_profile()

    def memory(self) -> dict[str, Any]:
        """RSS, plus NVML device memory in use on a GPU provider."""
        mem = super().memory()
        if self.device != "cpu":
            from lowrank_core.device import try_nvml_device

            nvml, reason = try_nvml_device(self.device_id)
            mem["nvml_memory_used_bytes"] = nvml["memory_used_bytes"] if nvml else None
            if nvml is None:
                mem["nvml_unavailable"] = reason
        return mem

    def info(self) -> dict[str, Any]:
        """Backend, device, file, providers (requested, in use, options), threads, binding and placement."""
        out = super().info()
        out.update(
            onnx_path=str(self.onnx_path),
            providers_requested=list(self.providers),
            providers_in_use=list(self.providers_in_use),
            intra_op_threads=self.intra_op_threads,
            graph_optimization_level=self.graph_optimization_level,
            allow_spinning=self.allow_spinning,
        )
        if self.device != "cpu":
            out.update(
                provider_options={name: opts for name, opts in self.provider_options()},
                io_binding=self.io_binding,
                device_timing="run_with_iobinding, inputs and outputs on the device (gpu_times_s); host "
                "latency = host→device copy + run + device→host copy"
                if self.io_binding
                else None,
                allow_cpu_nodes=self.allow_cpu_nodes,
            )
        if self.placement is not None:
            out["placement"] = self.placement
        return out

    # Internals ------------------------------------------------------------------------------------

    def _run_bound(self, feed: Feed) -> list[np.ndarray]:
        """Host → device (into the bound OrtValues), timed ``run_with_iobinding``, device → host."""
        ort, binding = self._ort, self._binding
        for input_name, value in feed.items():
            host = np.ascontiguousarray(value)
            bound = self._device_inputs.get(input_name)
            if bound is None or tuple(bound.shape()) != host.shape:
                bound = ort.OrtValue.ortvalue_from_numpy(host, "cuda", self.device_id)
                self._device_inputs[input_name] = bound
                binding.bind_ortvalue_input(input_name, bound)
            else:
                bound.update_inplace(host)
        start = time.perf_counter()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        self.gpu_times_s.append(time.perf_counter() - start)
        return list(binding.copy_outputs_to_cpu())

    def _record_placement(self) -> None:
        """End profiling after the first inference and refuse a GPU run whose every node ran on the CPU."""
        path = self._session.end_profiling()
        events: list[dict[str, Any]] = []
        if path and Path(path).is_file():
            events = json.loads(Path(path).read_text(encoding="utf-8"))
        self._cleanup_profile()
        self.placement = node_placement(events)
        gpu_providers = [p for p in self.providers if p != _CPU]
        if gpu_providers and self.placement and not any(p in self.placement for p in gpu_providers):
            raise RuntimeUnavailableError(
                f"ONNX Runtime ran every node of {self.onnx_path.name} on {', '.join(self.placement)} although "
                f"{', '.join(gpu_providers)} was requested (silent CPU fallback); check the CUDA/TensorRT setup"
            )

    def _cleanup_profile(self) -> None:
        if self._profile_dir is not None:
            self._profile_dir.cleanup()
            self._profile_dir = None


def _ort_errors() -> tuple[type[BaseException], ...]:
    """Exception types ONNX Runtime raises for unreadable or invalid models."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
