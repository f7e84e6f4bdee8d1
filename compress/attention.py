"""Attention layers as stock ``nn.Linear`` projections, so the per-layer factorizations can reach them.

``nn.MultiheadAttention`` keeps its q/k/v projections in one fused ``in_proj_weight`` parameter and
passes ``out_proj.weight`` straight to ``F.multi_head_attention_forward``: no forward hook ever sees a
projection run, and replacing ``out_proj`` by a factorized chain would break the forward. The
low-rank planner therefore plans on an *unfused view*: every supported ``nn.MultiheadAttention`` is
swapped for an exactly equivalent :class:`UnfusedMultiheadAttention` whose ``q_proj``, ``k_proj``,
``v_proj`` and ``out_proj`` are plain ``nn.Linear`` layers (``in_proj_weight`` split per projection).
Each projection is then an ordinary Linear layer: SVD factorizes it into ``Linear(r) → Linear`` and the
ONNX export is MatMul/Gemm, Softmax and reshapes, with no attention op.

The applier unfuses the same layers of a fresh model before it factorizes, so a saved plan rebuilds
the same architecture. ``add_bias_kv`` and ``add_zero_attn`` have no unfused twin here: such layers
stay fused and dense, with that reason in the plan.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNFUSED_PROJECTIONS",
    "UnfusedMultiheadAttention",
    "attention_paths_in_plan",
    "fused_attention_reason",
    "unfuse_attention_",
    "unfuse_unsupported_reason",
    "unfused_view",
]

#: Child names of an :class:`UnfusedMultiheadAttention`'s projections.
UNFUSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def unfuse_unsupported_reason(module: nn.MultiheadAttention) -> str | None:
    """Why ``module`` cannot be unfused (``None`` when it can)."""
    if module.bias_k is not None or module.bias_v is not None:
        return "nn.MultiheadAttention with add_bias_kv=True has no unfused equivalent here"
    if module.add_zero_attn:
        return "nn.MultiheadAttention with add_zero_attn=True has no unfused equivalent here"
    return None


def fused_attention_reason(module: nn.Module) -> str | None:
    """The true reason a fused ``nn.MultiheadAttention``'s ``out_proj`` stays dense, or ``None`` for other layers.

    ``out_proj`` of a fused layer is a ``NonDynamicallyQuantizableLinear`` (used nowhere else in torch).
    """
    if not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    return (
        "out_proj of a fused nn.MultiheadAttention: its forward passes out_proj.weight (and the fused q/k/v "
        "in_proj_weight) straight to F.multi_head_attention_forward, so no factorized chain can replace it "
        "(METHOD=svd/tucker2/tai/cp unfuse attention into q/k/v/out Linear layers and factorize those)"
    )


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (inference semantics) with its four projections as stock ``nn.Linear``.

    Same call signature and outputs as ``nn.MultiheadAttention.forward``; build one with :meth:`from_mha`.
    Without ``need_weights`` the attention is ``F.scaled_dot_product_attention``, as in
    ``nn.MultiheadAttention``; with it, it is written out (scaled ``q @ kᵀ``, additive mask, softmax,
    ``@ v``). Either way the opset-18 ONNX export is plain MatMul/Softmax whatever the projections become.

    Args:
        embed_dim: Model width ``E``.
        num_heads: Heads; ``E`` must divide by it.
        kdim: Width of ``key`` (default ``E``).
        vdim: Width of ``value`` (default ``E``).
        bias: Projections carry biases.
        dropout: Dropout on the attention weights while training.
        batch_first: Inputs are ``(N, L, E)`` rather than ``(L, N, E)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> UnfusedMultiheadAttention:
        """The exact unfused twin of ``mha`` (weights copied; same device, dtype and training flag).

        Raises:
            ValueError: ``mha`` uses ``add_bias_kv`` or ``add_zero_attn`` (see :func:`unfuse_unsupported_reason`).
        """
        reason = unfuse_unsupported_reason(mha)
        if reason is not None:
            raise ValueError(reason)
        e = mha.embed_dim
        new = cls(
            e,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
        )
        ref = mha.out_proj.weight
        new.to(device=ref.device, dtype=ref.dtype)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.detach().split(e, dim=0)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
            elif new.out_proj.bias is not None:  # MHA's out_proj always follows ``bias``; keep exactness anyway
                new.out_proj.bias.zero_()
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, attention weights or None)``."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(q_in).reshape(n, length, h, d).transpose(1, 2)
        k = self.k_proj(k_in).reshape(n, source, h, d).transpose(1, 2)
        v = self.v_proj(v_in).reshape(n, source, h, d).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, is_causal, n, length, source, q.dtype)
        attn = None
        if need_weights or (self.training and self.dropout > 0.0):
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if self.training and self.dropout > 0.0:
                attn = F.dropout(attn, p=self.dropout)
            context = torch.matmul(attn, v)
        else:  # as nn.MultiheadAttention without weights: the exported pattern ONNX Runtime fuses
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = context.transpose(1, 2).reshape(n, length, self.embed_dim)
        out = self.out_proj(out)
        if not (self.batch_first and not unbatched):
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        weights = None
        if need_weights and attn is not None:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _additive_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        n: int,
        length: int,
        source: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Masks in ``nn.MultiheadAttention``'s conventions (bool True = masked) as one additive float mask."""
        mask: torch.Tensor | None = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
        if attn_mask is not None:
            m = _as_additive(attn_mask, dtype)
            mask = m.reshape(n, self.num_heads, length, source) if m.dim() == 3 else m
        if key_padding_mask is not None:
            kp = _as_additive(key_padding_mask, dtype).reshape(n, 1, 1, source)
            mask = kp if mask is None else mask + kp
        return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def unfuse_attention_(model: nn.Module, paths: Iterable[str] | None = None) -> list[str]:
    """Swap ``nn.MultiheadAttention`` layers of ``model`` for their :class:`UnfusedMultiheadAttention` twins.

    Args:
        model: Changed in place.
        paths: Only these module paths (default: every supported attention layer).

    Returns:
        The paths swapped, in module order. Unsupported layers (``add_bias_kv``, ``add_zero_attn``) stay.
    """
    wanted = None if paths is None else set(paths)
    done: list[str] = []
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention) or (wanted is not None and path not in wanted):
            continue
        if unfuse_unsupported_reason(module) is not None:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, UnfusedMultiheadAttention.from_mha(module))
        done.append(path)
    return done


def unfused_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no unfusable attention, else an unfused deep copy (``model`` is not changed)."""
    if not any(isinstance(m, nn.MultiheadAttention) and unfuse_unsupported_reason(m) is None for m in model.modules()):
        return model
    view = copy.deepcopy(model)
    unfuse_attention_(view)
    return view


def attention_paths_in_plan(model: nn.Module, layer_paths: Iterable[str]) -> list[str]:
    """Paths of ``model``'s fused attention layers that a plan names unfused projections of."""
    named = set(layer_paths)
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        and any((f"{path}.{p}" if path else p) in named for p in UNFUSED_PROJECTIONS[:3])
    ]
