"""Planning and applying helpers every method shares, written once.

Skip rules common to every method (not reached by the forward pass, the stem, ``--exclude`` patterns,
``filter_fn``), ``keep`` entries, plan totals, and the module surgery the appliers use.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from compress.attention import attention_paths_in_plan, fused_attention_reason, unfuse_attention_
from compress.factorizations import FACTORIZATIONS, LayerGeometry, dense_macs, factorization
from compress.plan import KEEP, LayerPlan, Plan
from lowrank_core.errors import CompressionError
from lowrank_core.progress import Progress

__all__ = [
    "FilterFn",
    "common_skip_reason",
    "cpu_rank_multiple",
    "find_stem",
    "hw_list",
    "keep_entry",
    "layer_params",
    "layer_progress",
    "one_thread",
    "pair",
    "plan_totals",
    "planned_module",
    "relative_error",
    "set_submodule",
]

FilterFn = Callable[[nn.Module, str], bool]


def cpu_rank_multiple() -> int:
    """Rank multiple that suits this CPU: 16 with AVX-512, else 8.

    ONNX Runtime's NCHWc conv kernels use 16-channel blocks with AVX-512 and 8 otherwise (MLAS
    ``MlasNchwcGetBlockSize``). 16 is also a multiple of 8, so it stays aligned for FP16 tensor cores.
    Measured here (ResNet-34, Tucker-2, RATIO=4, one ORT thread): multiples of 8 gave 3.12× at
    efficiency 0.84, multiples of 16 gave 3.33× at 0.96 (benchmarks/results/resnet34_tucker2_sweep_t1.json).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the per-layer linear algebra on one thread, restoring the setting afterwards.

    Planning is thousands of small float64 eigen-decompositions and products; on a shared 2-core machine
    idle OpenMP workers spinning on busy cores made planning a CIFAR ResNet-56 100× slower (293 s against
    2.8 s single-threaded), and even on an idle machine the small ops do not gain from a second thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``3 → (3, 3)``, ``(3, 1) → (3, 1)``: a conv attribute as a pair of ints."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ``‖ref − approx‖ / ‖ref‖`` in float64 (0 for an all-zero reference)."""
    ref = reference.detach().to(torch.float64).cpu()
    norm = float(torch.linalg.vector_norm(ref))
    if norm == 0.0:
        return 0.0
    err = float(torch.linalg.vector_norm(ref - approx.detach().to(torch.float64).cpu().reshape(ref.shape)))
    return err / norm if math.isfinite(err) else math.inf


def layer_params(module: nn.Module) -> int:
    """Parameters of a Conv2d/Linear: weight plus bias."""
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    return int(module.weight.numel()) + int(bias)


def hw_list(hw: tuple[int, int] | None) -> list[int] | None:
    """A spatial size as a JSON list (``None`` stays ``None``)."""
    return None if hw is None else [int(hw[0]), int(hw[1])]


def find_stem(model: nn.Module, order: Iterable[str], in_channels: int) -> str | None:
    """The first conv (in forward order) that reads the image: the stem."""
    for path in order:
        module = model.get_submodule(path)
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels:
            return path
    return None


def common_skip_reason(
    module: nn.Module,
    path: str,
    geometry: LayerGeometry | None,
    *,
    stem: str | None = None,
    keep_stem: bool = False,
    exclude: Sequence[str] = (),
    filter_fn: FilterFn | None = None,
) -> str | None:
    """Why every method leaves this layer dense, or ``None``: the rules shared by all planners."""
    fused = fused_attention_reason(module)  # before the geometry rule: hooks never see a fused out_proj run
    if fused is not None:
        return fused
    if geometry is None:
        return "not reached by the forward pass (unused or conditional layer)"
    if keep_stem and path == stem:
        return "stem (image-input conv) is left dense by rule: few parameters, most sensitive layer"
    if any(fnmatch.fnmatchcase(path, pat) for pat in exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(module, path):
        return "excluded by filter_fn"
    return None


def keep_entry(path: str, module: nn.Module, geometry: LayerGeometry | None, reason: str) -> LayerPlan:
    """The plan entry of a layer left dense, with the reason."""
    params = layer_params(module)
    macs = dense_macs(module, geometry) if geometry is not None else 0
    return LayerPlan(
        path=path,
        type=type(module).__name__,
        shape=list(module.weight.shape),
        action=KEEP,
        ranks=None,
        reason=reason,
        params_before=params,
        params_after=params,
        macs_before=macs,
        macs_after=macs,
        in_hw=hw_list(geometry.in_hw) if geometry else None,
        out_hw=hw_list(geometry.out_hw) if geometry else None,
    )


def plan_totals(layers: Iterable[LayerPlan], total_params: int, total_macs: int) -> dict[str, int]:
    """Whole-model params/MACs before and after, from the per-layer savings of ``layers``."""
    layers = list(layers)
    return {
        "params_before": int(total_params),
        "params_after": int(total_params - sum(e.params_before - e.params_after for e in layers)),
        "macs_before": int(total_macs),
        "macs_after": int(total_macs - sum(e.macs_before - e.macs_after for e in layers)),
    }


def planned_module(
    model: nn.Module, entry: LayerPlan, plan: Plan, types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> nn.Module:
    """The module a plan entry refers to, checked against the entry (type and weight shape).

    Raises:
        CompressionError: the model has no such layer, or it is not one of ``types`` of the planned shape.
    """
    try:
        module = model.get_submodule(entry.path)
    except AttributeError:
        raise CompressionError(
            f"plan does not match the model: it has no layer {entry.path!r}; was the plan made for {plan.model}?"
        ) from None
    if not isinstance(module, types) or list(module.weight.shape) != list(entry.shape):
        kinds = "/".join(t.__name__ for t in types)
        raise CompressionError(
            f"plan does not match the model: {entry.path} is not a {kinds} of weight shape {entry.shape}"
            f"{'' if not hasattr(module, 'weight') else f' (it has {list(module.weight.shape)})'}"
        )
    return module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (``layer1.0.conv1``) by ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def layer_progress(total: int, desc: str, *, enabled: bool | None = None) -> Progress:
    """Per-layer progress on stderr (:class:`lowrank_core.progress.Progress`): a bar on a terminal, lines in a log.

    ``enabled=False`` silences it. Call ``update(1)`` per finished layer and ``close()`` at the end (or use
    it as a context manager).
    """
    return Progress(total, desc, unit="layer", enabled=enabled)


def apply_factorizations_(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Replace every planned layer of ``model`` by its registered factorization, in place; return ``model``.

    Attention layers whose unfused projections the plan names are unfused first (:mod:`compress.attention`).

    Args:
        model: A fresh base model of the architecture the plan was made for.
        plan: The plan.
        init: ``decompose`` fills the factors from the layer's weights (and records each layer's
            relative weight error in ``plan``); ``empty`` only builds the shapes, for loading saved
            weights afterwards.

    Raises:
        CompressionError: the plan does not match the model (missing layer, other shape).
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    hooi = int(plan.config.get("hooi_iters", 0) or 0)
    unfuse_attention_(model, attention_paths_in_plan(model, (e.path for e in plan.layers)))
    for entry in plan.factorized_layers:
        module = planned_module(model, entry, plan)
        if entry.action not in FACTORIZATIONS:
            raise CompressionError(f"plan names unknown factorization {entry.action!r} for {entry.path}")
        fact = factorization(entry.action, hooi_iters=hooi)
        ranks = tuple(int(r) for r in entry.ranks or ())
        fact.check_ranks(module, ranks)
        if init == "decompose":
            replacement, rel_error = fact.decompose(module, ranks)
            entry.rel_error = float(rel_error)
        else:
            replacement = fact.build(module, ranks).to(device=module.weight.device)
        replacement.train(module.training)
        set_submodule(model, entry.path, replacement)
    return model
