"""VBMF + Tucker-2 with over-parameterized, orthogonally regularized training (``method-vbmf-tucker.md`` §4).

The method ``vbmf-tucker2`` is the whole reconstructed pipeline of He, Jiang & Wu (arXiv 2408.16289):

* stage A–C (training, when the run has data): every k×k conv becomes an ExpandNets chain
  (:func:`compress.overparam.expand_`, e = 4), trained with ``CE + λ·Σ R_orth`` on the chain's matrices,
  then collapsed exactly to stock convs — :class:`DenseTraining` carries these settings and
  :func:`train_overparameterized` runs them;
* stage D–E (planning/applying): per layer EVBMF ranks of the mode-0/mode-1 unfoldings, weakened by one
  global ω bisected to hit RATIO (MUSCO, §3.1/§3.3), rounded and clamped; Tucker-2 by HOSVD + HOOI
  (≤ 50 sweeps, stop at Δfit < 1e-6); 1×1 convs and FC layers by SVD with EVBMF ranks. This is
  :class:`compress.methods.lowrank.LowRankConfig`'s planner with the method's defaults;
* stage F: fine-tuning, optionally MUSCO-style in ``stages`` (compress a subset of layers, fine-tune,
  continue) — :func:`compress.workflow.finetune_run` reads ``stages`` from the plan's config.

The ablations of §4.5 are options: ``expansion=0`` (no expansion), ``orthogonality="none"`` and
``rank_rule="uniform"`` / ``"param-reduction"`` (fixed-ratio ranks instead of EVBMF).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from compress.methods.base import Option, finite_float, nonneg_int, positive_int, register
from compress.methods.lowrank import LowRankConfig, LowRankMethod
from lowrank_core.errors import UserInputError

__all__ = ["DenseTraining", "VBMFTucker2Config", "train_overparameterized"]

ORTHOGONALITY = ("so", "srip", "none")


@dataclass(frozen=True)
class VBMFTucker2Config(LowRankConfig):
    """``vbmf-tucker2``: EVBMF-ranked Tucker-2 (HOOI) after over-parameterized orthogonal training.

    Attributes (beyond :class:`compress.methods.lowrank.LowRankConfig`'s, whose defaults change to EVBMF ranks,
    ω = 0.8 without a ratio — MUSCO's default — and 50 HOOI sweeps):
        expansion: ExpandNets expansion rate of the training stage (0 = train the plain net).
        orthogonality: ``so`` (soft orthogonality), ``srip`` or ``none``.
        orth_weight: λ_orth at the start of training (×0.1 at 50 % and 75 %, 0 for the last 10 %).
        expand_linear: Also expand FC layers while training.
        stages: MUSCO multi-stage fine-tuning: compress the planned layers in this many groups (module
            order), fine-tuning after each with an equal share of the fine-tuning steps (1 = one shot).
    """

    method: str = "vbmf-tucker2"
    rank_rule: str = "evbmf"
    omega: float = 0.8
    hooi_iters: int = 50
    expansion: int = 4
    orthogonality: str = "so"
    orth_weight: float = 1e-4
    expand_linear: bool = False
    stages: int = 1

    @property
    def conv_method(self) -> str:
        """k×k convs always get Tucker-2."""
        return "tucker2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expansion < 0 or self.expansion == 1:
            raise UserInputError(f"expansion must be 0 (off) or ≥ 2, got {self.expansion}")
        if self.orthogonality not in ORTHOGONALITY:
            raise UserInputError(f"unknown orthogonality {self.orthogonality!r}; use {', '.join(ORTHOGONALITY)}")
        if self.orth_weight < 0:
            raise UserInputError(f"orth_weight must be ≥ 0, got {self.orth_weight}")
        if self.stages < 1:
            raise UserInputError(f"stages must be ≥ 1, got {self.stages}")

    def dense_training(self) -> DenseTraining:
        """The training-stage settings (stage A–C)."""
        return DenseTraining(
            expansion=self.expansion,
            orthogonality=self.orthogonality,
            orth_weight=self.orth_weight,
            expand_linear=self.expand_linear,
        )


@dataclass(frozen=True)
class DenseTraining:
    """How the dense model is trained before compression (stage A–C of §4.2)."""

    expansion: int = 0
    orthogonality: str = "none"
    orth_weight: float = 0.0
    expand_linear: bool = False

    @property
    def plain(self) -> bool:
        """Whether this is ordinary training (no expansion, no regularizer)."""
        return self.expansion == 0 and (self.orthogonality == "none" or self.orth_weight == 0)

    def tag(self) -> str:
        """Suffix of the training folder (``""`` for plain training), e.g. ``-x4-so1e-04``."""
        if self.plain:
            return ""
        parts = [f"x{self.expansion}" if self.expansion else "x0"]
        if self.orthogonality != "none" and self.orth_weight > 0:
            parts.append(f"{self.orthogonality}{self.orth_weight:.0e}")
        if self.expand_linear:
            parts.append("fc")
        return "-" + "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON view (part of the training folder's identity)."""
        return {
            "expansion": self.expansion,
            "orthogonality": self.orthogonality,
            "orth_weight": self.orth_weight,
            "expand_linear": self.expand_linear,
        }


class VBMFTucker2Method(LowRankMethod):
    """``vbmf-tucker2``: the low-rank planner with EVBMF ranks, plus its own dense training stage."""

    config_type = VBMFTucker2Config
    options = (
        *LowRankMethod.options,
        Option("--expansion", "expansion", "ExpandNets rate of the training stage (default 4; 0 = off)", nonneg_int),
        Option("--orthogonality", "orthogonality", "so (default) | srip | none: regularizer of the training stage"),
        Option("--orth-weight", "orth_weight", "λ_orth at the start of training (default 1e-4)", finite_float),
        Option("--stages", "stages", "MUSCO multi-stage fine-tuning in N groups", positive_int),
    )
    summary = "EVBMF-ranked Tucker-2 after over-parameterized orthogonal training (He et al. 2024, MUSCO)"

    def training_tag(self, config: Any) -> str:
        """``-x4-so1e-04``: the training folder is named after the recipe."""
        return config.dense_training().tag()

    def train_dense(
        self,
        model: nn.Module,
        dataset: Any,
        train_config: Any,
        folder: Any,
        *,
        config: Any,
        meta: dict[str, Any],
        device: str = "auto",
    ) -> dict[str, Any] | None:
        """Stage A–C (expand, train with the orthogonality term, collapse); ``None`` for a plain recipe."""
        recipe = config.dense_training()
        if recipe.plain:
            return None
        return train_overparameterized(model, dataset, train_config, folder, recipe, meta=meta, device=device)


register(VBMFTucker2Method("vbmf-tucker2"))


def train_overparameterized(
    model: nn.Module,
    data: Any,
    config: Any,
    out_dir: str | os.PathLike[str],
    recipe: DenseTraining,
    *,
    meta: dict[str, Any],
    device: str = "auto",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Stage A–C: expand ``model`` in place, train it with the orthogonality term, collapse it back.

    ``model`` ends as the stock architecture with the collapsed (trained) weights; the training folder's
    ``model.safetensors`` holds the collapsed weights too (the expanded ones stay in ``checkpoint.pt``
    for resuming). Accuracy is measured before and after the collapse: they agree to float32 rounding.

    Returns:
        The training record: wall time, epochs, the recipe, expanded/collapsed parameter counts and
        the accuracy of the expanded and the collapsed model.
    """
    from safetensors.torch import save_model

    from compress.metrics import count_params
    from compress.overparam import OrthogonalityRegularizer, collapse_, expand_
    from compress.workflow import TRAIN_JSON, WEIGHTS_FILE, evaluate_model, train_model
    from lowrank_core.io import atomic_path, atomic_write_json

    regularizers = ()
    if recipe.orthogonality != "none" and recipe.orth_weight > 0:
        regularizers = (OrthogonalityRegularizer(weight=recipe.orth_weight, kind=recipe.orthogonality),)
    expanded = expand_(model, expansion=recipe.expansion, linear=recipe.expand_linear) if recipe.expansion else []
    params_expanded = count_params(model)
    t0 = time.perf_counter()
    result = train_model(
        model,
        data,
        config,
        out_dir,
        meta={**meta, "dense_training": recipe.to_dict()},
        regularizers=regularizers,
        device=device,
        progress=progress,
    )
    wall = time.perf_counter() - t0
    model.cpu().eval()
    record: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "expanded_layers": len(expanded),
        "params_training": params_expanded,
        "wall_s": wall,
        "steps": result.steps,
    }
    if expanded:
        before = result.final or evaluate_model(model, data, config, device)
        collapse_(model)
        after = evaluate_model(model, data, config, device)
        record.update(accuracy_expanded=before.to_dict(), accuracy_collapsed=after.to_dict())
        folder = Path(out_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            with atomic_path(folder / WEIGHTS_FILE) as tmp:
                save_model(model, str(tmp))
            summary = json.loads((folder / TRAIN_JSON).read_text())
            summary["collapsed"] = record
            atomic_write_json(folder / TRAIN_JSON, summary)
    record["params_collapsed"] = count_params(model)
    return record
