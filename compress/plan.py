"""A compression plan is data: per layer, what to do to it and what that costs.

Deciding (planning) is kept apart from doing (applying), as in Torch-Pruning: a :class:`Plan` can be
dumped to JSON, read, diffed and edited by hand, and :func:`compress.api.apply_plan_` turns it into the
same compressed architecture on a fresh base model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lowrank_core.errors import UserInputError
from lowrank_core.io import atomic_write_json, read_json

__all__ = ["PLAN_VERSION", "LayerPlan", "Plan"]

PLAN_VERSION = 1
KEEP = "keep"


@dataclass
class LayerPlan:
    """What happens to one layer.

    Attributes:
        path: Fully qualified module name (``layer1.0.conv1``).
        type: ``Conv2d`` or ``Linear``.
        shape: Weight shape of the original layer.
        action: A registered factorization name, or ``"keep"``.
        ranks: Ranks given to the factorization (``None`` when kept).
        reason: Why the layer is kept dense (``None`` when factorized).
        params_before: Parameters (weights + bias) of the original layer.
        params_after: Parameters after the action.
        macs_before: MACs per image of the original layer.
        macs_after: MACs per image after the action.
        in_hw: Input spatial size seen when planning (``None`` for Linear).
        out_hw: Output spatial size seen when planning.
        rel_error: Relative Frobenius error of the reconstructed weight (filled when applied).
        info: Rule-specific facts, e.g. raw EVBMF ranks or retained energy.
    """

    path: str
    type: str
    shape: list[int]
    action: str
    ranks: list[int] | None
    reason: str | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    in_hw: list[int] | None = None
    out_hw: list[int] | None = None
    rel_error: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def factorized(self) -> bool:
        """Whether the layer is replaced by a factorized chain."""
        return self.action != KEEP


@dataclass
class Plan:
    """A whole-model compression plan.

    Attributes:
        model: The model spec the plan was made for (torchvision name or ``file.py:fn``).
        method: The compression method name (``tucker2``, ``svd``, ...).
        config: The method configuration as a JSON-able dict.
        input_shape: Example input shape used to measure spatial sizes and MACs.
        layers: One entry per candidate layer, in module order.
        target: Requested and achieved ratio and the value of the rank knob.
        totals: Whole-model params and MACs before and after (``params_after`` counts every layer).
        warnings: Things the user must know (fallbacks, unreachable targets).
        version: Plan format version.
    """

    model: str
    method: str
    config: dict[str, Any]
    input_shape: list[int]
    layers: list[LayerPlan]
    target: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def factorized_layers(self) -> list[LayerPlan]:
        """Layers that the plan replaces."""
        return [layer for layer in self.layers if layer.factorized]

    def layer(self, path: str) -> LayerPlan:
        """The entry for ``path``; raises ``KeyError`` when absent."""
        for entry in self.layers:
            if entry.path == path:
                return entry
        raise KeyError(path)

    # ------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (layers as a list of dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output.

        Every key must be known and every rank a whole number: a typo in a hand-edited plan is an error
        naming the key and the layer, never silently ignored.

        Raises:
            UserInputError: the plan is malformed (the message names the offending key or value).
        """
        if not isinstance(data, dict):
            raise UserInputError(f"malformed plan: expected a JSON object, got {type(data).__name__}; regenerate it")
        plan_keys = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - plan_keys)
        if unknown:
            raise UserInputError(f"malformed plan: unknown key {unknown[0]!r} (known: {', '.join(sorted(plan_keys))})")
        try:
            version = int(data.get("version", PLAN_VERSION))
            if version != PLAN_VERSION:
                raise UserInputError(f"plan version {version} is not supported (expected {PLAN_VERSION})")
            if not isinstance(data["layers"], list):
                raise UserInputError("malformed plan: 'layers' must be a list of layer entries")
            layers = [_layer_from_dict(entry, i) for i, entry in enumerate(data["layers"])]
            plan = cls(
                model=_text(data["model"], "model"),
                method=_text(data["method"], "method"),
                config=dict(data.get("config", {})),
                input_shape=_ints(data["input_shape"], "input_shape"),
                layers=layers,
                target=dict(data.get("target", {})),
                totals=dict(data.get("totals", {})),
                warnings=[str(w) for w in data.get("warnings", [])],
                version=version,
            )
        except KeyError as exc:
            raise UserInputError(f"malformed plan: missing key {exc}; regenerate it") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"malformed plan ({type(exc).__name__}: {exc}); regenerate it") from None
        return plan

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        return cls.from_dict(read_json(path, what="plan"))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserInputError(f"malformed plan: {what} must be a non-empty string, got {value!r}")
    return value


def _ints(value: Any, what: str, *, positive: bool = False, minimum: int | None = None) -> list[int]:
    """A list of whole numbers (≥ 1 if ``positive``, ≥ ``minimum`` if given); 3.5, "abc" or True are refused."""
    if not isinstance(value, list):
        raise UserInputError(f"malformed plan: {what} must be a list of integers, got {value!r}")
    out = []
    for v in value:
        low = 1 if positive else minimum
        if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
            kind = "positive integers" if low == 1 else "non-negative integers" if low == 0 else "integers"
            raise UserInputError(f"malformed plan: {what} must be a list of {kind}, got {v!r} in {value!r}")
        out.append(int(v))
    return out


def _layer_from_dict(entry: Any, index: int) -> LayerPlan:
    if not isinstance(entry, dict):
        raise UserInputError(f"malformed plan: layer entry {index} must be an object, got {type(entry).__name__}")
    where = f"layer {entry.get('path', index)!r}"
    known = {f.name for f in fields(LayerPlan)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UserInputError(
            f"malformed plan: unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})"
        )
    values = dict(entry)
    values["path"] = _text(entry.get("path"), f"{where}: path")
    values["action"] = _text(entry.get("action"), f"{where}: action")
    values["shape"] = _ints(entry.get("shape"), f"{where}: shape", positive=True)
    if entry.get("ranks") is not None:
        # 0 is a rank (LRSD's sparse-only layers); each factorization checks its own ranks when applied
        values["ranks"] = _ints(entry["ranks"], f"{where}: ranks", minimum=0)
    if not isinstance(entry.get("info", {}), dict):
        raise UserInputError(f"malformed plan: {where}: info must be an object")
    return LayerPlan(**values)
