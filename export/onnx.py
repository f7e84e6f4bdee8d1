"""Export PyTorch models to ONNX, save/load ONNX files, and summarise ONNX graphs.

The loader follows Polygraphy's pattern: :class:`OnnxFromTorch` stores its arguments and does the work
when called, and :func:`onnx_from_torch` is the immediate twin. Both produce the exporter's raw graph;
:func:`export.passes.optimize` cleans it up (BN folding, de-duplication, no-op removal).

Exporter choice. Measured on this project's stack (torch 2.14.1, onnxscript 0.7.2, 2 CPU cores shared
with other jobs, load average 3-4), torchvision resnet34 at 1×3×224×224, one cold run then 3 warm runs:

* ``torch.onnx.export(..., dynamo=True, optimize=True)`` (torch.export + onnxscript optimizer): cold
  3.5-4.2 s, warm median 2.6-2.8 s, 89 nodes. It already folds BatchNorm into Conv (and refuses to
  when the conv weight is shared), eliminates common sub-expressions, keeps a shared parameter as one
  initializer and never makes weights graph inputs. Dynamic batch via ``dynamic_shapes`` works.
  ``optimize()`` adds 0.1-0.3 s (→ GlobalAveragePool/Flatten instead of ReduceMean/Reshape).
* ``dynamo=True, optimize=False``: warm median 2.9 s and 312 nodes (Shape/Expand/CastLike chains that
  build zero biases, unfused BatchNorm); :func:`export.passes.optimize` cleans it to the same 89.
* ``dynamo=False`` (TorchScript): 0.5-2.5 s (very noisy under load), 121 nodes (32 Identity). It is
  deprecated since torch 2.9 (a ``DeprecationWarning`` on every call; the ``fallback`` switch to it
  was removed in 2.11) and gets no fixes; depending on it would break when it is removed.

We use ``dynamo=True, optimize=True``: it is the supported default path on torch 2.11-2.14 and costs
at most a couple of seconds more than TorchScript. Its lowest emitted opset is 18: asking for 17 makes
the exporter log a failed down-conversion traceback (the C converter cannot map ReduceMean-18) and
return opset 18 anyway.
:func:`onnx_from_torch` therefore requires ``opset >= 18``; a lower target (e.g. 17 for an old
TensorRT) is reached by :func:`export.passes.optimize` with ``opset=17`` *after* the clean-up passes,
when the graph no longer contains ReduceMean.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from export._util import eval_mode, first_line
from lowrank_core.errors import ExportError, UserInputError
from lowrank_core.io import atomic_write_onnx

if TYPE_CHECKING:
    import torch

__all__ = [
    "MIN_EXPORT_OPSET",
    "OnnxFromTorch",
    "graph_summary",
    "load_onnx",
    "onnx_from_torch",
    "save_onnx",
]

#: Lowest opset the torch.export-based exporter emits natively (torch 2.9–2.14).
MIN_EXPORT_OPSET = 18
#: Protobuf cannot serialise a message of 2 GiB or more; we never write external data.
_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


class OnnxFromTorch:
    """Lazily export a PyTorch model to an ONNX ``ModelProto`` (Polygraphy-style loader).

    Nothing happens at construction; each call runs :func:`onnx_from_torch` with the stored arguments.
    ``model`` and ``example_input`` may be given as values or as zero-argument callables that return
    them (an ``nn.Module`` is always taken as a value, although it is callable).

    Args:
        model: The model, or a callable returning it.
        example_input: An example input tensor (batch first), or a callable returning it.
        opset: ONNX opset to export (at least :data:`MIN_EXPORT_OPSET`).
        dynamic_batch: Make dimension 0 of the input and output symbolic (``"batch"``).
        input_name: Name of the graph input.
        output_name: Name of the graph output.
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        example_input: torch.Tensor | Callable[[], torch.Tensor],
        *,
        opset: int = MIN_EXPORT_OPSET,
        dynamic_batch: bool = False,
        input_name: str = "input",
        output_name: str = "output",
    ) -> None:
        self.model = model
        self.example_input = example_input
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.input_name = input_name
        self.output_name = output_name

    def __call__(self) -> onnx.ModelProto:
        """Export the model and return the ONNX model."""
        import torch

        model = self.model if isinstance(self.model, torch.nn.Module) else self.model()
        example = self.example_input
        if not isinstance(example, torch.Tensor) and callable(example):
            example = example()
        return onnx_from_torch(
            model,
            example,
            opset=self.opset,
            dynamic_batch=self.dynamic_batch,
            input_name=self.input_name,
            output_name=self.output_name,
        )


def onnx_from_torch(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    *,
    opset: int = MIN_EXPORT_OPSET,
    dynamic_batch: bool = False,
    input_name: str = "input",
    output_name: str = "output",
) -> onnx.ModelProto:
    """Export ``model`` to ONNX with the torch.export-based exporter and return the model proto.

    The model is traced in eval mode (every submodule's previous ``training`` flag is restored
    afterwards) and must hold float32 parameters on the CPU. Weights become initializers (never graph
    inputs), everything lives in the one proto (no external data), and a parameter object used by
    several modules stays a single initializer consumed by several nodes.

    Args:
        model: Model with a single tensor input and a single tensor output.
        example_input: Example input, batch first; cast to contiguous float32 on the CPU.
        opset: ONNX opset to export, at least :data:`MIN_EXPORT_OPSET` (see the module docstring for
            how to reach opset 17).
        dynamic_batch: Make dimension 0 of the input and output symbolic (``"batch"``).
        input_name: Name of the graph input.
        output_name: Name of the graph output. A model with several outputs (a wrapped segmentation or
            detection model) names them with its ``output_names`` attribute when this is left at ``"output"``.

    Returns:
        The exported (unoptimized) ONNX model; run :func:`export.passes.optimize` on it.

    Raises:
        UserInputError: on a non-module model, a non-float input, a model not in float32 on the CPU,
            too low an opset, or weights too large for a single 2 GB file.
        ExportError: if the exporter fails.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"onnx_from_torch needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise UserInputError(
            "example_input must be a floating-point torch.Tensor (batch first), got "
            f"{type(example_input).__name__}"
            + (f" of dtype {example_input.dtype}" if isinstance(example_input, torch.Tensor) else "")
        )
    if not isinstance(opset, int) or opset < MIN_EXPORT_OPSET:
        raise UserInputError(
            f"opset {opset!r} is below {MIN_EXPORT_OPSET}, the lowest opset the torch.export-based "
            f"exporter emits; export at {MIN_EXPORT_OPSET} and convert with "
            f"export.passes.optimize(model, opset={opset})"
        )
    _check_float32_cpu(model)

    x = example_input.detach().to(device="cpu", dtype=torch.float32).contiguous()
    dynamic_shapes = None
    if dynamic_batch:
        if x.dim() == 0:
            raise UserInputError("dynamic_batch needs an example input with a batch dimension")
        if x.shape[0] == 1:
            # torch.export specialises size-1 dims on some torch versions; an eval-mode CNN is batch-independent.
            x = x.expand(2, *x.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch")},)

    with eval_mode(model), _quiet_exporter():
        try:
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=[input_name],
                output_names=_output_names(model, output_name),
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # any tracing/translation failure becomes one actionable line
            raise ExportError(
                f"torch.onnx.export (dynamo) failed for {type(model).__name__}: {first_line(exc)}"
            ) from exc
        if program is None:
            raise ExportError(f"torch.onnx.export returned no program for {type(model).__name__}")
        proto = program.model_proto

    if len(proto.graph.input) != 1:
        raise ExportError(
            f"{type(model).__name__} exported with {len(proto.graph.input)} graph inputs "
            f"({[i.name for i in proto.graph.input]}); expected exactly one (weights must be initializers)"
        )
    return proto


def save_onnx(model_proto: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model_proto`` to ``path`` as one self-contained file, atomically.

    The bytes go to a temporary file in the same folder, which is renamed onto ``path`` only once it
    is complete.

    Returns:
        The destination path.

    Raises:
        ExportError: if the model does not fit in one protobuf file (2 GB).
    """
    return atomic_write_onnx(model_proto, path)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and structurally validate an ONNX file.

    Returns:
        The model proto, with any external data loaded.

    Raises:
        UserInputError: if the file is missing, empty, not a protobuf ONNX model, or fails the ONNX
            checker; the one-line message names the file and the fix.
    """
    p = Path(path)
    fix = "re-export it with `python -m export onnx --run-dir DIR`"
    if not p.is_file():
        raise UserInputError(f"ONNX file {str(p)!r} does not exist; check the path or {fix}")
    if p.stat().st_size == 0:
        raise UserInputError(f"ONNX file {str(p)!r} is empty (an interrupted write?); {fix}")
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(p))
    except (DecodeError, OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:  # external data too
        raise UserInputError(f"{str(p)!r} is not a readable ONNX model ({first_line(exc)}); {fix}") from None
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise UserInputError(f"{str(p)!r} is not an ONNX model (no graph or opset); {fix}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise UserInputError(f"{str(p)!r} is not a valid ONNX model ({first_line(exc)}); {fix}") from None
    return model


def graph_summary(model_proto: onnx.ModelProto, *, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Summarise an ONNX graph: opset, op counts, initializers, parameters and sharing.

    Only the top-level graph is counted (CNN exports have no subgraphs).

    Args:
        model_proto: The model.
        path: File the model was read from or written to; gives ``file_bytes`` (``None`` otherwise).

    Returns:
        A JSON-serialisable dict with ``opset``, ``ir_version``, ``inputs``/``outputs`` (name → shape,
        symbolic dimensions as strings), ``n_nodes``, ``node_counts`` (op type → count, most frequent
        first), ``n_initializers``, ``initializer_bytes``, ``n_params`` (elements of floating-point
        initializers), ``shared_initializers`` (name → number of consuming nodes, for those consumed
        by more than one node), ``proto_bytes`` and ``file_bytes``.
    """
    graph = model_proto.graph
    counts = Counter(node.op_type for node in graph.node)
    init_names = {init.name for init in graph.initializer}
    consumers: Counter[str] = Counter()
    for node in graph.node:
        for name in set(node.input) & init_names:
            consumers[name] += 1
    n_params = 0
    n_bytes = 0
    for init in graph.initializer:
        numel = math.prod(init.dims)
        n_bytes += numel * _itemsize(init.data_type)
        if init.data_type in _FLOAT_TYPES:
            n_params += numel
    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "ir_version": model_proto.ir_version,
        "inputs": {vi.name: _shape_of(vi) for vi in graph.input if vi.name not in init_names},
        "outputs": {vi.name: _shape_of(vi) for vi in graph.output},
        "n_nodes": len(graph.node),
        "node_counts": dict(counts.most_common()),
        "n_initializers": len(graph.initializer),
        "initializer_bytes": n_bytes,
        "n_params": n_params,
        "shared_initializers": {name: n for name, n in sorted(consumers.items()) if n > 1},
        "proto_bytes": model_proto.ByteSize(),
        "file_bytes": Path(path).stat().st_size if path is not None and Path(path).is_file() else None,
    }


def _output_names(model: torch.nn.Module, output_name: str) -> list[str]:
    """``[output_name]``, or the model's own ``output_names`` (several named outputs) when left at the default."""
    own = getattr(model, "output_names", None)
    if output_name == "output" and isinstance(own, (tuple, list)) and own and all(isinstance(n, str) for n in own):
        return list(own)
    return [output_name]


def _check_float32_cpu(model: torch.nn.Module) -> None:
    """Raise UserInputError unless every floating parameter/buffer is float32 on the CPU."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu" or (tensor.is_floating_point() and tensor.dtype != torch.float32):
            raise UserInputError(
                f"model tensor {name!r} is {tensor.dtype} on {tensor.device}; export needs float32 on the "
                "CPU: call model.float().cpu() first"
            )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's log records and deprecation warnings, for this call only."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _itemsize(data_type: int) -> int:
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


def _shape_of(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
