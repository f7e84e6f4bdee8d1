"""Low-rank + sparse decomposition (LRSD) of Conv2d/Linear layers, fitted to the layer's responses.

Yu, Liu, Wang, Tao, "On Compressing Deep Models by Low Rank and Sparse Decomposition" (CVPR 2017), as
specified in ``docs/method-lrsd.md``. Each planned layer's weight matrix ``W`` (``m × k``, the im2col view
``W.reshape(T, S·kh·kw)`` for convs) becomes ``L + S`` with ``rank(L) ≤ r`` and ``‖S‖₀ ≤ c``, minimising

    F(L, S) = ½ ‖Y − (L+S) X‖² + ½ λ ‖W − L − S‖²  =  ½ tr((W* − L − S) C_λ (W* − L − S)ᵀ) + const

with ``C_λ = X Xᵀ + λ I`` accumulated in float64 from a calibration sample and ``W* = (Y Xᵀ + λ W) C_λ⁻¹``
(``W* = W`` in symmetric mode). Without calibration data ``C = I``: the weight-only problem (plain GoDec).

The package follows the method's seams:

* :mod:`~compress.methods.lrsd.solver`: :func:`solve_lrsd` (GoDec warm start, SVD-free bilateral L-step,
  GraSP or iterative hard-thresholding S-step with a conjugate-gradient refit, optional 2:4 structure,
  monotone objective) and :func:`project_sparse`;
* :mod:`~compress.methods.lrsd.statistics`: :class:`LayerStats`, :func:`collect_stats` (hooks accumulating
  ``X Xᵀ`` of unfolded patches batch by batch; symmetric, or paired dense/compressed inputs for the
  asymmetric mode), :func:`data_problem`, :func:`response_error`;
* :mod:`~compress.methods.lrsd.budget`: :func:`layer_storage`, :func:`split_budget` (rank vs cardinality
  under a parameter budget), :func:`allocate_ratios`, the FLOPs-target bisection;
* :mod:`~compress.methods.lrsd.module`: :class:`LowRankSparse` (``lowrank(x) + sparse(x)`` from stock
  Conv2d/Linear);
* :mod:`~compress.methods.lrsd.planner`: :class:`LowRankSparseConfig` and :func:`plan_lrsd`;
* :mod:`~compress.methods.lrsd.apply`: the one-call :func:`lrsd_compress_`, the data-free applier
  :func:`apply_lrsd` and :func:`sensitivity_sweep`;
* :mod:`~compress.methods.lrsd.method`: the registered :class:`LowRankSparseMethod` (``Needs.IMAGES``).
"""

from __future__ import annotations

from compress.methods.base import register
from compress.methods.lrsd.apply import MAX_STATS_BYTES, apply_lrsd, lrsd_compress_, sensitivity_sweep
from compress.methods.lrsd.budget import allocate_ratios, layer_storage, split_budget
from compress.methods.lrsd.method import CALIBRATION_BATCH_SIZE, LowRankSparseMethod, calibration_images
from compress.methods.lrsd.module import LowRankSparse
from compress.methods.lrsd.planner import METHOD, WEIGHT_ONLY_WARNING, LowRankSparseConfig, plan_lrsd
from compress.methods.lrsd.solver import LRSDResult, project_sparse, solve_lrsd
from compress.methods.lrsd.statistics import (
    LayerStats,
    calibration_batches,
    collect_stats,
    data_problem,
    response_error,
    weight_matrix,
)

__all__ = [
    "CALIBRATION_BATCH_SIZE",
    "LRSD",
    "MAX_STATS_BYTES",
    "METHOD",
    "WEIGHT_ONLY_WARNING",
    "LRSDResult",
    "LayerStats",
    "LowRankSparse",
    "LowRankSparseConfig",
    "LowRankSparseMethod",
    "allocate_ratios",
    "apply_lrsd",
    "calibration_batches",
    "calibration_images",
    "collect_stats",
    "data_problem",
    "layer_storage",
    "lrsd_compress_",
    "plan_lrsd",
    "project_sparse",
    "response_error",
    "sensitivity_sweep",
    "solve_lrsd",
    "split_budget",
    "weight_matrix",
]

LRSD = register(LowRankSparseMethod())
