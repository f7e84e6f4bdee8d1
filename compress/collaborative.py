"""Collaborative compression (CC): input-channel pruning and SVD together, per conv, from gradient sensitivities.

Li et al., "Towards Compact CNNs via Collaborative Compression" (CVPR 2021), as specified in
``docs/method-cc.md`` (a restatement of the official code ``yuchaoli/CC`` at ``393e4e8``). Each compressed
conv ``W ∈ R^{O×I×kh×kw}`` has two kinds of *compression units*: its input channels (pruning) and the
singular values of its ``O × I·kh·kw`` unfolding (decomposition, full rank ``R = min(O, I·kh·kw)``, the
fixed bound of B2). The pipeline, in file order:

* gradient statistics ``G = dL/dW`` (§3): the mean over calibration mini-batches of the batch-mean
  cross-entropy gradient, model in eval mode (:func:`gradient_statistics`). Without data ``G ≡ 1``, so
  every score becomes a weight-magnitude / spectral-energy score, and the plan says so loudly;
* per-layer sensitivity curves ``ℓ(c)`` (§4, :func:`sensitivity_curve`) and their weighted exponential
  fit ``ℓ ≈ a·e^{b·c}`` (:func:`fit_exponential`);
* the global rate optimisation (§5, :func:`allocate_reductions`): equal slope ``a_l b_l e^{b_l c_l} = x``
  (or the FLOPs-weighted Lagrangian ``= λ·F_l``), solved exactly by bisection on ``log x``;
* the multi-step heuristic (§6, :func:`heuristic_trajectory`, :func:`unit_scores`): the lowest-scoring
  units (backward term + γ × the "remaining space" forward term) are removed ``interval`` at a time until
  the layer meets its target ``f_l``; final weights are rebuilt from the *original* ``W``;
* the plan (:func:`plan_cc`, registered planner) and its applier (``[Gather] → Conv k×k (I'→r) →
  Conv 1×1 (r→O')`` or ``[Gather] → Conv k×k (I'→O')``), with real channel removal (§7): a pruned input
  channel that comes from a conv → BN → ReLU chain used by this conv alone is removed from that producer
  (its weight rows, or the rows of its final 1×1 when it is decomposed, its bias, the BN's parameters and
  running statistics); elsewhere (the residual stream) a constant-index :class:`ChannelSelect` (an ONNX
  ``Gather``) picks the kept channels.

Resolutions of the spec's open points (§9):

* **B1** the code's equal-slope rule is the default; ``weighting="lagrangian"`` gives ``λ·F_l``.
* **B2** ``R = min(O, I·kh·kw)``.
* **B3** when a decomposition unit is selected, the *smallest* non-zero singular value of the current
  spectrum is removed: the state of a layer is ``(P, r)`` and its current weight is always the rank-``r``
  truncation of the original ``W`` with the columns of ``P`` deleted — exactly the weight the final
  rebuild produces, so every score is computed on the weights that will be deployed, and no index map is
  needed (the candidates are still scored one by one; only which σ goes is fixed).
* **B4** the cap is 0.95 of each layer's MACs in the solver and in the per-layer targets (lowered to what
  the layer can reach at all when that is less, e.g. a 16-input 1×1 conv pruned alone reaches 15/16).
* **B5** gradients are averaged over a seeded calibration subset (``calibration_samples`` images of the
  training split, recorded in the plan), not over the whole training set.
* **B6** reported FLOPs are those of the compressed model's own forward (:func:`compress.metrics.count_macs`,
  i.e. of the exported graph): physically thinned producers save their own MACs too; a ``Gather`` costs
  none; BN is folded and not counted. By default ``flops`` is met in these terms (``flops_measure="model"``:
  the global budget ``T`` is bisected, ``T ≤ flops × MACs``); ``flops_measure="layers"`` is the code's
  ``T = flops × MACs`` over the layers' own §2 costs, which thinning then overshoots (by 2-3 points on
  trained ResNets per the spec; by 13 points, 63 % for 50 %, on an untrained CIFAR ResNet-56 with data).
  The per-layer accounting is recorded beside the measured one (``target["flops_reduction_layers"]``).
* **b ≤ 0** a layer whose fit is unusable (b ≤ 0, or no loss at all, e.g. a conv without gradient) is
  left out of the rate optimisation with ``f_l = 0``: kept, its reason and a plan warning say why.

Deviations made for speed, each documented where it happens: the singular values of the iterates come
from the eigen-decomposition of the Gram matrix of the smaller side (float64; ~10× faster than an SVD,
exact to ~1e-8 relative on the spectrum; the final rebuild uses a full SVD); the sensitivity curve is
evaluated at ``curve_points`` evenly spaced removal counts instead of at every count (``curve_points=0``
restores the code's every-count curve); the forward term of a *channel* candidate keeps the singular
basis of the current weight (its ``Ŵ_u`` is ``Ŵ_t`` with the channel's columns zeroed) instead of
re-decomposing every candidate (``exact_forward=True`` restores the per-candidate decomposition).
The decomposition-only and pruning-only arms (``prune=False`` / ``decompose=False``) use the same
machinery restricted to one kind of unit; their forward term is the same expectation over the remaining
units of that kind (for both kinds it reproduces the code's ``4/(n−1)`` formula).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.api import (
    FilterFn,
    _find_stem,
    _hw,
    _keep_entry,
    _layer_params,
    _set_submodule,
    apply_plan_,
    check_flops,
    planned_module,
    register_applier,
    register_method,
    register_planner,
)
from compress.lowrank import LayerGeometry
from compress.metrics import count_macs, count_params, trace_geometry
from compress.plan import KEEP, LayerPlan, Plan
from lowrank_deploy.errors import CompressionError, UserInputError

__all__ = [
    "DECOMP",
    "MAX_RATE",
    "METHOD",
    "PRUNE",
    "WEIGHT_ONLY_WARNING",
    "ChannelSelect",
    "CollaborativeConfig",
    "ConvShape",
    "LayerDecision",
    "Trajectory",
    "allocate_reductions",
    "cc_compress_",
    "fit_exponential",
    "gradient_batches",
    "gradient_statistics",
    "heuristic_trajectory",
    "plan_cc",
    "sensitivity_curve",
    "unit_scores",
]

METHOD = "cc"
PRUNE = "cc-prune"
"""Action of a layer that stays one conv (input channels deleted and/or output channels thinned)."""
DECOMP = "cc-decomp"
"""Action of a layer that becomes Conv k×k (I'→r) → Conv 1×1 (r→O')."""
MAX_RATE = 0.95
"""Largest fraction of a layer's MACs the solver may assign to it (spec §5, B4)."""
WEIGHTING = ("slope", "lagrangian")
FLOPS_MEASURES = ("model", "layers")
WEIGHT_ONLY_WARNING = (
    "cc: no calibration data, so the sensitivities are weight-only (G ≡ 1: channel scores are weight "
    "magnitudes, singular-value scores spectral energies) instead of first-order loss estimates; give data "
    "(DATA=fashion-mnist, or --data <folder>) for gradient-based sensitivities"
)
THINNING_CONVENTION = (
    "MACs and params are those of the compressed model's forward (count_macs, = the exported graph): a producer "
    "conv whose outputs feed only a pruned conv through BN/ReLU is thinned physically and saves its own MACs; "
    "pruned inputs from the residual stream are gathered (a Gather costs no MACs); BN is folded and not counted"
)


# ================================================================================================ config
@dataclass(frozen=True)
class CollaborativeConfig:
    """Collaborative compression (Li et al. 2021), spec ``docs/method-cc.md``.

    Exactly one target is effective: ``flops`` when given (``ratio`` is then set to ``None``), else
    ``ratio``, else ``flops=0.5``.

    Attributes:
        method: Always ``cc``.
        flops: Fraction of the *whole* model's MACs to remove, in (0, 1) (the code's ``--com_ratio``);
            the per-layer targets sum to the global budget ``T`` (see ``flops_measure``).
        ratio: Instead of ``flops``: the parameter compression factor of the whole model (dense /
            compressed), > 1; ``T`` is bisected until the compressed model meets it.
        gamma: Weight γ of the forward ("remaining space") term of the unit scores (``--com_gamma``).
        calibration_samples: Images of the seeded calibration subset the gradients are averaged over
            (the code uses the whole training set); used by :func:`gradient_batches` / the CLI.
        decompose: Use decomposition units (False: the pruning-only arm).
        prune: Use channel-pruning units (False: the decomposition-only arm).
        weighting: ``slope`` (the code: equal slope ``a b e^{b c} = x`` on normalised losses) or
            ``lagrangian`` (``a b e^{b c} = λ·F_l``, a FLOPs-weighted Lagrangian), spec B1.
        flops_measure: What ``flops`` counts. ``model`` (default): the compressed model's MACs
            (:func:`~compress.metrics.count_macs`, producer thinning included) fall by ``flops``, the
            global budget ``T ≤ flops × MACs`` being bisected for it. ``layers``: the code's accounting,
            ``T = flops × MACs`` over the layers' own §2 costs; producer thinning then removes more.
        round_to: Round kept input-channel counts and ranks *down* to a multiple of this after the
            heuristic (1 = the paper; more removes a few extra units, so targets are still met).
        curve_points: Removal counts at which each sensitivity curve is evaluated (0 = every count, as
            the code); at least 8 otherwise.
        exact_forward: Re-decompose every channel candidate's weight for its forward term, as the code
            does (slow: one eigen-decomposition per channel per step); False keeps the current basis.
        keep_stem: Leave the image-input conv dense (the spec never compresses the stem).
        exclude: fnmatch patterns of module paths whose units are never removed. Like the stem, such a
            conv still loses the output channels its only consumer prunes (nobody reads them any more).
        seed: Seed of the calibration subset.
    """

    method: str = METHOD
    flops: float | None = None
    ratio: float | None = None
    gamma: float = 0.9
    calibration_samples: int = 512
    decompose: bool = True
    prune: bool = True
    weighting: str = "slope"
    round_to: int = 1
    flops_measure: str = "model"
    curve_points: int = 32
    exact_forward: bool = False
    keep_stem: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != METHOD:
            raise UserInputError(f"CollaborativeConfig is method 'cc', got {self.method!r}")
        if self.flops is not None:
            check_flops(self.flops)
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        elif self.ratio is None:
            object.__setattr__(self, "flops", 0.5)  # neither given: the paper's README setting
        if self.ratio is not None and (
            isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 1.0 < self.ratio < math.inf
        ):
            raise UserInputError(f"RATIO must be a number > 1 (parameter compression factor), got {self.ratio!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 <= self.gamma < math.inf:
            raise UserInputError(f"cc gamma must be a finite number ≥ 0 (the paper uses 0.9), got {self.gamma!r}")
        if not _is_int(self.calibration_samples) or self.calibration_samples < 1:
            raise UserInputError(f"calibration_samples must be an integer ≥ 1, got {self.calibration_samples!r}")
        for name in ("decompose", "prune", "exact_forward", "keep_stem"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"cc {name} must be True or False, got {getattr(self, name)!r}")
        if not (self.decompose or self.prune):
            raise UserInputError("cc needs decompose=True or prune=True (both False compresses nothing); drop one")
        if self.weighting not in WEIGHTING:
            raise UserInputError(f"cc weighting must be one of {', '.join(WEIGHTING)}, got {self.weighting!r}")
        if self.flops_measure not in FLOPS_MEASURES:
            raise UserInputError(
                f"cc flops_measure must be one of {', '.join(FLOPS_MEASURES)}, got {self.flops_measure!r}"
            )
        if not _is_int(self.round_to) or self.round_to < 1:
            raise UserInputError(f"round_to must be an integer ≥ 1 (1 = no rounding), got {self.round_to!r}")
        if not _is_int(self.curve_points) or not (self.curve_points == 0 or self.curve_points >= 8):
            raise UserInputError(f"curve_points must be 0 (every removal) or ≥ 8, got {self.curve_points!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise UserInputError(f"exclude must be a sequence of fnmatch patterns, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not _is_int(self.seed):
            raise UserInputError(f"seed must be an integer, got {self.seed!r}")

    @property
    def control(self) -> str:
        """Which target is effective: ``flops`` or ``ratio``."""
        return "flops" if self.flops is not None else "ratio"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollaborativeConfig:
        """Inverse of :meth:`to_dict` (e.g. from ``plan.config``)."""
        d = dict(data)
        d["exclude"] = tuple(d.get("exclude", ()))
        return cls(**d)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


register_method(METHOD, CollaborativeConfig)


# ================================================================================================ module
class ChannelSelect(nn.Module):
    """Keep the input channels ``index`` (``x.index_select(1, index)``; exported as an ONNX ``Gather``).

    The index is a registered buffer (saved with the weights, never a parameter), so parameter counts
    ignore it, as the spec asks for the code's ``keep_index``.
    """

    index: torch.Tensor

    def __init__(self, index: Sequence[int] | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kept channels of ``x`` (N, C, H, W), in index order."""
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        """Number of kept channels."""
        return f"{self.index.numel()} channels"


# ================================================================================================ cost model
@dataclass(frozen=True)
class ConvShape:
    """What a conv's cost depends on (spec §2): channels, kernel taps, output positions, bias."""

    out_channels: int
    in_channels: int
    taps: int
    pixels: int
    bias: bool = False

    @classmethod
    def of(cls, conv: nn.Conv2d, geometry: LayerGeometry) -> ConvShape:
        """Shape of ``conv`` at the spatial size seen in ``geometry``."""
        kh, kw = conv.kernel_size
        return cls(conv.out_channels, conv.in_channels, kh * kw, geometry.out_pixels, conv.bias is not None)

    @property
    def full_rank(self) -> int:
        """``R = min(O, I·k²)``: the rank bound of the unfolding (B2, the fixed code)."""
        return min(self.out_channels, self.in_channels * self.taps)

    @property
    def dense_macs(self) -> int:
        """MACs of the original layer, ``F₀ = O·I·k²·H'W'``."""
        return self.out_channels * self.in_channels * self.taps * self.pixels

    def weights(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """Weights (no bias) of the compressed layer: ``O'·I'·k²`` or ``I'·k²·r + r·O'``."""
        out = self.out_channels if out_kept is None else out_kept
        if rank is None:
            return out * in_kept * self.taps
        return in_kept * self.taps * rank + rank * out

    def macs(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """MACs of the compressed layer (weights × output positions; bias not counted)."""
        return self.weights(in_kept, rank, out_kept) * self.pixels

    def params(self, in_kept: int, rank: int | None = None, out_kept: int | None = None) -> int:
        """Parameters of the compressed layer (weights + bias)."""
        out = self.out_channels if out_kept is None else out_kept
        return self.weights(in_kept, rank, out_kept) + (out if self.bias else 0)

    def max_reduction(self, *, prune: bool, decompose: bool) -> int:
        """Largest own-MACs reduction the arm can reach (one channel and/or rank 1 left)."""
        i_min = 1 if prune else self.in_channels
        best = self.macs(i_min) if prune else self.dense_macs
        if decompose:
            best = min(best, self.macs(i_min, 1))
        return self.dense_macs - best


def _layer_cost(shape: ConvShape, in_kept: int, rank: int | None, decomposed: bool) -> int:
    return shape.macs(in_kept, rank if decomposed else None)


# ================================================================================================ linear algebra
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
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


def _unfold(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float64)


def _spectrum(M: torch.Tensor, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, Rf)`` with ``M = L Rfᵀ`` and ``L[:, j] Rf[:, j]ᵀ = σ_j u_j v_jᵀ``, σ descending.

    From the eigen-decomposition of the Gram matrix of the smaller side (float64), ~10× faster than an
    SVD on the shapes of a ResNet; σ is never divided by, so zero singular values are harmless. ``cols``
    (bool over M's columns) restricts the work to the columns that are not known to be zero (pruned
    channels): their exact-zero eigenvalue clusters can make LAPACK's ``syevd`` fail. Should it fail
    anyway, a full SVD is used.
    """
    sub = M if cols is None else M[:, cols]
    rows, n = sub.shape
    try:
        if rows <= n:
            _, U = torch.linalg.eigh(sub @ sub.T)
            U = U.flip(1)
            L, Rs = U, sub.T @ U
        else:
            _, V = torch.linalg.eigh(sub.T @ sub)
            V = V.flip(1)
            L, Rs = sub @ V, V
    except torch.linalg.LinAlgError:
        U, S, Vh = torch.linalg.svd(sub, full_matrices=False)
        L, Rs = U * S, Vh.T
    if cols is None:
        return L, Rs
    Rf = torch.zeros(M.shape[1], Rs.shape[1], dtype=Rs.dtype)
    Rf[cols] = Rs
    return L, Rf


def _channel_sum(Y: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Per-input-channel sums of an ``O × I·k²`` matrix."""
    return Y.reshape(Y.shape[0], in_channels, -1).sum(dim=(0, 2))


def _current(
    W: torch.Tensor, mask: torch.Tensor, taps: int, rank: int, decomposed: bool, spectral: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """``(W_t, L_r, R_r, r)``: the current weight (B3: rank-r truncation of W with pruned columns zeroed)."""
    cols = mask.repeat_interleave(taps)
    Wp = W * cols
    if not spectral:
        return Wp, None, None, rank
    L, Rf = _spectrum(Wp, cols)
    r = min(rank, int(mask.sum()) * taps, W.shape[0])
    L, Rf = L[:, :r], Rf[:, :r]
    return (L @ Rf.T if decomposed else Wp), L, Rf, r


def _spectral_terms(L: torch.Tensor, Rf: torch.Tensor, G2: torch.Tensor) -> torch.Tensor:
    """``hcol[j, b] = σ_j² (u_j²)ᵀ G²[:, b] v_jb²``: row sums are the singular-value scores, all sums ``Σ G²⊙Ŵ``."""
    return ((L * L).T @ G2) * (Rf * Rf).T


def _scores(
    W: torch.Tensor,
    G2: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    decomposed: bool,
    *,
    taps: int,
    gamma: float,
    prune: bool,
    decompose: bool,
    exact_forward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``B_u + γ·Fw_u`` of every candidate unit (spec §6 step 2), vectorised; ``inf`` = not a candidate.

    With ``A = W_u − W`` and ``m = n − 1`` the number of units left after ``u``, ``Fw_u`` is the expected
    loss after one more removal drawn uniformly from those ``m`` units:
    ``Σ(G⊙A)² + (2κ/m)·Σ G²⊙A⊙(−W_u) + (1/m)·[Σ(G⊙W_u)² (channels) + Σ G²⊙Ŵ_u (singular values)]``
    with κ the number of unit kinds in use (κ = 2 gives the code's ``4/(n−1)``).
    """
    n_in = mask.numel()
    Wt, L, Rf, r = _current(W, mask, taps, rank, decomposed, decompose)
    D = Wt - W
    G2D, G2Wt = G2 * D, G2 * Wt
    Bt = float((G2D * D).sum())
    Xt = -float((G2D * Wt).sum())  # Σ G²⊙A⊙(−W_u) at u = nothing removed
    Ct = float((G2Wt * Wt).sum())
    kept = int(mask.sum())
    n = (kept if prune else 0) + (r if decompose else 0)
    m = n - 1
    kinds = int(prune) + int(decompose)

    def total(B: torch.Tensor, X: torch.Tensor, C: torch.Tensor, Dh: torch.Tensor) -> torch.Tensor:
        if m <= 0:
            return B * (1.0 + gamma)
        rest = (C if prune else 0.0) + (Dh if decompose else 0.0)
        return B + gamma * (B + (2.0 * kinds / m) * X + rest / m)

    inf = torch.tensor(math.inf, dtype=torch.float64)
    chan = torch.full((n_in,), math.inf, dtype=torch.float64)
    sv = torch.full((r if decompose else 0,), math.inf, dtype=torch.float64)
    if decompose:
        assert L is not None
        assert Rf is not None
        hcol = _spectral_terms(L, Rf, G2)
        h = hcol.sum(1)
        Dt = float(h.sum())
        if r > 1:
            p = ((L.T @ G2D) * Rf.T).sum(1)  # Σ G²⊙D⊙Δ_j, Δ_j = σ_j u_j v_jᵀ
            q = ((L.T @ G2Wt) * Rf.T).sum(1)  # Σ G²⊙W_t⊙Δ_j
            sv = total(Bt - 2 * p + h, Xt + p + q - h, Ct - 2 * q + h, Dt - h)
    if prune and kept > 1:
        Bc = Bt - _channel_sum(G2D * D, n_in) + _channel_sum(G2 * W * W, n_in)
        Xc = Xt + _channel_sum(G2D * Wt, n_in)
        Cc = Ct - _channel_sum(G2Wt * Wt, n_in)
        if not decompose:
            Dc = torch.zeros(n_in, dtype=torch.float64)
        elif exact_forward:
            Dc = torch.zeros(n_in, dtype=torch.float64)
            for c in torch.nonzero(mask).flatten().tolist():
                Wu = Wt.clone()
                Wu[:, c * taps : (c + 1) * taps] = 0.0
                keep = mask.clone()
                keep[c] = False
                Lu, Ru = _spectrum(Wu, keep.repeat_interleave(taps))
                Dc[c] = _spectral_terms(Lu, Ru, G2).sum()
        else:  # keep the current singular basis: Ŵ_u ≈ Ŵ_t with channel u's columns zeroed
            Dc = Dt - _channel_sum(hcol, n_in)
        chan = torch.where(mask, total(Bc, Xc, Cc, Dc), inf)
    return chan, sv


def unit_scores(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    *,
    pruned: Sequence[int] = (),
    rank: int | None = None,
    gamma: float = 0.9,
    prune: bool = True,
    decompose: bool = True,
    exact_forward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the candidate units of one conv in a given state (spec §6 step 2).

    Args:
        weight: Original conv weight ``O×I×kh×kw``.
        grad: ``dL/dW`` of the same shape (``None``: ``G ≡ 1``).
        pruned: Input channels already removed.
        rank: Kept singular values ``r`` (``None``: none removed yet, the layer is not decomposed).
        gamma: Weight of the forward term.
        prune: Channel units are candidates.
        decompose: Singular-value units are candidates.
        exact_forward: Re-decompose each channel candidate for its forward term.

    Returns:
        ``(channel scores (I,), singular-value scores (r,))`` in float64, ``inf`` where a unit is not a
        candidate; singular values in descending order of σ.
    """
    W = _unfold(weight)
    G = torch.ones_like(W) if grad is None else _unfold(grad)
    taps = W.shape[1] // weight.shape[1]
    mask = torch.ones(weight.shape[1], dtype=torch.bool)
    mask[list(pruned)] = False
    full = min(W.shape[0], W.shape[1])
    return _scores(
        W,
        G * G,
        mask,
        full if rank is None else int(rank),
        rank is not None,
        taps=taps,
        gamma=gamma,
        prune=prune,
        decompose=decompose,
        exact_forward=exact_forward,
    )


# ================================================================================================ sensitivity
def sensitivity_curve(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    shape: ConvShape,
    *,
    prune: bool = True,
    decompose: bool = True,
    points: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Information loss against FLOPs compression rate along the fixed removal order (spec §4).

    All units are sorted once by their first-order score on the original weights (channel ``j``:
    ``Σ(G[:, j]⊙W[:, j])²``; singular value ``j``: ``σ_j² (u_j²)ᵀ G² (v_j²)`` = ``Σ(G⊙(W^(−j) − W))²``) and
    removed cumulatively in that order (one channel and one singular value always stay). After ``t``
    removals the weight is the rank-``r_t`` truncation of ``W`` without the pruned columns (B3), its loss
    ``ℓ_t = Σ(G⊙(W_t − W))²`` and its rate ``c_t = (F₀ − F_t)/F₀``.

    Args:
        weight: Original conv weight.
        grad: ``dL/dW`` (``None``: ``G ≡ 1``).
        shape: The layer's cost model.
        prune: Channel units take part.
        decompose: Singular-value units take part.
        points: Evaluate ``ℓ`` at this many evenly spaced removal counts with ``c_t > 0`` (0 = all).

    Returns:
        ``(c, ℓ)`` over the evaluated points with ``c > 0``, sorted by ``c`` (ℓ not normalised).
    """
    W = _unfold(weight)
    G2 = torch.ones_like(W) if grad is None else _unfold(grad) ** 2
    n_in, taps, n_out = shape.in_channels, shape.taps, shape.out_channels
    units: list[tuple[float, int, int]] = []  # (score, kind 0 = channel / 1 = singular value, index)
    if prune:
        units += [(float(s), 0, j) for j, s in enumerate(_channel_sum(G2 * W * W, n_in))]
    if decompose:
        L, Rf = _spectrum(W)
        units += [(float(s), 1, j) for j, s in enumerate(_spectral_terms(L, Rf, G2).sum(1))]
    units.sort(key=lambda u: u[0])  # stable: ties keep channels first, then by index
    order: list[int] = []
    states: list[tuple[int, int, bool]] = []  # (channels pruned, rank, decomposed) after each removal
    kept, rank, decomposed = n_in, shape.full_rank, False
    for _, kind, idx in units:
        if kind == 0:
            if kept == 1:
                continue
            kept -= 1
            order.append(idx)
            rank = min(rank, kept * taps, n_out)
        else:
            if rank == 1:
                continue
            rank -= 1
            decomposed = True
        states.append((n_in - kept, rank, decomposed))
    F0 = shape.dense_macs
    valid = [t for t, (npr, r, dec) in enumerate(states) if F0 - _layer_cost(shape, n_in - npr, r, dec) > 0]
    if points and len(valid) > points:
        picks = np.unique(np.round(np.linspace(0, len(valid) - 1, points)).astype(int))
        valid = [valid[i] for i in picks]
    rates, losses = [], []
    cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for t in valid:
        npr, r, dec = states[t]
        mask = torch.ones(n_in, dtype=torch.bool)
        mask[order[:npr]] = False
        cols = mask.repeat_interleave(taps)
        Wp = W * cols
        if dec:
            if cache is None or cache[0] != npr:
                cache = (npr, *_spectrum(Wp, cols))
            Wt = cache[1][:, :r] @ cache[2][:, :r].T
        else:
            Wt = Wp
        losses.append(float((G2 * (Wt - W) ** 2).sum()))
        rates.append((F0 - _layer_cost(shape, n_in - npr, r, dec)) / F0)
    c, loss = np.asarray(rates, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    idx = np.argsort(c, kind="stable")
    return c[idx], loss[idx]


def fit_exponential(rates: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """``(log a, b)`` of ``ℓ/max ℓ ≈ a·e^{b·c}`` (spec §4 step 6).

    Weighted least squares of ``log(ℓ + 1e-10)`` on ``c`` with weights ``√ℓ`` (ℓ normalised by its
    maximum), as ``LinearRegression(sample_weight=√ℓ)`` in the code. ``log a`` is returned instead of
    ``a`` because ``a`` under- or overflows for steep curves. ``(nan, nan)`` when there is nothing to fit
    (fewer than two distinct rates, or no loss at all).
    """
    c = np.asarray(rates, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    keep = c > 0
    c, loss = c[keep], loss[keep]
    if c.size < 2 or not np.isfinite(loss).all() or loss.max() <= 0 or np.ptp(c) == 0:
        return math.nan, math.nan
    loss = loss / loss.max()
    y = np.log(loss + 1e-10)
    w = np.sqrt(loss)
    cm, ym = np.average(c, weights=w), np.average(y, weights=w)
    var = float(np.sum(w * (c - cm) ** 2))
    if var <= 0:
        return math.nan, math.nan
    b = float(np.sum(w * (c - cm) * (y - ym)) / var)
    return float(ym - b * cm), b


# ================================================================================================ global solver
def allocate_reductions(
    log_a: Sequence[float],
    b: Sequence[float],
    macs: Sequence[float],
    caps: Sequence[float],
    target: float,
    *,
    weighting: str = "slope",
    iterations: int = 200,
) -> tuple[np.ndarray, float]:
    """Per-layer MACs reductions ``f_l`` with ``Σ f_l = target`` (spec §5), by bisection on ``log x``.

    Equal slope: ``a_l b_l e^{b_l c_l} = x`` ⇒ ``c_l(x) = ln(x / (a_l b_l)) / b_l``; ``lagrangian``:
    ``= λ·F_l``. ``f_l = F_l · clip(c_l, 0, cap_l)`` is continuous and non-decreasing in ``log x``, so
    bisection meets the target to machine precision.

    Args:
        log_a: ``log a_l`` of each layer's fit.
        b: ``b_l > 0``.
        macs: ``F_l``, each layer's original MACs.
        caps: Largest rate of each layer (0.95, or less where the layer cannot reach it).
        target: ``T`` in MACs, ``0 ≤ T ≤ Σ cap_l F_l``.
        weighting: ``slope`` or ``lagrangian``.
        iterations: Bisection steps at most.

    Returns:
        ``(f, log x)``.

    Raises:
        CompressionError: ``target`` exceeds ``Σ cap_l F_l``.
    """
    la, bb = np.asarray(log_a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    Fl, cap = np.asarray(macs, dtype=np.float64), np.asarray(caps, dtype=np.float64)
    if weighting not in WEIGHTING:
        raise UserInputError(f"weighting must be one of {', '.join(WEIGHTING)}, got {weighting!r}")
    if la.size == 0 or not np.all(bb > 0):
        raise CompressionError("the rate optimisation needs at least one layer with a fitted slope b > 0")
    offset = la + np.log(bb)
    if weighting == "lagrangian":
        offset = offset - np.log(Fl)
    most = float(np.sum(Fl * cap))
    if target > most * (1 + 1e-12):
        raise CompressionError(f"the layers can remove at most {most:.6g} MACs, asked for {target:.6g}")

    def f(log_x: float) -> np.ndarray:
        return Fl * np.clip((log_x - offset) / bb, 0.0, cap)

    lo, hi = float(offset.min()), float((offset + cap * bb).max())
    if target <= 0:
        return np.zeros_like(Fl), lo
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        total = float(f(mid).sum())
        if abs(total - target) <= 1e-13 * target:
            lo = hi = mid
            break
        if total < target:
            lo = mid
        else:
            hi = mid
    return f(hi), hi


# ================================================================================================ heuristic
@dataclass(frozen=True)
class LayerDecision:
    """What the heuristic decided for one layer.

    Attributes:
        pruned: Removed input channels, in removal order.
        rank: Kept singular values ``r`` when decomposed, else ``None`` (single conv).
        reduction: Own-MACs reduction ``F₀ − F`` (all ``O`` outputs, §2 cost).
        removals: Units removed before the stop (0 = untouched).
        switched: The pruning-only stop discarded the decomposition.
        reached: The reduction meets the target.
    """

    pruned: tuple[int, ...] = ()
    rank: int | None = None
    reduction: int = 0
    removals: int = 0
    switched: bool = False
    reached: bool = True


@dataclass
class Trajectory:
    """The heuristic's removal sequence of one layer (independent of the target except where it stops).

    Every array has one entry per single removal; a target ``f`` stops at the first removal where the
    reduction reaches ``f`` or the pruning-only stop applies, so one trajectory (run to the largest
    target needed) answers every smaller target exactly (:meth:`decide`).
    """

    shape: ConvShape
    order: list[int]
    n_pruned: np.ndarray
    rank: np.ndarray
    decomposed: np.ndarray
    reduction: np.ndarray
    prune_only_reduction: np.ndarray
    interval: int
    steps: int
    channel_scores: np.ndarray

    def stop_index(self, target: float) -> int | None:
        """Index of the removal at which ``target`` stops the heuristic (``None``: never within the trajectory)."""
        if target <= 0 or self.reduction.size == 0:
            return None
        switch = (self.n_pruned > 0) & self.decomposed & (self.prune_only_reduction >= target)
        hit = (self.reduction >= target) | switch
        return int(np.argmax(hit)) if hit.any() else None

    def decide(self, target: float, round_to: int = 1) -> LayerDecision:
        """The layer after the heuristic with target ``target`` MACs (then rounded down to ``round_to``).

        When both stops apply at once, the pruning-only layer is chosen: same kept channels, no truncated
        spectrum, target met.
        """
        if target <= 0:
            return LayerDecision()
        t = self.stop_index(target)
        reached = t is not None
        if t is None:
            t = self.reduction.size - 1
            if t < 0:
                return LayerDecision(reached=False)
        npr = int(self.n_pruned[t])
        switched = bool(npr > 0 and self.decomposed[t] and self.prune_only_reduction[t] >= target)
        rank = int(self.rank[t]) if self.decomposed[t] and not switched else None
        pruned = list(self.order[:npr])
        if round_to > 1:
            pruned, rank = self._round(pruned, rank, round_to)
        kept = self.shape.in_channels - len(pruned)
        reduction = self.shape.dense_macs - self.shape.macs(kept, rank)
        return LayerDecision(
            pruned=tuple(pruned),
            rank=rank,
            reduction=int(reduction),
            removals=t + 1,
            switched=switched,
            reached=reached and reduction >= target,
        )

    def _round(self, pruned: list[int], rank: int | None, m: int) -> tuple[list[int], int | None]:
        n_in = self.shape.in_channels
        kept = n_in - len(pruned)
        if pruned and kept >= m and kept % m:
            extra = kept % m
            gone = set(pruned)
            rest = sorted((float(self.channel_scores[j]), j) for j in range(n_in) if j not in gone)
            pruned = pruned + [j for _, j in rest[:extra]]
            kept -= extra
        if rank is not None:
            rank = min(rank, kept * self.shape.taps, self.shape.out_channels)
            if rank >= m:
                rank -= rank % m
        return pruned, rank


def heuristic_trajectory(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    shape: ConvShape,
    target: float,
    *,
    gamma: float = 0.9,
    prune: bool = True,
    decompose: bool = True,
    exact_forward: bool = False,
) -> Trajectory:
    """Run the multi-step heuristic of one layer until ``target`` MACs are removed (spec §6).

    Each step scores every remaining unit on the current state (:func:`unit_scores`) and removes the
    ``interval = max(1, ⌊0.01·(I + R)⌋)`` lowest-scoring ones one by one without re-scoring (channels:
    deleted; singular values: the smallest kept σ goes, B3); one channel and one singular value always
    stay. After each single removal the stop rules are checked: reduction ≥ target, or pruning-only
    (decomposition discarded) meets the target while channels are pruned and σ's removed.

    Args:
        weight: Original conv weight.
        grad: ``dL/dW`` (``None``: ``G ≡ 1``).
        shape: The layer's cost model (its output positions).
        target: Largest MACs reduction this trajectory must answer (e.g. the cap, to answer every target).
        gamma: Weight of the forward term.
        prune: Channel units take part.
        decompose: Singular-value units take part.
        exact_forward: Re-decompose each channel candidate for its forward term.
    """
    W = _unfold(weight)
    G2 = torch.ones_like(W) if grad is None else _unfold(grad) ** 2
    n_in, taps, n_out = shape.in_channels, shape.taps, shape.out_channels
    R = shape.full_rank
    units = (n_in if prune else 0) + (R if decompose else 0)
    interval = max(1, math.floor(0.01 * units))
    F0 = shape.dense_macs
    mask = torch.ones(n_in, dtype=torch.bool)
    kept, rank, decomposed = n_in, R, False
    order: list[int] = []
    rows: list[tuple[int, int, bool, int, int]] = []
    steps = 0
    done = target <= 0
    while not done:
        chan, sv = _scores(
            W,
            G2,
            mask,
            rank,
            decomposed,
            taps=taps,
            gamma=gamma,
            prune=prune,
            decompose=decompose,
            exact_forward=exact_forward,
        )
        scores = torch.cat([chan, sv])
        ranked = torch.argsort(scores, stable=True)[:interval]
        ranked = [int(u) for u in ranked if math.isfinite(float(scores[u]))]
        if not ranked:
            break
        steps += 1
        for u in ranked:
            if u < n_in:
                if kept == 1:
                    continue
                mask[u] = False
                kept -= 1
                order.append(u)
                rank = min(rank, kept * taps, n_out)
            else:
                if rank == 1:
                    continue
                rank -= 1
                decomposed = True
            red = F0 - _layer_cost(shape, kept, rank, decomposed)
            pred = F0 - shape.macs(kept)
            rows.append((n_in - kept, rank, decomposed, red, pred))
            if red >= target or (kept < n_in and decomposed and pred >= target):
                done = True
                break
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return Trajectory(
        shape=shape,
        order=order,
        n_pruned=arr[:, 0],
        rank=arr[:, 1],
        decomposed=arr[:, 2].astype(bool),
        reduction=arr[:, 3],
        prune_only_reduction=arr[:, 4],
        interval=interval,
        steps=steps,
        channel_scores=_channel_sum(G2 * W * W, n_in).numpy(),
    )


# ================================================================================================ gradients
def gradient_batches(
    split: Any, n: int, batch_size: int = 128, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of a seeded calibration subset (:func:`compress.data.calibration_subset`).

    The code averages over the whole training set with test-time transforms (B5); this takes ``n``
    un-augmented training images, in batches of the code's CIFAR training batch size.
    """
    from compress.data import calibration_subset

    sub = calibration_subset(split, n, seed=seed)
    return [sub.batch(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def gradient_statistics(
    model: nn.Module, paths: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``G = dL/dW`` of the convs ``paths``: mean over batches of the batch-mean cross-entropy gradient (§3).

    The model runs in eval mode (BN uses its running statistics); nothing in it changes (gradients are
    taken with :func:`torch.autograd.grad`, ``.grad`` fields are left alone).

    Returns:
        ``(G per path in float64 on CPU, {"images", "batches"})``.

    Raises:
        UserInputError: ``batches`` is empty, or a batch is not ``(images, labels)``.
    """
    weights = [model.get_submodule(p).weight for p in paths]
    sums = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    flags = [w.requires_grad for w in weights]
    device = weights[0].device if weights else torch.device("cpu")
    was_training = model.training
    model.eval()
    n_batches = n_images = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise UserInputError("cc calibration batches must be (images, labels) pairs; see gradient_batches")
                x, y = batch[0].to(device), batch[1].to(device)
                loss = F.cross_entropy(model(x), y)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for s, g in zip(sums, grads, strict=True):
                    if g is not None:
                        s += g.detach().to(device="cpu", dtype=torch.float64)
                n_batches += 1
                n_images += int(x.shape[0])
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise UserInputError("cc calibration batches are empty; pass at least one (images, labels) batch, or None")
    return {p: s / n_batches for p, s in zip(paths, sums, strict=True)}, {"images": n_images, "batches": n_batches}


# ================================================================================================ dependencies
@dataclass(frozen=True)
class _Route:
    """How a conv's input channels can be removed: from the producer (``thinned``) or by a ``gather``."""

    kind: str
    producer: str | None = None
    norms: tuple[str, ...] = ()


def _input_routes(
    model: nn.Module, example: torch.Tensor, candidates: Sequence[str], producers: Sequence[str]
) -> tuple[dict[str, _Route], str | None]:
    """Which candidate convs read a tensor that only they use, made by one plain conv through BN/ReLU.

    Torch-Pruning's dependency graph answers the coupling question: the pruning group of a conv's input
    channels lists every layer that must shrink with them. When that group is just {this conv's input,
    one producer conv's output, BatchNorm2d layers, element-wise ops} with identical indices, the channels
    can be removed physically. Any other group (the residual stream of a ResNet couples every block's conv,
    a concat, a second consumer) means a Gather. Torch-Pruning is used only for this analysis: its pruning
    functions would thin the dense producer before it is decomposed, while the spec removes rows of the
    producer's *final 1×1 factor* (the decomposition is made from the full original weight), and the
    applier must rebuild the architecture from the plan alone (``init="empty"``), so the surgery is ours.

    Args:
        model: The dense model (a copy is traced).
        example: One input batch.
        candidates: The convs whose inputs cc prunes.
        producers: Convs that may be thinned: the candidates and every other plain (``groups=1``) conv, whose
            function does not change when channels that only the pruned consumer read are removed.

    Returns:
        ``(route per candidate, warning or None)``; when the analysis fails every route is ``gather``.
    """
    gather = {p: _Route("gather") for p in candidates}
    if not candidates:
        return gather, None
    try:
        import torch_pruning as tp
    except ImportError:
        return gather, (
            "cc: torch-pruning is not installed, so no producer conv is thinned: every pruned input channel is "
            "gathered (pip install 'torch-pruning>=1.5' for physical channel removal)"
        )
    probe = copy.deepcopy(model).cpu().float().eval().requires_grad_(True)
    names = {m: n for n, m in probe.named_modules()}
    cand = set(producers)
    try:
        graph = tp.DependencyGraph().build_dependency(probe, example_inputs=example.cpu().float(), verbose=False)
    except Exception as exc:  # the tracer raises many types on models it cannot follow
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return gather, (
            f"cc: the dependency analysis (Torch-Pruning) failed on this model ({type(exc).__name__}: {reason}), so "
            "no producer conv is thinned: every pruned input channel is gathered"
        )
    routes: dict[str, _Route] = {}
    for path in candidates:
        conv = probe.get_submodule(path)
        probe_idx = sorted({0, conv.in_channels - 1})
        group = graph.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=probe_idx)
        producer, norms, local = None, [], True
        for dep, idxs in group:
            module = dep.target.module
            name = names.get(module)
            handler = getattr(dep.handler, "__name__", "")
            if sorted(int(i) for i in idxs) != probe_idx:
                local = False
            elif (module is conv and handler == "prune_in_channels") or dep.target.type == tp.ops.OPTYPE.ELEMENTWISE:
                continue
            elif isinstance(module, nn.BatchNorm2d) and handler == "prune_out_channels" and name is not None:
                norms.append(name)
            elif (
                isinstance(module, nn.Conv2d)
                and handler == "prune_out_channels"
                and module is not conv
                and producer is None
                and name in cand
                and module.groups == 1
            ):
                producer = name
            else:
                local = False
            if not local:
                break
        routes[path] = _Route("thinned", producer, tuple(norms)) if local and producer else _Route("gather")
    return routes, None


# ================================================================================================ planner
def _skip_reason(
    module: nn.Module,
    path: str,
    geom: LayerGeometry | None,
    stem: str | None,
    config: CollaborativeConfig,
    filter_fn: FilterFn | None,
) -> str | None:
    if not isinstance(module, nn.Conv2d):
        return "cc compresses convolutions only; the classifier is left dense (spec §7)"
    if geom is None:
        return "not reached by the forward pass (unused or conditional layer)"
    if config.keep_stem and path == stem:
        return "stem (image-input conv) is left dense by rule (spec §7)"
    if any(fnmatch.fnmatchcase(path, pat) for pat in config.exclude):
        return "excluded by pattern"
    if filter_fn is not None and not filter_fn(module, path):
        return "excluded by filter_fn"
    if module.groups != 1:
        return f"grouped/depthwise conv (groups={module.groups}) is left dense by rule"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "only explicit zero padding is supported by the compressed convs"
    if not torch.isfinite(module.weight).all():
        return "the weight has non-finite values"
    if module.in_channels * module.kernel_size[0] * module.kernel_size[1] < 2 and module.out_channels < 2:
        return "a single weight: nothing to remove"
    return None


@dataclass
class _Layer:
    path: str
    module: nn.Conv2d
    geometry: LayerGeometry
    shape: ConvShape
    route: _Route
    cap: float
    norm_params: int = 0
    frozen: str | None = None
    log_a: float = math.nan
    b: float = math.nan
    points: int = 0
    fallback: str | None = None
    f: float = 0.0
    trajectory: Trajectory | None = None
    decision: LayerDecision = field(default_factory=LayerDecision)


def _totals(
    layers: dict[str, _Layer], decisions: dict[str, LayerDecision], total_params: int, total_macs: int
) -> tuple[int, int, dict[str, int]]:
    """Whole-model params/MACs after compression, counting producer thinning; ``(params, macs, out kept)``."""
    out_kept: dict[str, int] = {}
    params, macs = total_params, total_macs
    for layer in layers.values():
        d = decisions[layer.path]
        if d.pruned and layer.route.kind == "thinned" and layer.route.producer:
            out_kept[layer.route.producer] = layer.shape.in_channels - len(d.pruned)
            params -= len(d.pruned) * layer.norm_params  # the thinned BNs' weight and bias
    for path, layer in layers.items():
        d, s = decisions[path], layer.shape
        kept, out = s.in_channels - len(d.pruned), out_kept.get(path)
        params -= s.params(s.in_channels) - s.params(kept, d.rank, out)
        macs -= s.dense_macs - s.macs(kept, d.rank, out)
    return params, macs, out_kept


def plan_cc(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan collaborative compression of ``model`` (not modified).

    Args:
        model: The dense model.
        config: The method config.
        example_input: One input batch (shapes and MACs are measured on it).
        batches: ``(images, labels)`` calibration batches for the gradients (e.g. :func:`gradient_batches`),
            or ``None`` for the weight-only fallback (``G ≡ 1``; the plan warns).
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; False leaves the layer untouched.

    Raises:
        CompressionError: nothing to compress, or the target is unreachable (the message gives the maximum).
        UserInputError: malformed calibration batches.
    """
    geometry, order, total_macs = trace_geometry(model, example_input)
    stem = _find_stem(model, order, int(example_input.shape[1]))
    total_params = count_params(model)
    warnings: list[str] = []
    entries: dict[str, LayerPlan] = {}
    layers: dict[str, _Layer] = {}  # the layers cc compresses
    frozen: dict[str, _Layer] = {}  # other plain convs: kept, but their outputs may be thinned
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        geom = geometry.get(path)
        reason = _skip_reason(module, path, geom, stem, config, filter_fn)
        if reason is not None:
            entries[path] = _keep_entry(path, module, geom, reason)
            if isinstance(module, nn.Conv2d) and module.groups == 1 and geom is not None:
                # no unit of it is removed, but the channels its only consumer prunes can go (§7)
                shape = ConvShape.of(module, geom)
                frozen[path] = _Layer(path, module, geom, shape, _Route("gather"), cap=0.0, frozen=reason)
            continue
        assert geom is not None
        assert isinstance(module, nn.Conv2d)
        shape = ConvShape.of(module, geom)
        reach = shape.max_reduction(prune=config.prune, decompose=config.decompose) / shape.dense_macs
        layers[path] = _Layer(path, module, geom, shape, _Route("gather"), cap=min(MAX_RATE, reach))
    if not layers:
        raise CompressionError(f"nothing to compress in {model_name}: every conv is excluded (see the plan reasons)")

    # gradients (§3)
    calibration: dict[str, Any] | None = None
    if batches is None:
        grads: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
        warnings.append(WEIGHT_ONLY_WARNING)
    else:
        stats, calibration = gradient_statistics(model, list(layers), batches)
        grads = dict(stats)
        calibration.update(source="seeded subset of the training split (B5)", requested=config.calibration_samples)

    # producer thinning (§7)
    routes, note = _input_routes(model, example_input, list(layers), producers=[*layers, *frozen])
    if note:
        warnings.append(note)
    for path, route in routes.items():
        layers[path].route = route
        layers[path].norm_params = sum(2 for n in route.norms if model.get_submodule(n).affine)

    # sensitivity curves and fits (§4)
    for layer in layers.values():
        with _one_thread():
            c, loss = sensitivity_curve(
                layer.module.weight,
                grads[layer.path],
                layer.shape,
                prune=config.prune,
                decompose=config.decompose,
                points=config.curve_points,
            )
        layer.points = int(c.size)
        layer.log_a, layer.b = fit_exponential(c, loss)
        if not (math.isfinite(layer.b) and layer.b > 0 and math.isfinite(layer.log_a)):
            layer.fallback = (
                f"sensitivity fit gave b = {layer.b:.3g} (needs b > 0; {layer.points} curve points): the loss does "
                "not grow with the compression rate, so the layer is left out of the rate optimisation (f_l = 0)"
            )
    fitted = [layer for layer in layers.values() if layer.fallback is None]
    for layer in layers.values():
        if layer.fallback is not None:
            warnings.append(f"cc: {layer.path}: {layer.fallback}")
    if not fitted:
        raise CompressionError(
            f"no layer of {model_name} has a usable sensitivity fit (b > 0); the weights (or gradients) are degenerate"
        )
    fit_args = (
        [layer.log_a for layer in fitted],
        [layer.b for layer in fitted],
        [layer.shape.dense_macs for layer in fitted],
        [layer.cap for layer in fitted],
    )
    most = float(sum(layer.shape.dense_macs * layer.cap for layer in fitted))

    def solve(budget: float) -> tuple[np.ndarray, float]:
        return allocate_reductions(*fit_args, budget, weighting=config.weighting)

    everything = {**layers, **frozen}

    def decide_all(f: np.ndarray) -> dict[str, LayerDecision]:
        out = {path: LayerDecision() for path in everything}
        for layer, fl in zip(fitted, f, strict=True):
            assert layer.trajectory is not None or fl <= 0
            if fl > 0 and layer.trajectory is not None:
                out[layer.path] = layer.trajectory.decide(float(fl), config.round_to)
        return out

    def run_heuristic(layer: _Layer, target: float) -> None:
        with _one_thread():
            layer.trajectory = heuristic_trajectory(
                layer.module.weight,
                grads[layer.path],
                layer.shape,
                target,
                gamma=config.gamma,
                prune=config.prune,
                decompose=config.decompose,
                exact_forward=config.exact_forward,
            )

    # global rate optimisation (§5) and the heuristic (§6)
    if config.flops is not None:
        budget = config.flops * total_macs
        if budget > most:
            raise CompressionError(
                f"FLOPS={config.flops:g} is not reachable for cc: the compressible convs can remove at most "
                f"{100 * most / total_macs:.1f}% of the model's MACs ({100 * MAX_RATE:g}% of each); lower FLOPS"
            )
        f, log_x = solve(budget)
        for layer, fl in zip(fitted, f, strict=True):
            if fl > 0:  # f_l only falls with T: these trajectories answer every smaller budget too
                run_heuristic(layer, float(fl))
        decisions = decide_all(f)
        if config.flops_measure == "model":
            # producer thinning removes MACs the layers' own accounting (§2) does not see: the smallest
            # budget whose compressed model meets the target in count_macs terms
            goal = (1.0 - config.flops) * total_macs
            lo, hi = 0.0, budget
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                f_mid, log_mid = solve(mid)
                d_mid = decide_all(f_mid)
                if _totals(everything, d_mid, total_params, total_macs)[1] <= goal:
                    hi, f, log_x, decisions = mid, f_mid, log_mid, d_mid
                else:
                    lo = mid
                if hi - lo <= 1e-9 * budget:
                    break
            budget = hi
        for layer, fl in zip(fitted, f, strict=True):
            layer.f = float(fl)
    else:
        assert config.ratio is not None
        for layer in fitted:
            run_heuristic(layer, layer.cap * layer.shape.dense_macs)
        goal = total_params / config.ratio

        def params_at(budget: float) -> tuple[int, np.ndarray, float, dict[str, LayerDecision]]:
            f, log_x = solve(budget)
            d = decide_all(f)
            return _totals(everything, d, total_params, total_macs)[0], f, log_x, d

        top = params_at(most)
        if top[0] > goal:
            raise CompressionError(
                f"RATIO={config.ratio:g} is not reachable for cc: at the largest FLOPs reduction "
                f"({100 * most / total_macs:.1f}%) the model keeps {top[0]:,} parameters (×{total_params / top[0]:.2f}); "
                "lower RATIO or use FLOPS="
            )
        lo, hi, best = 0.0, most, top
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            got = params_at(mid)
            if got[0] <= goal:
                hi, best = mid, got
            else:
                lo = mid
            if hi - lo <= 1e-9 * most:
                break
        budget = hi
        _, f, log_x, decisions = best
        for layer, fl in zip(fitted, f, strict=True):
            layer.f = float(fl)
        achieved = total_params / best[0]
        if abs(achieved / config.ratio - 1) > 0.03:
            warnings.append(
                f"cc: RATIO={config.ratio:g} met only as ×{achieved:.3f} (more than 3% off): the per-layer "
                "decisions are discrete at this size"
            )
    for path, d in decisions.items():
        everything[path].decision = d

    params_after, macs_after, out_kept = _totals(everything, decisions, total_params, total_macs)
    if config.flops is not None and config.flops_measure == "model":
        cut = 1.0 - macs_after / total_macs
        if cut - config.flops > 0.03 * (1.0 - config.flops):
            warnings.append(
                f"cc: FLOPS={config.flops:g} met only as {100 * cut:.1f}% fewer FLOPs (more than 3% of the remaining "
                "FLOPs off): the per-layer decisions are discrete at this size"
            )
    for path, layer in everything.items():
        if layer.frozen is None or path in out_kept:
            entries[path] = _layer_entry(layer, everything, out_kept)
    for layer in fitted:
        if layer.f > 0 and not layer.decision.reached:
            warnings.append(
                f"cc: {layer.path} reached only {layer.decision.reduction} of its {layer.f:.0f} MACs target"
            )
    plan_layers = [entries[p] for p, _ in model.named_modules() if p in entries]
    sum_f = float(sum(layer.f for layer in fitted))
    own = sum(layer.decision.reduction for layer in layers.values())
    plan = Plan(
        model=model_name,
        method=METHOD,
        config=config.to_dict(),
        input_shape=list(example_input.shape),
        layers=plan_layers,
        target={
            "control": config.control,
            "ratio": config.ratio,
            "flops": config.flops,
            "achieved_ratio": total_params / params_after,
            "achieved_flops_reduction": 1.0 - macs_after / total_macs,
            "achieved_params_reduction": 1.0 - params_after / total_params,
            "T": budget,
            "log_x": log_x,
            "x": math.exp(log_x) if log_x < 700 else math.inf,
            "sum_f": sum_f,
            "sum_f_rel_error": abs(sum_f - budget) / budget if budget > 0 else 0.0,
            "weighting": config.weighting,
            "flops_measure": config.flops_measure if config.flops is not None else None,
            "solver": "bisection on log x",
            "max_flops_reduction": most / total_macs,
            "flops_reduction_layers": own / total_macs,
            "thinning": THINNING_CONVENTION,
            "calibration": calibration,
            "fallback_layers": [layer.path for layer in layers.values() if layer.fallback],
            "layers": {
                "decomposed": sum(1 for e in plan_layers if e.action == DECOMP),
                "pruned": sum(1 for e in plan_layers if e.action == PRUNE),
                "gathered": sum(1 for e in plan_layers if e.info.get("input") == "gather"),
                "thinned_producers": len(out_kept),
            },
        },
        totals={
            "params_before": total_params,
            "params_after": params_after,
            "macs_before": total_macs,
            "macs_after": macs_after,
        },
        warnings=warnings,
    )
    return plan


def _layer_entry(layer: _Layer, layers: dict[str, _Layer], out_kept: dict[str, int]) -> LayerPlan:
    d, s = layer.decision, layer.shape
    kept = s.in_channels - len(d.pruned)
    in_keep = sorted(set(range(s.in_channels)) - set(d.pruned)) if d.pruned else None
    consumer = next(
        (c for c in layers.values() if c.route.producer == layer.path and c.decision.pruned),
        None,
    )
    out_keep = sorted(set(range(s.out_channels)) - set(consumer.decision.pruned)) if consumer else None
    out = out_kept.get(layer.path)
    if d.rank is not None:
        action, reason = DECOMP, None
    elif d.pruned or out_keep is not None:
        action, reason = PRUNE, None
    else:
        action = KEEP
        reason = layer.fallback or (
            "cc target f_l = 0: untouched" if layer.f <= 0 else "cc: no unit removed (target below one unit)"
        )
    R = s.full_rank
    info: dict[str, Any] = {
        "R": R,
        "e": 0 if d.rank is None else R - d.rank,
        "in_keep": in_keep,
        "pruned": len(d.pruned),
        "pruned_order": list(d.pruned),
        "input": "full" if not d.pruned else layer.route.kind,
        "producer": layer.route.producer if d.pruned and layer.route.kind == "thinned" else None,
        "through": list(layer.route.norms) if d.pruned and layer.route.kind == "thinned" else [],
        "route": layer.route.kind,
        "out_keep": out_keep,
        "out_norms": list(consumer.route.norms) if consumer else [],
        "thinned_by": consumer.path if consumer else None,
        "f_target": layer.f,
        "f_target_rate": layer.f / s.dense_macs,
        "cap_rate": layer.cap,
        "reduction": d.reduction,
        "reduction_rate": d.reduction / s.dense_macs,
        "reached": d.reached,
        "fit": {
            "a": math.exp(layer.log_a) if math.isfinite(layer.log_a) and layer.log_a < 700 else None,
            "log_a": layer.log_a if math.isfinite(layer.log_a) else None,
            "b": layer.b if math.isfinite(layer.b) else None,
            "points": layer.points,
        },
        "fallback": layer.fallback,
        "frozen": layer.frozen,
        "pruning_only_switch": d.switched,
        "removals": d.removals,
        "interval": layer.trajectory.interval if layer.trajectory else None,
        "steps": layer.trajectory.steps if layer.trajectory else 0,
    }
    return LayerPlan(
        path=layer.path,
        type="Conv2d",
        shape=list(layer.module.weight.shape),
        action=action,
        ranks=None if d.rank is None else [int(d.rank)],
        reason=reason,
        params_before=_layer_params(layer.module),
        params_after=s.params(kept, d.rank, out),
        macs_before=s.dense_macs,
        macs_after=s.macs(kept, d.rank, out),
        in_hw=_hw(layer.geometry.in_hw),
        out_hw=_hw(layer.geometry.out_hw),
        info=info,
    )


@register_planner(CollaborativeConfig)
def _plan_collaborative(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    *,
    model_name: str,
    filter_fn: FilterFn | None,
) -> Plan:
    """``plan_compression`` for cc: the weight-only plan (no data reaches this signature; see :func:`plan_cc`)."""
    return plan_cc(model, config, example_input, None, model_name=model_name, filter_fn=filter_fn)


# ================================================================================================ applying
def _indices(value: Any, n: int, what: str) -> list[int] | None:
    if value is None:
        return None
    idx = [int(i) for i in value]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= n:
        raise CompressionError(f"plan {what} must be distinct channel indices in 0..{n - 1}; regenerate the plan")
    return idx


def _build_layer(conv: nn.Conv2d, entry: LayerPlan, init: str) -> tuple[nn.Module, float | None]:
    """The replacement of ``conv`` described by ``entry`` (weights from ``conv`` when ``init='decompose'``)."""
    n_out, n_in, kh, kw = conv.weight.shape
    in_keep = _indices(entry.info.get("in_keep"), n_in, f"in_keep of {entry.path}")
    out_keep = _indices(entry.info.get("out_keep"), n_out, f"out_keep of {entry.path}")
    gather = in_keep is not None and entry.info.get("input") == "gather"
    ik = list(range(n_in)) if in_keep is None else in_keep
    ok = list(range(n_out)) if out_keep is None else out_keep
    Ik, Ok = len(ik), len(ok)
    rank = int(entry.ranks[0]) if entry.action == DECOMP and entry.ranks else None
    if entry.action == DECOMP and (rank is None or not 1 <= rank <= min(n_out, Ik * kh * kw)):
        raise CompressionError(f"plan rank {entry.ranks} of {entry.path} is not in 1..{min(n_out, Ik * kh * kw)}")
    opts = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    mode = {"padding_mode": conv.padding_mode}
    has_bias = conv.bias is not None
    if rank is None:
        convs = [nn.Conv2d(Ik, Ok, (kh, kw), bias=has_bias, **geometry, **mode, **opts)]
    else:
        convs = [
            nn.Conv2d(Ik, rank, (kh, kw), bias=False, **geometry, **mode, **opts),
            nn.Conv2d(rank, Ok, 1, bias=has_bias, **opts),
        ]
    rel_error = None
    if init == "decompose":
        W = conv.weight.detach()
        ik_t, ok_t = torch.tensor(ik, device=W.device), torch.tensor(ok, device=W.device)
        Wp = W.index_select(1, ik_t).to(torch.float64)
        with torch.no_grad():
            if rank is None:
                approx = Wp
                convs[0].weight.copy_(Wp.index_select(0, ok_t))
            else:
                U, S, Vh = torch.linalg.svd(Wp.reshape(n_out, -1), full_matrices=False)
                root = S[:rank].sqrt()
                first = (root[:, None] * Vh[:rank]).reshape(rank, Ik, kh, kw)
                second = (U[:, :rank] * root).reshape(n_out, rank, 1, 1)
                convs[0].weight.copy_(first)
                convs[1].weight.copy_(second.index_select(0, ok_t))
                approx = (second.reshape(n_out, rank) @ first.reshape(rank, -1)).reshape(Wp.shape)
            if has_bias:
                convs[-1].bias.copy_(conv.bias.detach().index_select(0, ok_t))
        full = torch.zeros(W.shape, dtype=torch.float64, device=W.device)
        full[:, ik_t] = approx
        ref = W.index_select(0, ok_t).to(torch.float64)
        rel_error = float((ref - full.index_select(0, ok_t)).norm() / ref.norm().clamp_min(1e-300))
    layers: list[nn.Module] = ([ChannelSelect(ik).to(conv.weight.device)] if gather else []) + convs
    module = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    module.train(conv.training)
    return module, rel_error


def _thin_norm(bn: nn.BatchNorm2d, keep: list[int], init: str) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=bn.weight.device if bn.affine else None,
    )
    if init == "decompose":
        idx = torch.tensor(keep, device=new.running_mean.device if new.running_mean is not None else None)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.index_select(0, idx))
                new.bias.copy_(bn.bias.index_select(0, idx))
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.index_select(0, idx))
                new.running_var.copy_(bn.running_var.index_select(0, idx))
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


@register_applier(METHOD)
def _apply_cc(model: nn.Module, plan: Plan, *, init: str = "decompose") -> nn.Module:
    """Applier for ``cc`` plans: rebuilds every layer from the plan alone (shapes, kept indices, ranks).

    ``decompose`` takes the weights from the model's current (original) convs: kept input columns, the
    top-r SVD of them split with √S on each side, kept output rows (and BN entries) of thinned producers;
    ``empty`` only builds the shapes, for loading saved weights afterwards.
    """
    todo = [e for e in plan.layers if e.action != KEEP]
    for e in todo:
        if e.action not in (PRUNE, DECOMP):
            raise CompressionError(
                f"plan names unknown cc action {e.action!r} for {e.path}; expected {PRUNE} or {DECOMP}"
            )
    convs = {e.path: planned_module(model, e, plan, (nn.Conv2d,)) for e in todo}
    norms: dict[str, list[int]] = {}
    for e in todo:
        out_keep = e.info.get("out_keep")
        for name in e.info.get("out_norms") or ():
            try:
                bn = model.get_submodule(name)
            except AttributeError:
                raise CompressionError(f"plan does not match the model: it has no BatchNorm {name!r}") from None
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != e.shape[0] or out_keep is None:
                raise CompressionError(
                    f"plan does not match the model: {name} is not a BatchNorm2d of {e.shape[0]} channels"
                )
            norms[name] = _indices(out_keep, e.shape[0], f"out_keep of {e.path}") or []
    built = {}
    with _one_thread():
        for e in todo:
            module, rel_error = _build_layer(convs[e.path], e, init)
            if rel_error is not None:
                e.rel_error = rel_error
            built[e.path] = module
    for path, module in built.items():
        _set_submodule(model, path, module)
    for name, keep in norms.items():
        _set_submodule(model, name, _thin_norm(model.get_submodule(name), keep, init))
    return model


def cc_compress_(
    model: nn.Module,
    config: CollaborativeConfig,
    example_input: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    model_name: str = "model",
    filter_fn: FilterFn | None = None,
) -> Plan:
    """Plan (with gradient statistics from ``batches``) and apply cc in place; return the plan.

    Args:
        model: The dense model; modified in place.
        config: The method config.
        example_input: One input batch (shapes and MACs).
        batches: ``(images, labels)`` calibration batches, or ``None`` for the weight-only fallback.
        model_name: Recorded in the plan.
        filter_fn: ``filter_fn(module, path) -> bool``; False leaves the layer untouched.
    """
    plan = plan_cc(model, config, example_input, batches, model_name=model_name, filter_fn=filter_fn)
    apply_plan_(model, plan)
    plan.totals["params_after_measured"] = count_params(model)
    plan.totals["macs_after_measured"] = count_macs(model, example_input)
    return plan
