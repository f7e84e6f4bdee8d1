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
* the plan (:func:`plan_cc`) and its applier (:func:`~compress.methods.cc.apply.apply_cc_`) (``[Gather] → Conv k×k (I'→r) →
  Conv 1×1 (r→O')`` or ``[Gather] → Conv k×k (I'→O')``), with real channel removal (§7): a pruned input
  channel that comes from a conv → BN → ReLU chain used by this conv alone is removed from that producer
  (its weight rows, or the rows of its final 1×1 when it is decomposed, its bias, the BN's parameters and
  running statistics); elsewhere (the residual stream) a constant-index :class:`ChannelSelect` (an ONNX
  ``Gather``) picks the kept channels.

The package follows those seams: :mod:`~compress.methods.cc.config`, :mod:`~compress.methods.cc.modules`
(``ChannelSelect``, the §2 cost model), :mod:`~compress.methods.cc.scores` (spectra, unit scores, gradient
statistics), :mod:`~compress.methods.cc.sensitivity`, :mod:`~compress.methods.cc.allocation` (solver and
heuristic), :mod:`~compress.methods.cc.routes` (producer thinning, Torch-Pruning), :mod:`~compress.methods.cc.planner`,
:mod:`~compress.methods.cc.apply` and :mod:`~compress.methods.cc.method` (the registered :class:`CollaborativeMethod`).

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

from compress.methods.base import register
from compress.methods.cc.allocation import LayerDecision, Trajectory, allocate_reductions, heuristic_trajectory
from compress.methods.cc.apply import apply_cc_
from compress.methods.cc.config import (
    DEFAULT_FLOPS,
    MAX_RATE,
    METHOD,
    WEIGHT_ONLY_WARNING,
    CollaborativeConfig,
)
from compress.methods.cc.method import CollaborativeMethod, calibration_batches, cc_compress_
from compress.methods.cc.modules import DECOMP, PRUNE, ChannelSelect, ConvShape
from compress.methods.cc.planner import plan_cc
from compress.methods.cc.scores import gradient_batches, gradient_statistics, unit_scores
from compress.methods.cc.sensitivity import fit_exponential, sensitivity_curve

__all__ = [
    "CC",
    "DECOMP",
    "DEFAULT_FLOPS",
    "MAX_RATE",
    "METHOD",
    "PRUNE",
    "WEIGHT_ONLY_WARNING",
    "ChannelSelect",
    "CollaborativeConfig",
    "CollaborativeMethod",
    "ConvShape",
    "LayerDecision",
    "Trajectory",
    "allocate_reductions",
    "apply_cc_",
    "calibration_batches",
    "cc_compress_",
    "fit_exponential",
    "gradient_batches",
    "gradient_statistics",
    "heuristic_trajectory",
    "plan_cc",
    "sensitivity_curve",
    "unit_scores",
]

CC = register(CollaborativeMethod())
