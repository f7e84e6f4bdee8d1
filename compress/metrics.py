"""Model metrics: parameters, MACs (``torch.utils.flop_counter``), layer geometry, output agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compress.factorizations import LayerGeometry

__all__ = ["Agreement", "count_macs", "count_params", "output_agreement", "trace_geometry"]


def count_params(model: nn.Module) -> int:
    """Stored parameters; a parameter shared by several modules is counted once (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates per forward pass of ``example_input`` (FLOPs / 2, as counted by PyTorch).

    Convolutions, matrix products and their kin are counted; BN, activations, pooling and adds are not,
    which is the convention of the papers this project reproduces.
    """
    return trace_geometry(model, example_input)[2]


def trace_geometry(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, LayerGeometry], list[str], int]:
    """Run one forward pass; record each Conv2d/Linear's spatial sizes, the call order and total MACs.

    ``nn.MultiheadAttention`` runs on its unfused view (:func:`compress.attention.unfused_view`): its
    eval-mode fast path has no FLOP formula (it counted 0 MACs), and its projections get their geometry
    under the unfused paths (``attn.q_proj`` … ``attn.out_proj``).

    Returns:
        ``(geometry by module path, paths in the order their forward ran, MACs of the pass)``. A module
        called more than once keeps its first geometry. MACs are counted as in :func:`count_macs`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from compress.attention import unfused_view

    model = unfused_view(model)

    geometry: dict[str, LayerGeometry] = {}
    order: list[str] = []
    handles = []

    def hook(path: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if path in geometry:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                geometry[path] = LayerGeometry(
                    in_hw=(int(x.shape[-2]), int(x.shape[-1])),
                    out_hw=(int(output.shape[-2]), int(output.shape[-1])),
                )
            else:
                # Linear over (N, ..., F): every leading non-batch position is one "pixel".
                pixels = int(x[0].numel() // x.shape[-1]) if x.dim() > 1 else 1
                geometry[path] = LayerGeometry(in_hw=None, out_hw=None if pixels == 1 else (pixels, 1))
            order.append(path)

        return record

    for path, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return geometry, order, int(counter.get_total_flops()) // 2


@dataclass(frozen=True)
class Agreement:
    """How closely a compressed model's outputs follow the dense model's on the same batch."""

    rel_l2: float
    cosine: float
    max_abs: float
    top1_agreement: float
    batch: int

    def to_dict(self) -> dict[str, float]:
        """JSON-able dict."""
        return asdict(self)


def output_agreement(dense: nn.Module, compressed: nn.Module, inputs: torch.Tensor) -> Agreement:
    """Relative L2 error ‖y−ŷ‖/‖y‖, cosine, max |y−ŷ| and top-1 agreement on ``inputs``."""
    dense_mode, comp_mode = dense.training, compressed.training
    dense.eval()
    compressed.eval()
    try:
        with torch.no_grad():
            y = _flat_outputs(dense(inputs))
            y_hat = _flat_outputs(compressed(inputs))
    finally:
        dense.train(dense_mode)
        compressed.train(comp_mode)
    diff = y - y_hat
    norm = float(y.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    cosine = float(torch.nn.functional.cosine_similarity(y.flatten(), y_hat.flatten(), dim=0))
    top1 = float((y.argmax(1) == y_hat.argmax(1)).double().mean())
    return Agreement(rel_l2=rel, cosine=cosine, max_abs=float(diff.abs().max()), top1_agreement=top1, batch=len(y))


def _flat_outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A model's output as ``(batch, features)`` float64; several outputs (detection heads) side by side."""
    if isinstance(out, torch.Tensor):
        return out.double().flatten(1)
    return torch.cat([t.double().flatten(1) for t in out], dim=1)
