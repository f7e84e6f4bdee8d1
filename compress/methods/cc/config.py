"""CC's config: the frozen :class:`CollaborativeConfig`, its defaults and the messages the plan records."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from compress.targets import check_flops, check_ratio
from lowrank_core.errors import UserInputError

__all__ = [
    "DEFAULT_FLOPS",
    "FLOPS_MEASURES",
    "MAX_RATE",
    "METHOD",
    "THINNING_CONVENTION",
    "WEIGHTING",
    "WEIGHT_ONLY_WARNING",
    "CollaborativeConfig",
]

METHOD = "cc"
DEFAULT_FLOPS = 0.5
"""The target when none is given (the paper's README setting; the method's default target too)."""
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
            (the code uses the whole training set): the first ones of ``data`` in ``compress_``.
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
            _set_number(self, "flops", check_flops(self.flops))
            object.__setattr__(self, "ratio", None)  # the FLOPs target replaces the (default) ratio
        elif self.ratio is None:
            object.__setattr__(self, "flops", DEFAULT_FLOPS)  # neither given: the paper's README setting
        if self.ratio is not None:
            _set_number(self, "ratio", check_ratio(self.ratio))
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


def _set_number(config: CollaborativeConfig, name: str, value: float) -> None:
    """Keep a number as given (``2`` stays ``2`` in the recorded config); store a parsed string as the float."""
    if not isinstance(getattr(config, name), (int, float)):
        object.__setattr__(config, name, value)
