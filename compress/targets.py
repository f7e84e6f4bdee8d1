"""The compression target: one validated type for RATIO, FLOPS and the latency targets, checked in one place.

Every method config keeps the fields it plans with (``ratio``, ``flops`` and its own knob such as ``rho``);
:func:`check_target` is the single validation every config's ``__post_init__`` and every command line
calls, so ``RATIO=inf`` or ``FLOPS=1`` is refused the same way whichever method receives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowrank_core.errors import UserInputError

__all__ = ["TARGET_KINDS", "Target", "check_flops", "check_ratio", "check_target", "parse_target", "target_text"]

# kind → (the variable users type, what it means)
TARGET_KINDS: dict[str, tuple[str, str]] = {
    "ratio": ("RATIO", "a number > 1 (parameter compression factor of the whole model)"),
    "flops": ("FLOPS", "the fraction of FLOPs to remove, in (0, 1) (0.5 = half the FLOPs)"),
    "speedup": ("SPEEDUP", "a number > 1 (measured speedup over the dense model on the target backend)"),
    "latency_ms": ("LATENCY_MS", "a number > 0 (the compressed model's measured p50 latency in milliseconds)"),
}


def _number(value: Any, name: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"{name} must be {meaning}, got {value!r}")
    return float(value)


def parse_target(kind: str, text: str) -> Target:
    """A target from command-line text (``"4"``); a non-number is a :class:`UserInputError`."""
    name, meaning = TARGET_KINDS[kind]
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be {meaning}, got {text!r}") from None
    return Target(kind, value)


@dataclass(frozen=True)
class Target:
    """What to reach: ``Target("ratio", 4)``, ``Target("flops", 0.5)``, ``Target("speedup", 3)``.

    Attributes:
        kind: One of :data:`TARGET_KINDS`.
        value: The validated number.
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise UserInputError(f"unknown target kind {self.kind!r}; known: {', '.join(TARGET_KINDS)}")
        name, meaning = TARGET_KINDS[self.kind]
        value = _number(self.value, name, meaning)
        ok = {
            "ratio": value > 1.0,
            "flops": 0.0 < value < 1.0,
            "speedup": value > 1.0,
            "latency_ms": value > 0.0,
        }[self.kind]
        if not ok:
            raise UserInputError(f"{name} must be {meaning}, got {self.value!r}")
        object.__setattr__(self, "value", value)

    @classmethod
    def from_options(cls, **given: Any) -> Target | None:
        """The one target among keyword options (``ratio=``, ``flops=``, …; ``None`` = not given).

        Raises:
            UserInputError: two targets given, or an unknown kind.
        """
        chosen = [(k, v) for k, v in given.items() if v is not None]
        unknown = [k for k, _ in chosen if k not in TARGET_KINDS]
        if unknown:
            raise UserInputError(f"unknown target {unknown[0]!r}; known: {', '.join(TARGET_KINDS)}")
        if len(chosen) > 1:
            names = " and ".join("--" + k.replace("_", "-") for k, _ in chosen)
            raise UserInputError(f"give one target, not {names} (one of RATIO=, FLOPS=, SPEEDUP=, LATENCY_MS=)")
        return cls(*chosen[0]) if chosen else None

    @property
    def is_latency(self) -> bool:
        """Whether the target is a measured-latency one (``speedup`` or ``latency_ms``)."""
        return self.kind in ("speedup", "latency_ms")

    def text(self) -> str:
        """``RATIO=4``: the target as a user writes it, for messages."""
        return f"{TARGET_KINDS[self.kind][0]}={self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON view: ``{"kind", "value"}``."""
        return {"kind": self.kind, "value": self.value}


def check_ratio(ratio: Any) -> float:
    """Validate a parameter compression factor (finite, > 1); return it as a float."""
    return Target("ratio", ratio).value


def check_flops(flops: Any) -> float:
    """Validate a FLOPs-reduction target (the fraction of the whole model's MACs to remove); return it."""
    return Target("flops", flops).value


def check_target(ratio: Any = None, flops: Any = None, **others: Any) -> Target | None:
    """Validate a config's target fields at once: at most one given, each valid. Returns the target or None.

    ``others`` are method knobs that replace a target (e.g. ``rho``): they only count towards "one of".
    """
    extra = [k for k, v in others.items() if v is not None]
    target = Target.from_options(ratio=ratio, flops=flops)
    if extra and target is not None:
        raise UserInputError(f"give one target, not {target.text().split('=')[0]} and --{extra[0].replace('_', '-')}")
    return target


def target_text(ratio: float | None, flops: float | None) -> str:
    """``RATIO=4`` or ``FLOPS=0.5``: the target as the user wrote it, for messages."""
    return f"FLOPS={flops:g}" if flops is not None else f"RATIO={ratio:g}"
