"""Numeric parity between a PyTorch model and its ONNX export, reported as a structured result.

Follows Polygraphy's ``OutputCompareResult`` / ``CompareFunc.simple``: its ``elemwise`` check fails an
element with ``absdiff > atol`` **and** ``reldiff > rtol`` (``reldiff = absdiff / |reference|``). On an
output of large scale that rule misfires where values cross zero: float32 rounding of a few 1e-6 of the
output's scale is neither below ``atol`` nor small relative to a near-zero reference. So an element
fails only when it is also off by more than ``scale_tol`` times the output's scale (the RMS of the
reference): every element may be off by ``max(atol, rtol·|reference|, scale_tol·scale)``. Both verdicts
are reported (``n_failed_elementwise`` is Polygraphy's alone). Non-finite outputs always fail, named as
such. The result also carries the error statistics, the relative L2 error, cosine similarity and top-1
agreement, and the tolerances that would have been needed to pass.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export._util import eval_mode
from lowrank_core.errors import ExportError, ParityError, UserInputError

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "DEFAULT_SCALE_TOL",
    "ParityResult",
    "check_onnx_parity",
    "compare_outputs",
]

#: Default tolerances for float32 ONNX Runtime (CPU EP) vs PyTorch (CPU), Polygraphy elementwise
#: semantics. Measured on torchvision models with random weights and randomised BatchNorm statistics
#: (optimized graphs, 4 batches of 1); "atol needed" is at rtol=1e-3, "rtol needed" at atol=1e-4:
#:
#:   model @ input      max |y|  max_abs  rel_l2   atol needed  rtol needed
#:   resnet18 @ 64          7.7   6.4e-6   6.7e-7       2.1e-6            0
#:   resnet50 @ 64          411   4.1e-4   9.6e-7       1.4e-4       1.3e-2
#:   vgg11_bn @ 64         0.94   1.3e-6   1.5e-6       1.3e-6            0
#:   mobilenet_v2 @ 64     0.55   2.5e-7   4.2e-7            0            0
#:   resnet34 @ 224         789   4.3e-4   4.0e-7            0       4.4e-5
#:   resnet50 @ 224        1030   6.7e-4   5.6e-7       2.4e-4       1.7e-3
#:
#: Errors are float32 rounding (rel_l2 <= 1.5e-6) that scales with the output magnitude, which random
#: weights inflate (trained logits are 10-100x smaller). ``atol = rtol = 1e-3`` passes the worst case
#: (resnet50 @ 224, outputs ~1e3; 2.8e-4 before optimization) with a 3.5x margin and realistic
#: outputs with >100x; Polygraphy's 1e-5 fails resnet34/50. A wrong export (e.g. a mis-folded
#: BatchNorm) is off by far more than 1e-2.
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-3
#: Tolerance relative to the output's scale (RMS of the reference). deeplabv3_resnet101 @ 128 with random
#: weights (output RMS 686, max |y| 2008): max_abs 2.4e-3 = 3.5e-6 x RMS, rel_l2 5.9e-7, yet 20 of 688128
#: elements fail atol = rtol = 1e-3, all near zero crossings (median |y| 0.18-0.75 there). PyTorch's own
#: float32 output fails the same rule against its float64 output (3 elements, max_abs 1.8e-3), so the
#: rule refused float32 itself. 1e-4 leaves a 30x margin over the worst float32 case measured; a wrong
#: export (a 1 % weight change, a mis-folded BatchNorm eps) is off by 1e-3 to 1e-1 of the scale.
DEFAULT_SCALE_TOL = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """Outcome of comparing an output against its reference, element by element.

    Attributes:
        max_abs: Largest absolute difference.
        mean_abs: Mean absolute difference.
        median_abs: Median absolute difference.
        max_rel: Largest relative difference ``absdiff / |reference|`` (``inf`` where the reference is
            0 and the output is not).
        mean_rel: Mean relative difference over elements with a non-zero reference.
        rel_l2: ``‖reference − actual‖₂ / ‖reference‖₂``.
        cosine: Cosine similarity of the flattened tensors.
        top1_agreement: Fraction of rows whose arg-max agrees, for 2-D outputs; ``None`` otherwise.
        n_elements: Number of compared elements.
        shape: Shape of the compared tensors.
        atol: Absolute tolerance used.
        rtol: Relative tolerance used.
        passed: No element had ``absdiff > atol``, ``reldiff > rtol`` and ``absdiff > scale_tol * scale``,
            and no value of either side is NaN or infinite.
        n_failed: Number of elements failing: violating all three tolerances, or non-finite on either side.
        required_atol: Smallest ``atol`` that would pass at this ``rtol`` and ``scale_tol``.
        required_rtol: Smallest ``rtol`` that would pass at this ``atol`` and ``scale_tol``.
        scale: The output's scale, the RMS of the finite reference values.
        scale_tol: Tolerance relative to ``scale``.
        max_abs_scaled: ``max_abs / scale`` (``inf`` for a zero scale and a non-zero difference).
        required_scale_tol: Smallest ``scale_tol`` that would pass at this ``atol`` and ``rtol``.
        passed_elementwise: Polygraphy's verdict, ``atol``/``rtol`` alone.
        n_failed_elementwise: Elements violating ``atol`` and ``rtol`` (Polygraphy's count).
        nonfinite: NaN and infinity counts, ``{"reference": {"nan", "inf"}, "actual": {"nan", "inf"}}``.
        n_nonfinite: Elements that are NaN or infinite on either side (at most ``n_elements``).
        outputs: Per named output (ONNX output name → this record's fields for that output alone), set
            by :func:`check_onnx_parity`; ``None`` for a single comparison (then left out of :meth:`to_dict`).
        sides: How messages name the reference and the checked side (not in :meth:`to_dict`).
    """

    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mean_rel: float
    rel_l2: float
    cosine: float
    top1_agreement: float | None
    n_elements: int
    shape: tuple[int, ...]
    atol: float
    rtol: float
    passed: bool
    n_failed: int = 0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    scale: float = 0.0
    scale_tol: float = 0.0
    max_abs_scaled: float = 0.0
    required_scale_tol: float = 0.0
    passed_elementwise: bool = True
    n_failed_elementwise: int = 0
    nonfinite: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    n_nonfinite: int = 0
    outputs: dict[str, dict[str, Any]] | None = dataclasses.field(default=None, hash=False, compare=False)
    sides: tuple[str, str] = dataclasses.field(default=("reference", "actual"), hash=False, compare=False)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        top1 = "" if self.top1_agreement is None else f" top1={self.top1_agreement:.4f}"
        stats = (
            f"max_abs={self.max_abs:.3g} mean_abs={self.mean_abs:.3g} median_abs={self.median_abs:.3g} "
            f"max_rel={self.max_rel:.3g} mean_rel={self.mean_rel:.3g} rel_l2={self.rel_l2:.3g} "
            f"cosine={self.cosine:.8f}{top1} max_abs/scale={self.max_abs_scaled:.3g} (scale = RMS "
            f"{self.scale:.3g}) shape={list(self.shape)} with atol={self.atol:g} rtol={self.rtol:g} "
            f"scale_tol={self.scale_tol:g}"
        )
        if self.n_nonfinite and not self.passed:
            return f"FAILED ({self.n_failed}/{self.n_elements} elements): {self.nonfinite_text()}"
        if self.passed:
            note = ""
            if not self.passed_elementwise:
                note = (
                    f"; atol/rtol alone would fail {self.n_failed_elementwise} elements, each within "
                    f"scale_tol x scale (float32 rounding where an output of this scale crosses zero)"
                )
            return f"PASSED: {stats}{note}"
        return (
            f"FAILED ({self.n_failed}/{self.n_elements} elements): {stats}; would pass with "
            f"atol>={self.required_atol:.3g} or rtol>={self.required_rtol:.3g} or "
            f"scale_tol>={self.required_scale_tol:.3g} (each with the other two unchanged)"
        )

    def nonfinite_text(self) -> str:
        """The NaN/infinite values of each side in words (``""`` when every value is finite)."""
        per_output = {n: r.get("nonfinite") or {} for n, r in (self.outputs or {}).items()}
        if not per_output:
            per_output = {"": self.nonfinite}
        named = {n: c for n, c in per_output.items() if any(sum(side.values()) for side in c.values())}
        parts, ref_bad = [], False
        for name, counts in named.items():
            total = (self.outputs or {}).get(name, {}).get("n_elements", self.n_elements)
            for side, label in zip(("reference", "actual"), self.sides, strict=True):
                kinds = [
                    f"{k} {'NaN' if kind == 'nan' else 'infinite'} value{'s' if k > 1 else ''}"
                    for kind, k in counts[side].items()
                    if k
                ]
                if kinds:
                    ref_bad = ref_bad or side == "reference"
                    what = f"output {name!r}" if name else "output"
                    parts.append(f"{label} {what} has {' and '.join(kinds)} (of {total})")
        if not parts:
            return ""
        ref, act = self.sides
        if ref_bad:
            cause = (
                f"the {ref} model itself computes non-finite values, which no export can match; check its weights "
                "(NaN/infinite values, a BatchNorm running_var < 0) and the input scale"
            )
        else:
            cause = f"the {ref} values are all finite, so the {act} model computes something else"
        return f"{'; '.join(parts)}: {cause}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; non-finite floats (e.g. ``max_rel`` of ``inf``) become ``None``."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if (field.name == "outputs" and value is None) or field.name == "sides":
                continue
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


def compare_outputs(
    reference: Any,
    actual: Any,
    *,
    atol: float,
    rtol: float,
    scale_tol: float = 0.0,
    scale: float | np.ndarray | None = None,
    finite_only: bool = False,
) -> ParityResult:
    """Compare ``actual`` against ``reference`` with Polygraphy's elementwise semantics, scaled to the output.

    An element fails when ``absdiff > atol``, ``absdiff / |reference| > rtol`` and ``absdiff > scale_tol *
    scale``; ``scale_tol=0`` is Polygraphy's rule. NaN or infinite values count as an infinite difference
    unless both tensors hold the same value there (with ``finite_only``, they fail anyway).

    Args:
        reference: Reference values (array-like, e.g. the PyTorch output).
        actual: Values to check (array-like, e.g. the ONNX Runtime output).
        atol: Absolute tolerance, ``>= 0``.
        rtol: Relative tolerance, ``>= 0``.
        scale_tol: Tolerance relative to the output's scale, ``>= 0``.
        scale: The scale (a number, or an array broadcasting to the outputs when several outputs of different
            scales are joined); default the RMS of the finite reference values. For an array the reported
            ``scale`` is its smallest value.
        finite_only: Fail every element that is NaN or infinite on either side (a parity check of a model).

    Returns:
        The structured comparison; truthy when it passed.

    Raises:
        UserInputError: on a negative or non-finite tolerance.
        ParityError: when the shapes differ.
    """
    for name, tol in (("atol", atol), ("rtol", rtol), ("scale_tol", scale_tol)):
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise UserInputError(f"{name} must be a finite number >= 0, got {tol!r}")
    ref = _as_float64(reference)
    act = _as_float64(actual)
    if ref.shape != act.shape:
        raise ParityError(f"output shapes differ: reference {list(ref.shape)} vs actual {list(act.shape)}")
    absdiff, reldiff = _differences(ref, act)
    magnitude = np.abs(ref)
    finite_ref = np.isfinite(ref)
    if scale is None:
        scale = float(np.sqrt(np.mean(np.square(ref[finite_ref])))) if finite_ref.any() else 0.0
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), ref.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(absdiff == 0, 0.0, absdiff / scales)
    scaled = np.where(np.isnan(scaled), np.inf, scaled)

    beyond_abs, beyond_rel, beyond_scale = absdiff > atol, reldiff > rtol, scaled > scale_tol
    elementwise = beyond_abs & beyond_rel  # Polygraphy's rule
    nonfinite = ~finite_ref | ~np.isfinite(act)
    failing = elementwise & beyond_scale
    if finite_only:
        failing = failing | nonfinite
    n = int(ref.size)
    nonzero = magnitude > 0
    rel_l2, cosine, top1 = _agreement(ref, act, absdiff)

    # An element passes if it is within any one tolerance, so the tolerance needed on one axis is the
    # largest difference among the elements the other two do not already cover.
    def needed(values: np.ndarray, uncovered: np.ndarray) -> float:
        return float(values[uncovered].max()) if uncovered.any() else 0.0

    return ParityResult(
        max_abs=float(absdiff.max()) if n else 0.0,
        mean_abs=float(absdiff.mean()) if n else 0.0,
        median_abs=float(np.median(absdiff)) if n else 0.0,
        max_rel=float(reldiff.max()) if n else 0.0,
        mean_rel=float(reldiff[nonzero].mean()) if nonzero.any() else 0.0,
        rel_l2=rel_l2,
        cosine=cosine,
        top1_agreement=top1,
        n_elements=n,
        shape=tuple(int(d) for d in ref.shape),
        atol=float(atol),
        rtol=float(rtol),
        passed=not bool(failing.any()),
        n_failed=int(failing.sum()),
        required_atol=needed(absdiff, beyond_rel & beyond_scale),
        required_rtol=needed(reldiff, beyond_abs & beyond_scale),
        scale=float(scales.min()) if n else 0.0,
        scale_tol=float(scale_tol),
        max_abs_scaled=float(scaled.max()) if n else 0.0,
        required_scale_tol=needed(scaled, elementwise),
        passed_elementwise=not bool(elementwise.any()),
        n_failed_elementwise=int(elementwise.sum()),
        nonfinite={
            side: {"nan": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum())}
            for side, values in (("reference", ref), ("actual", act))
        },
        n_nonfinite=int(nonfinite.sum()),
    )


def _differences(ref: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise absolute and relative differences; NaN/inf count as infinite unless both sides agree."""
    same = (ref == act) | (np.isnan(ref) & np.isnan(act))
    with np.errstate(invalid="ignore", over="ignore"):
        absdiff = np.where(same, 0.0, np.abs(ref - act))
    absdiff = np.where(np.isnan(absdiff), np.inf, absdiff)
    with np.errstate(divide="ignore", invalid="ignore"):
        reldiff = np.where(absdiff == 0, 0.0, absdiff / np.abs(ref))
    reldiff = np.where(np.isnan(reldiff), np.inf, reldiff)
    return absdiff, reldiff


def _agreement(ref: np.ndarray, act: np.ndarray, absdiff: np.ndarray) -> tuple[float, float, float | None]:
    """Relative L2 error, cosine similarity and (for ``(N, classes)`` outputs) top-1 agreement."""
    n = int(ref.size)
    ref_norm = float(np.linalg.norm(ref)) if n else 0.0
    act_norm = float(np.linalg.norm(act)) if n else 0.0
    diff_norm = float(np.sqrt(np.sum(np.square(absdiff)))) if n else 0.0
    rel_l2 = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    if ref_norm > 0 and act_norm > 0:
        with np.errstate(invalid="ignore", over="ignore"):
            cosine = float(np.dot(ref.ravel(), act.ravel()) / (ref_norm * act_norm))
    else:
        cosine = 1.0 if ref_norm == act_norm else 0.0
    top1 = None
    if ref.ndim == 2 and ref.shape[0] > 0 and ref.shape[1] > 0:
        top1 = float(np.mean(np.argmax(ref, axis=1) == np.argmax(act, axis=1)))
    return rel_l2, cosine, top1


def check_onnx_parity(
    torch_model: torch.nn.Module,
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...],
    batches: int = 2,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    scale_tol: float = DEFAULT_SCALE_TOL,
    raise_on_failure: bool = True,
) -> ParityResult:
    """Run a PyTorch model and its ONNX export (ONNX Runtime, CPU) on the same inputs and compare.

    Inputs are ``batches`` standard-normal float32 tensors of ``input_shape`` drawn from
    ``numpy.random.default_rng(seed)`` (the global RNGs are not touched). The PyTorch model runs in
    eval mode under ``torch.inference_mode`` (its modules' training flags are restored afterwards).
    Outputs of all batches are concatenated and compared once with :func:`compare_outputs`, each named
    output at its own scale; NaN or infinite values on either side fail, named in the message.

    Args:
        torch_model: Reference model with one tensor input and one tensor output.
        onnx_model_or_path: The ONNX model, or the path of an ``.onnx`` file.
        input_shape: Input shape including the batch dimension.
        batches: Number of random batches.
        seed: Seed of the input generator.
        atol: Absolute tolerance (see :data:`DEFAULT_ATOL`).
        rtol: Relative tolerance (see :data:`DEFAULT_RTOL`).
        scale_tol: Tolerance relative to each output's RMS (see :data:`DEFAULT_SCALE_TOL`).
        raise_on_failure: Raise :class:`ParityError` instead of returning a failed result.

    Returns:
        The comparison over all batches.

    Raises:
        UserInputError: on a bad shape, batch count or tolerance, or an unreadable model file.
        ExportError: if ONNX Runtime cannot load the model or it has not exactly one input/output.
        ParityError: if the outputs differ in shape or (with ``raise_on_failure``) in value.
    """
    from runtime.ort_runner import OrtRunner

    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise UserInputError(f"input_shape must be positive integers, got {tuple(input_shape)}")
    if batches < 1:
        raise UserInputError(f"batches must be >= 1, got {batches}")

    if isinstance(onnx_model_or_path, (str, os.PathLike)):
        path = Path(onnx_model_or_path)
        if not path.is_file():
            raise UserInputError(f"ONNX file {str(path)!r} does not exist; export it first")
        runner = OrtRunner(path, providers=("cpu",), graph_optimization_level="all")
        what = repr(str(path))
    else:
        runner = OrtRunner(onnx_model_or_path.SerializeToString(), providers=("cpu",), name="onnx")
        what = "the ONNX model"
    try:
        runner.activate()
    except UserInputError as exc:  # ONNX Runtime could not load the model
        raise ExportError(f"ONNX Runtime cannot load {what}: {str(exc).split(': ', 1)[-1]}") from exc
    try:
        tols = (atol, rtol, scale_tol)
        return _compare_with_runner(torch_model, runner, what, shape, batches, seed, tols, raise_on_failure)
    finally:
        runner.deactivate()


def _compare_with_runner(
    torch_model: torch.nn.Module,
    runner: Any,
    what: str,
    shape: tuple[int, ...],
    batches: int,
    seed: int,
    tols: tuple[float, float, float],
    raise_on_failure: bool,
) -> ParityResult:
    import torch

    inputs, outputs = runner.get_input_metadata(), runner.output_names
    if len(inputs) != 1 or not outputs:
        raise ExportError(
            f"parity check needs a model with one input and at least one output; {what} has "
            f"{len(inputs)} inputs and {len(outputs)} outputs"
        )
    input_name, meta = next(iter(inputs.items()))
    declared = list(meta.shape or ())
    if len(declared) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=False)):
        raise UserInputError(f"input_shape {list(shape)} does not match the ONNX input {input_name!r} {declared}")

    rng = np.random.default_rng(seed)
    refs, acts = [], []
    per_ref: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    per_act: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    with eval_mode(torch_model), torch.inference_mode():
        device = next((p.device for p in torch_model.parameters()), torch.device("cpu"))
        for _ in range(batches):
            x = rng.standard_normal(shape, dtype=np.float32)
            ref = torch_model(torch.from_numpy(x).to(device))
            if len(outputs) > 1:  # named outputs (segmentation/detection): every one compared, side by side
                got = runner.infer({input_name: x})
                refs.append(_joined_outputs(ref, got, outputs, "PyTorch"))
                acts.append(_joined_outputs(None, got, outputs, "ONNX Runtime"))
                for name, tensor in zip(outputs, ref, strict=True):
                    per_ref[name].append(tensor.detach().float().cpu().numpy())
                    per_act[name].append(np.asarray(got[name]))
                continue
            if not isinstance(ref, torch.Tensor):
                raise ExportError(f"parity check needs a model returning one tensor, got {type(ref).__name__}")
            refs.append(ref.detach().float().cpu().numpy())
            acts.append(np.asarray(runner.infer({input_name: x})[outputs[0]]))
            if refs[-1].shape != acts[-1].shape:
                raise ParityError(
                    f"output shapes differ: PyTorch {list(refs[-1].shape)} vs ONNX Runtime {list(acts[-1].shape)}"
                )
    if len(outputs) > 1:  # joined: each output's elements judged at that output's own scale
        each = {n: _checked(np.concatenate(per_ref[n]), np.concatenate(per_act[n]), tols) for n in outputs}
        scales = np.concatenate([np.full(r[0][0].size, each[n].scale) for n, r in per_ref.items()])
        result = _checked(np.concatenate(refs), np.concatenate(acts), tols, scale=scales)
    else:
        result = _checked(np.concatenate(refs), np.concatenate(acts), tols)
        each = {outputs[0]: result}
    result = dataclasses.replace(result, outputs={n: r.to_dict() for n, r in each.items()})
    if raise_on_failure and not result.passed:
        failing = ", ".join(n for n, r in each.items() if not r.passed)
        named = f" (outputs {failing})" if len(each) > 1 else ""
        raise ParityError(f"ONNX Runtime output differs from PyTorch{named}: {result}")
    return result


def _checked(
    ref_all: np.ndarray, act_all: np.ndarray, tols: tuple[float, float, float], scale: np.ndarray | None = None
) -> ParityResult:
    """:func:`compare_outputs` of PyTorch vs ONNX Runtime, failed where either side holds NaN/inf."""
    atol, rtol, scale_tol = tols
    result = compare_outputs(ref_all, act_all, atol=atol, rtol=rtol, scale_tol=scale_tol, scale=scale, finite_only=True)
    return dataclasses.replace(result, sides=("PyTorch", "ONNX Runtime"))


def _joined_outputs(reference: Any, onnx_outputs: dict[str, Any], names: list[str], side: str) -> np.ndarray:
    """Several outputs as one ``(batch, Σ elements)`` array (the reference's tensors, or the ONNX ones when ``None``).

    Elementwise tolerances are unchanged by the join, so the joined comparison passes exactly when every
    output passes.
    """
    if reference is None:
        arrays = [np.asarray(onnx_outputs[n]) for n in names]
    else:
        tensors = list(reference) if isinstance(reference, (tuple, list)) else [reference]
        if len(tensors) != len(names):
            raise ParityError(f"{side} returned {len(tensors)} outputs; the ONNX model has {len(names)} ({names})")
        arrays = [t.detach().float().cpu().numpy() for t in tensors]
        for name, arr in zip(names, arrays, strict=True):
            if arr.shape != np.asarray(onnx_outputs[name]).shape:
                raise ParityError(
                    f"output {name!r} shapes differ: PyTorch {list(arr.shape)} vs ONNX Runtime "
                    f"{list(np.asarray(onnx_outputs[name]).shape)}"
                )
    return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)


def _as_float64(values: Any) -> np.ndarray:
    detach = getattr(values, "detach", None)
    if callable(detach):  # a torch tensor: avoid importing torch here
        values = detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)
