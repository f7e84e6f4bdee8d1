"""Reading an ONNX model given as input: validation, concrete input shapes, shapes of every tensor, ORT runs.

Everything a user's ONNX file can get wrong (unreadable bytes, external data outside its folder, an
initializer smaller than its dims, a cycle, a tensor nobody produces, inputs too large for the machine)
is one line of :class:`~lowrank_core.errors.UserInputError` before anything is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowrank_core.checks import check_memory
from lowrank_core.errors import UserInputError

__all__ = [
    "MAX_ELEMENTS",
    "InputSpec",
    "float_params",
    "input_specs",
    "load_input_model",
    "ort_run",
    "seeded_feeds",
    "tensor_shapes",
]

#: Largest tensor (elements) accepted in an initializer or an inferred activation: 2**31, i.e. 8 GiB of float32.
MAX_ELEMENTS = 2**31
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]


def load_input_model(source: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Load and validate the ONNX model to compress (a path or a ``ModelProto`` with its data loaded).

    External data is read only from files inside the model's folder. The returned graph is
    topologically sorted (an unsorted but acyclic graph, as some exporters write, is sorted).

    Raises:
        UserInputError: one line naming the problem (unreadable, external data outside the folder,
            inconsistent initializer, cycle, a tensor nobody produces, checker failure).
    """
    if isinstance(source, onnx.ModelProto):
        model, where = onnx.ModelProto(), "the ONNX model"
        model.CopyFrom(source)
        folder = None
    else:
        path = Path(source)
        where = repr(str(path))
        if not path.is_file():
            raise UserInputError(f"ONNX file {where} does not exist; check MODEL=path/to/model.onnx")
        if path.stat().st_size == 0:
            raise UserInputError(f"ONNX file {where} is empty (an interrupted download or write?)")
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, OSError, ValueError, RuntimeError) as exc:
            raise UserInputError(f"{where} is not a readable ONNX model ({_one_line(exc)})") from None
        folder = path.resolve().parent
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise UserInputError(f"{where} is not an ONNX model (no graph or opset)")
    _load_external(model, folder, where)
    _check_initializers(model, where)
    _toposort_(model, where)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise UserInputError(f"{where} is not a valid ONNX model ({_one_line(exc)})") from None
    return model


def _load_external(model: onnx.ModelProto, folder: Path | None, where: str) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor

    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if folder is None:
            raise UserInputError(f"{where} keeps tensor {tensor.name!r} in external data: pass the .onnx path instead")
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise UserInputError(
                f"{where}: external data of {tensor.name!r} points outside the model's folder ({location!r}); refused"
            )
        if not target.is_file():
            raise UserInputError(f"{where}: external data file {location!r} of {tensor.name!r} is missing")
        try:
            load_external_data_for_tensor(tensor, str(folder))
        except (OSError, ValueError) as exc:
            raise UserInputError(
                f"{where}: external data of {tensor.name!r} cannot be read ({_one_line(exc)})"
            ) from None
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and its subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                tensors.extend(_all_tensors(g))
    return tensors


def _check_initializers(model: onnx.ModelProto, where: str) -> None:
    """Every initializer's dims are sane and its data holds exactly that many elements."""
    for init in model.graph.initializer:
        if any(d < 0 for d in init.dims):
            raise UserInputError(f"{where}: initializer {init.name!r} has negative dims {list(init.dims)}")
        numel = math.prod(init.dims)
        if numel > MAX_ELEMENTS:
            raise UserInputError(
                f"{where}: initializer {init.name!r} declares {numel:,} elements (dims {list(init.dims)})"
            )
        if init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        try:
            held = onnx.numpy_helper.to_array(init).size
        except (ValueError, TypeError) as exc:
            raise UserInputError(
                f"{where}: initializer {init.name!r} (dims {list(init.dims)}) cannot be read ({_one_line(exc)})"
            ) from None
        if held != numel:
            raise UserInputError(
                f"{where}: initializer {init.name!r} declares dims {list(init.dims)} but holds {held} elements"
            )


def _toposort_(model: onnx.ModelProto, where: str) -> None:
    """Sort the main graph's nodes; refuse a cycle or a tensor that no node, input or initializer provides."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producers: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = idx
    for node in graph.node:
        for name in node.input:
            if name not in known and name not in producers:
                what = node.name or node.op_type
                raise UserInputError(
                    f"{where}: node {what!r} reads {name!r}, which no node, graph input or initializer provides "
                    "(a missing initializer?)"
                )
    for out in graph.output:
        if out.name not in known and out.name not in producers:
            raise UserInputError(f"{where}: graph output {out.name!r} is produced by no node")
    deps = [
        {producers[n] for n in (*node.input, *_subgraph_inputs(node)) if n in producers and n not in known}
        for node in graph.node
    ]
    order: list[int] = []
    done: set[int] = set()
    remaining = list(range(len(graph.node)))
    while remaining:
        ready = [i for i in remaining if deps[i] <= done]
        if not ready:
            node = graph.node[remaining[0]]
            raise UserInputError(f"{where}: the graph has a cycle (through node {node.name or node.op_type!r})")
        order.extend(ready)
        done.update(ready)
        ready_set = set(ready)
        remaining = [i for i in remaining if i not in ready_set]
    if order != sorted(order):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If/Loop bodies) read from the outer scope (roughly: every input they use)."""
    names: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_inputs(n))
    return names


@dataclass(frozen=True)
class InputSpec:
    """A graph input with concrete dims: name, shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def input_specs(model: onnx.ModelProto, *, batch: int = 1, input_size: int | None = None) -> list[InputSpec]:
    """The graph inputs with every dim concrete: a symbolic first dim is ``batch``, symbolic H/W ``input_size``.

    Raises:
        UserInputError: an input with unknown rank, a symbolic dim that no option fixes, a fixed spatial size
            that ``input_size`` contradicts, or an input too large for this machine's memory.
    """
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ttype = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not ttype.HasField("shape"):
            raise UserInputError(f"graph input {vi.name!r} has no tensor shape; only tensor inputs of known rank work")
        rank = len(ttype.shape.dim)
        dims: list[int] = []
        for k, d in enumerate(ttype.shape.dim):
            spatial = rank == 4 and k >= 2
            if d.HasField("dim_value") and d.dim_value > 0:
                if spatial and input_size is not None and d.dim_value != input_size:
                    raise UserInputError(
                        f"INPUT_SIZE={input_size} but input {vi.name!r} of the ONNX model is fixed at "
                        f"{ttype.shape.dim[2].dim_value}x{ttype.shape.dim[3].dim_value}; drop INPUT_SIZE"
                    )
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(batch)
            elif spatial and input_size is not None:
                dims.append(input_size)
            else:
                name = d.dim_param or "?"
                raise UserInputError(
                    f"input {vi.name!r} has a symbolic dimension {k} ({name!r}): pass INPUT_SIZE= for the height "
                    "and width of an image input, or export the model with that dimension fixed"
                )
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"input {vi.name!r} has an unsupported element type {ttype.elem_type}") from None
        if math.prod(dims) > MAX_ELEMENTS:
            raise UserInputError(f"input {vi.name!r} of shape {dims} is too large")
        check_memory((max(8, dims[0]) if dims else 1, *dims[1:]), f"input {vi.name!r}")
        specs.append(InputSpec(vi.name, tuple(dims), dtype))
    if not specs:
        raise UserInputError("the ONNX model has no graph input (everything is constant): nothing to run")
    return specs


def seeded_feeds(specs: Sequence[InputSpec], seed: int, *, batch: int | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats, integers in [0, 2), booleans at random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.shape if batch is None or not spec.shape else (batch, *spec.shape[1:])
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return feeds


def _with_concrete_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    by_name = {s.name: s for s in specs}
    for vi in fixed.graph.input:
        spec = by_name.get(vi.name)
        if spec is None:
            continue
        for d, value in zip(vi.type.tensor_type.shape.dim, spec.shape, strict=True):
            d.Clear()
            d.dim_value = value
    return fixed


def tensor_shapes(
    model: onnx.ModelProto, specs: Sequence[InputSpec], needed: Sequence[str] = ()
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the graph's tensors at ``specs`` (shape inference; ONNX Runtime for ``needed`` ones it misses).

    Raises:
        UserInputError: an inferred tensor too large for the machine (a hostile dim deep in the graph).
    """
    fixed = _with_concrete_inputs(model, specs)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        inferred = fixed
    shapes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in (*g.input, *g.value_info, *g.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    missing = [n for n in needed if n and n not in shapes]
    if missing:
        probe = onnx.ModelProto()
        probe.CopyFrom(fixed)
        outputs = {o.name for o in probe.graph.output}
        for name in missing:
            if name not in outputs:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        values = ort_run(probe, seeded_feeds(specs, 0), outputs=missing)
        shapes.update({n: tuple(int(d) for d in v.shape) for n, v in values.items()})
    big = [(n, s) for n, s in shapes.items() if math.prod(s) > MAX_ELEMENTS]
    if big:
        name, shape = big[0]
        raise UserInputError(f"tensor {name!r} of the ONNX model would have shape {list(shape)}: too large to run")
    return shapes


def float_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers: the model's parameters (each initializer once)."""
    return sum(math.prod(i.dims) for i in model.graph.initializer if i.data_type in _FLOAT)


def ort_run(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """Run ``model`` once with ONNX Runtime (CPU, all graph optimizations) and return the named outputs.

    Raises:
        UserInputError: ONNX Runtime cannot load or run the model (one line with its reason).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
        values = session.run(names, dict(feeds))
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, RuntimeException)
        raise UserInputError(f"ONNX Runtime cannot run the model ({_one_line(exc)})") from None
    return dict(zip(names, values, strict=True))
