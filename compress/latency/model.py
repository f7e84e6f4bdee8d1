"""The latency model: block times from the lookup table (timed on a miss), whole-model prediction.

A model's predicted latency is the sum, over every ``Conv2d``/``Linear`` path of the dense model, of the
time of whatever module sits at that path (the dense layer, a factorized chain, a pruned conv) timed in
isolation at its real input shape, scaled by the dense model's ``end-to-end / Σ dense blocks`` (measured
once per model). The scale, not an additive "rest", carries the rest of the network: measured here (ResNet-34,
ORT CPU, one thread) a 3×3 conv takes 1.1 ms alone but 1.7 ms inside a chain of six, so the blocks' sum
under-counts in proportion to itself (Σ blocks 35.6 ms vs 58.1 ms end to end), and an additive rest of
22 ms made every compressed model look slower than it runs. End-to-end latency is still not exactly
proportional either, which is why the latency targets measure the whole model and correct the budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from compress.latency.table import LatencyTable, cpu_identity, default_table_path, device_id
from lowrank_core.errors import UserInputError

__all__ = ["DenseProfile", "LatencyModel", "Timer", "block_key", "layer_inputs"]


class Timer(Protocol):
    """What times modules: :class:`compress.latency.ort_timing.OrtTimer`, or a fake in tests."""

    backend: str
    threads: int

    def time_module(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Median ms of ``module`` at ``input_shape``."""
        ...

    def measure(self, models: Sequence[nn.Module], input_shape: Sequence[int], *, repeats: int = 20) -> list[float]:
        """Median ms of each whole model, timed interleaved."""
        ...


def block_key(module: nn.Module, input_shape: Sequence[int]) -> str:
    """The table key of a block: a hash of its structure (``repr`` and parameter shapes) and the input shape."""
    shapes = ";".join(f"{n}:{list(p.shape)}" for n, p in module.named_parameters())
    digest = hashlib.sha1(f"{module!r}|{shapes}".encode()).hexdigest()[:16]
    return f"{digest}@{'x'.join(str(int(d)) for d in input_shape)}"


def layer_inputs(
    model: nn.Module, example_input: torch.Tensor, paths: Iterable[str] | None = None
) -> dict[str, list[int]]:
    """Input shape of each module at ``paths`` (default: every Conv2d/Linear) in one forward of ``example_input``."""
    wanted = None if paths is None else set(paths)
    shapes: dict[str, list[int]] = {}
    handles = []
    for path, module in model.named_modules():
        if (wanted is None and isinstance(module, (nn.Conv2d, nn.Linear))) or (wanted is not None and path in wanted):

            def hook(_m: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(path, list(args[0].shape))

            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


@dataclass
class DenseProfile:
    """The dense model measured once: end-to-end ms, each Conv2d/Linear block's ms and input shape.

    Attributes:
        rest_ms: ``end-to-end − Σ blocks`` (recorded; not used by the prediction).
        scale: ``end-to-end / Σ blocks``: predicted ms = ``scale × Σ blocks``.
    """

    total_ms: float
    blocks_ms: dict[str, float]
    inputs: dict[str, list[int]]
    rest_ms: float = field(init=False)
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        blocks = sum(self.blocks_ms.values())
        self.rest_ms = self.total_ms - blocks
        self.scale = self.total_ms / blocks if blocks > 0 else 1.0


class LatencyModel:
    """Block times from a :class:`LatencyTable` (timed with ``timer`` on a miss) and whole-model predictions.

    Args:
        timer: What times blocks and models (default :class:`~compress.latency.ort_timing.OrtTimer`).
        table: The lookup table (default the on-disk table of this backend and CPU).
        threads: Intra-op threads of the default timer.
        precision: ``fp32`` or ``int8``: what the default timer times (int8: each block quantized, see
            :mod:`compress.latency.int8`); part of the timing context, so int8 and float times never mix.
            A given ``timer`` with a ``precision`` attribute must agree with it.
        batch: Batch size of every timed shape (input shapes are re-batched to it).
    """

    def __init__(
        self,
        timer: Timer | None = None,
        table: LatencyTable | None = None,
        *,
        threads: int = 1,
        precision: str = "fp32",
        batch: int = 1,
    ) -> None:
        if timer is None:
            from compress.latency.ort_timing import OrtTimer

            timer = OrtTimer(threads, precision=precision)
        elif getattr(timer, "precision", precision) != precision:
            raise UserInputError(f"the timer times {timer.precision}, not {precision}")  # type: ignore[attr-defined]
        self.timer = timer
        self.table = table if table is not None else LatencyTable(default_table_path(timer.backend))
        self.precision, self.batch = precision, batch
        self.device = cpu_identity()
        tag = getattr(timer, "precision_tag", precision)  # int8 times are keyed by their format too
        self.context = f"{timer.backend}|{device_id(self.device)}|threads={timer.threads}|{tag}|{self._runtime()}"
        self.timed = 0  # blocks timed by this object (table misses)
        self._profiles: dict[str, DenseProfile] = {}

    def _runtime(self) -> str:
        if self.timer.backend.startswith("ort"):
            from compress.latency.ort_timing import ort_version

            return f"ort-{ort_version()}"
        return self.timer.backend

    def shape(self, input_shape: Sequence[int]) -> list[int]:
        """``input_shape`` with the batch dimension set to :attr:`batch`."""
        return [self.batch, *[int(d) for d in input_shape[1:]]]

    def block_ms(self, module: nn.Module, input_shape: Sequence[int]) -> float:
        """Time of ``module`` at ``input_shape`` (re-batched): from the table, or timed and stored."""
        shape = self.shape(input_shape)
        key = block_key(module, shape)
        ms = self.table.get(self.context, key)
        if ms is None:
            ms = float(self.timer.time_module(module, shape))
            self.timed += 1
            self.table.put(self.context, key, ms, module=" ".join(repr(module).split())[:300], input=shape)
        return ms

    def profile_dense(self, model: nn.Module, example_input: torch.Tensor) -> DenseProfile:
        """The dense model end to end and each Conv2d/Linear block, so the rest is known (from the table when known)."""
        shape = self.shape(example_input.shape)
        key = "model:" + block_key(model, shape)
        if key in self._profiles:
            return self._profiles[key]
        inputs = layer_inputs(model, example_input)
        blocks = {p: self.block_ms(model.get_submodule(p), s) for p, s in inputs.items()}
        total = self.table.get(self.context, key)
        if total is None:
            (total,) = self.timer.measure([model], shape)
            self.table.put(self.context, key, total, module=f"whole model {type(model).__name__}", input=shape)
        self.save()
        self._profiles[key] = DenseProfile(total_ms=total, blocks_ms=blocks, inputs=inputs)
        return self._profiles[key]

    def predict(
        self, model: nn.Module, example_input: torch.Tensor, dense: DenseProfile
    ) -> tuple[float, dict[str, float]]:
        """Predicted ms of a compressed ``model``: ``scale ×`` the sum of its blocks at every dense path."""
        inputs = layer_inputs(model, example_input, dense.blocks_ms)
        blocks = {p: self.block_ms(model.get_submodule(p), s) for p, s in inputs.items()}
        self.save()
        return dense.scale * sum(blocks.values()), blocks

    def save(self) -> None:
        """Write new table entries to disk."""
        self.table.save()

    def to_dict(self) -> dict[str, Any]:
        """What a plan or report records about the model."""
        return {
            "backend": self.timer.backend,
            "device": self.device,
            "threads": self.timer.threads,
            "precision": self.precision,
            "batch": self.batch,
            "context": self.context,
            "table": self.table.to_dict(),
            "blocks_timed_this_run": self.timed,
        }
