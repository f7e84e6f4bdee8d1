"""Per-layer factorizations: small strategy objects in a name-keyed registry.

Each :class:`Factorization` knows, for one layer type, which ranks it takes, what the factorized layer
costs (parameters, MACs) and how to materialise it as a chain of stock ``nn.Conv2d`` / ``nn.Linear``
modules (no custom forward at inference, so ONNX export sees plain Conv/Gemm nodes). The registry
follows Torch-Pruning's type-keyed pruner table and timm's decorator-filled dicts: adding a
decomposition means subclassing :class:`Factorization` and decorating it with
:func:`register_factorization`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

from compress import decompose
from lowrank_core.errors import CompressionError, UserInputError

__all__ = [
    "FACTORIZATIONS",
    "Factorization",
    "LayerGeometry",
    "factorization",
    "register_factorization",
]

Ranks = tuple[int, ...]


@dataclass(frozen=True)
class LayerGeometry:
    """Spatial sizes seen by a layer in the planning forward pass (``None`` for Linear)."""

    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None

    @property
    def out_pixels(self) -> int:
        """Number of output positions per image (1 for Linear)."""
        return 1 if self.out_hw is None else self.out_hw[0] * self.out_hw[1]

    @property
    def in_pixels(self) -> int:
        """Number of input positions per image (1 for Linear)."""
        return 1 if self.in_hw is None else self.in_hw[0] * self.in_hw[1]


class Factorization(ABC):
    """One way to replace a layer by a chain of thinner stock layers."""

    name: ClassVar[str]
    layer_type: ClassVar[type[nn.Module]]
    rank_names: ClassVar[tuple[str, ...]] = ("r",)

    # ---------------------------------------------------------------- applicability and sizes
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this factorization cannot handle ``module`` (``None`` when it can)."""
        if not isinstance(module, self.layer_type):
            return f"{type(module).__name__} is not a {self.layer_type.__name__}"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"grouped/depthwise conv (groups={module.groups}) is left dense by rule"
            if module.padding_mode != "zeros":
                return f"padding_mode={module.padding_mode!r} is not supported by factorized convs"
            if isinstance(module.padding, str):
                return f"string padding {module.padding!r} is not supported; use explicit padding"
        return None

    @abstractmethod
    def max_ranks(self, module: nn.Module) -> Ranks:
        """Ranks at which the factorization reproduces the layer exactly (the knob's 100 %)."""

    def ranks_at(self, module: nn.Module, fraction: float) -> tuple[float, ...]:
        """Continuous ranks at a fraction of :meth:`max_ranks` (rounded by the caller)."""
        return tuple(fraction * m for m in self.max_ranks(module))

    @abstractmethod
    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        """Stored weights of the factorized chain (bias excluded)."""

    @abstractmethod
    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        """Multiply-accumulates per image of the factorized chain."""

    def params(self, module: nn.Module, ranks: Ranks) -> int:
        """Stored parameters of the factorized chain, bias included."""
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        return self.weight_params(module, ranks) + bias

    # ---------------------------------------------------------------- materialisation
    @abstractmethod
    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        """The replacement chain with the right shapes and uninitialised weights (for loading)."""

    @abstractmethod
    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        """Weights of each layer of :meth:`build`'s chain, in order, and the relative weight error."""

    def decompose(self, module: nn.Module, ranks: Ranks) -> tuple[nn.Sequential, float]:
        """Build the chain and fill it with the decomposition of ``module``'s weight."""
        chain = self.build(module, ranks)
        weights, rel_error = self.factor_weights(module, ranks)
        layers = [m for m in chain if isinstance(m, (nn.Conv2d, nn.Linear))]
        ref = module.weight
        with torch.no_grad():
            for layer, w in zip(layers, weights, strict=True):
                layer.weight.copy_(w.to(dtype=ref.dtype))
            if module.bias is not None:
                layers[-1].bias.copy_(module.bias.detach())
        chain.to(device=ref.device)
        return chain, rel_error

    def rank_matrices(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        """One matrix per rank whose spectrum decides that rank (for the EVBMF and energy rules)."""
        raise CompressionError(f"{self.name} has no matrix view for spectrum-based ranks; use rank rule 'uniform'")

    def check_ranks(self, module: nn.Module, ranks: Ranks) -> None:
        """Raise :class:`CompressionError` when ``ranks`` do not fit ``module``."""
        limits = self.max_ranks(module)
        if len(ranks) != len(limits) or any(not 1 <= r <= m for r, m in zip(ranks, limits, strict=True)):
            raise CompressionError(
                f"{self.name} ranks {list(ranks)} do not fit a layer whose ranks are bounded by {list(limits)}"
            )


FACTORIZATIONS: dict[str, type[Factorization]] = {}
_F = TypeVar("_F", bound=type[Factorization])


def register_factorization(name: str) -> Callable[[_F], _F]:
    """Class decorator adding a :class:`Factorization` to :data:`FACTORIZATIONS` under ``name``."""

    def wrap(cls: _F) -> _F:
        if name in FACTORIZATIONS:
            raise ValueError(f"factorization {name!r} is already registered")
        cls.name = name
        FACTORIZATIONS[name] = cls
        return cls

    return wrap


def factorization(name: str, *, hooi_iters: int = 0) -> Factorization:
    """Instantiate a registered factorization; unknown names list the known ones.

    ``hooi_iters`` is the HOOI refinement of Tucker-2 and is ignored by the other factorizations.
    """
    try:
        cls = FACTORIZATIONS[name]
    except KeyError:
        known = ", ".join(sorted(FACTORIZATIONS))
        raise UserInputError(f"unknown factorization {name!r}; known: {known}") from None
    return cls(hooi_iters=hooi_iters) if issubclass(cls, Tucker2) else cls()


# ================================================================================================ helpers
def _conv(
    module: nn.Conv2d,
    in_ch: int,
    out_ch: int,
    kernel: tuple[int, int],
    *,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        device="meta" if module.weight.is_meta else None,
        dtype=module.weight.dtype,
    )


def _same_geometry_conv(module: nn.Conv2d, in_ch: int, out_ch: int) -> nn.Conv2d:
    """The k×k conv of a chain: the original kernel, stride, padding and dilation, no bias."""
    kh, kw = _conv_meta(module)[2:]
    return _conv(
        module,
        in_ch,
        out_ch,
        (kh, kw),
        stride=_pair(module.stride),
        padding=_pair(module.padding),
        dilation=_pair(module.dilation),
    )


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_meta(module: nn.Conv2d) -> tuple[int, int, int, int]:
    t, s, kh, kw = module.weight.shape
    return int(t), int(s), int(kh), int(kw)


def _mid_pixels(geometry: LayerGeometry) -> int:
    """Pixels after a vertical-only conv that carries only the vertical stride (Tai / CP): H_out × W_in."""
    if geometry.in_hw is None or geometry.out_hw is None:
        return geometry.out_pixels
    return geometry.out_hw[0] * geometry.in_hw[1]


# ================================================================================================ conv factorizations
@register_factorization("svd")
class ChannelSVD(Factorization):
    """k×k conv S→r (original stride/padding/dilation), then 1×1 conv r→T carrying the bias."""

    layer_type = nn.Conv2d

    def max_ranks(self, module: nn.Module) -> Ranks:
        t, s, kh, kw = _conv_meta(module)
        return (min(t, s * kh * kw),)

    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        return r * (s * kh * kw + t)

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        return self.weight_params(module, ranks) * geometry.out_pixels

    def rank_matrices(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        t = module.weight.shape[0]
        return (module.weight.detach().reshape(t, -1),)

    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        t, s, _, _ = _conv_meta(module)
        (r,) = ranks
        return nn.Sequential(
            _same_geometry_conv(module, s, r),
            _conv(module, r, t, (1, 1), bias=module.bias is not None),
        )

    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        (r,) = ranks
        f = decompose.channel_svd(module.weight, r)
        recon = torch.einsum("tr,rshw->tshw", f.second[:, :, 0, 0], f.first)
        return [f.first, f.second], _rel(module.weight, recon)


@register_factorization("pointwise-svd")
class PointwiseSVD(ChannelSVD):
    """SVD of a 1×1 conv: 1×1 S→r then 1×1 r→T (what every classic method does to 1×1 convs)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        reason = super().unsupported_reason(module)
        if reason is None and tuple(module.weight.shape[2:]) != (1, 1):
            return "pointwise-svd handles 1×1 convs only"
        return reason

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        # The first 1×1 conv carries the stride, so both run at output resolution.
        return self.weight_params(module, ranks) * geometry.out_pixels


@register_factorization("tai")
class SpatialSVD(Factorization):
    """Tai et al. spatial SVD: kh×1 conv S→r (vertical stride/pad), then 1×kw conv r→T (horizontal)."""

    layer_type = nn.Conv2d

    def max_ranks(self, module: nn.Module) -> Ranks:
        t, s, kh, kw = _conv_meta(module)
        return (min(kh * s, kw * t),)

    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        return r * (kh * s + kw * t)

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        return r * kh * s * _mid_pixels(geometry) + r * kw * t * geometry.out_pixels

    def rank_matrices(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        return (decompose.unfold_spatial(module.weight.detach()),)

    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        (sh, sw), (ph, pw), (dh, dw) = _pair(module.stride), _pair(module.padding), _pair(module.dilation)
        return nn.Sequential(
            _conv(module, s, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1)),
            _conv(
                module,
                r,
                t,
                (1, kw),
                stride=(1, sw),
                padding=(0, pw),
                dilation=(1, dw),
                bias=module.bias is not None,
            ),
        )

    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        (r,) = ranks
        f = decompose.spatial_svd(module.weight, r)
        shape = tuple(module.weight.shape)
        recon = decompose.fold_spatial(_tai_matrix(f), shape)
        return [f.vertical, f.horizontal], _rel(module.weight, recon)


def _tai_matrix(f: decompose.SpatialSVDFactors) -> torch.Tensor:
    r, i, f1, _ = f.vertical.shape
    o, _, _, f2 = f.horizontal.shape
    left = f.vertical[..., 0].permute(2, 1, 0).reshape(f1 * i, r)
    right = f.horizontal[:, :, 0, :].permute(1, 2, 0).reshape(r, f2 * o)
    return left @ right


@register_factorization("tucker2")
class Tucker2(Factorization):
    """Tucker-2: 1×1 conv S→R_S, k×k conv R_S→R_T (original stride/padding/dilation), 1×1 conv R_T→T."""

    layer_type = nn.Conv2d
    rank_names = ("R_T", "R_S")

    def __init__(self, hooi_iters: int = 0) -> None:
        self.hooi_iters = hooi_iters

    def max_ranks(self, module: nn.Module) -> Ranks:
        t, s, _, _ = _conv_meta(module)
        return (t, s)

    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        t, s, kh, kw = _conv_meta(module)
        r_t, r_s = ranks
        return s * r_s + kh * kw * r_s * r_t + r_t * t

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        t, s, kh, kw = _conv_meta(module)
        r_t, r_s = ranks
        return geometry.in_pixels * s * r_s + geometry.out_pixels * kh * kw * r_s * r_t + geometry.out_pixels * r_t * t

    def rank_matrices(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        w = module.weight.detach()
        t, s = w.shape[:2]
        return (w.reshape(t, -1), w.transpose(0, 1).reshape(s, -1))

    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        t, s, _, _ = _conv_meta(module)
        r_t, r_s = ranks
        return nn.Sequential(
            _conv(module, s, r_s, (1, 1)),
            _same_geometry_conv(module, r_s, r_t),
            _conv(module, r_t, t, (1, 1), bias=module.bias is not None),
        )

    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        r_t, r_s = ranks
        f = decompose.tucker2(module.weight, (r_t, r_s), hooi_iters=self.hooi_iters)
        return [f.first, f.core, f.last], f.rel_error


@register_factorization("cp")
class CP(Factorization):
    """CP: 1×1 S→R, depthwise kh×1, depthwise 1×kw, 1×1 R→T (Lebedev et al. 2015)."""

    layer_type = nn.Conv2d
    rank_names = ("R",)

    def max_ranks(self, module: nn.Module) -> Ranks:
        # CP has no finite rank that is exact for every kernel; the knob's 100 % is min(T, S).
        t, s, _, _ = _conv_meta(module)
        return (min(t, s),)

    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        return r * (s + kh + kw + t)

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        return (
            geometry.in_pixels * s * r
            + _mid_pixels(geometry) * kh * r
            + geometry.out_pixels * kw * r
            + geometry.out_pixels * r * t
        )

    def check_ranks(self, module: nn.Module, ranks: Ranks) -> None:
        """CP ranks may exceed min(T, S); only positivity is required."""
        if len(ranks) != 1 or ranks[0] < 1:
            raise CompressionError(f"cp takes one positive rank, got {list(ranks)}")

    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        t, s, kh, kw = _conv_meta(module)
        (r,) = ranks
        (sh, sw), (ph, pw), (dh, dw) = _pair(module.stride), _pair(module.padding), _pair(module.dilation)
        return nn.Sequential(
            _conv(module, s, r, (1, 1)),
            _conv(module, r, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r),
            _conv(module, r, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r),
            _conv(module, r, t, (1, 1), bias=module.bias is not None),
        )

    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        (r,) = ranks
        f = decompose.cp_decompose(module.weight, r)
        return [f.pointwise_in, f.vertical, f.horizontal, f.pointwise_out], f.rel_error


# ================================================================================================ linear
@register_factorization("linear-svd")
class LinearSVD(Factorization):
    """Linear in→r (no bias), then Linear r→out carrying the bias."""

    layer_type = nn.Linear

    def max_ranks(self, module: nn.Module) -> Ranks:
        return (min(module.in_features, module.out_features),)

    def weight_params(self, module: nn.Module, ranks: Ranks) -> int:
        (r,) = ranks
        return r * (module.in_features + module.out_features)

    def macs(self, module: nn.Module, ranks: Ranks, geometry: LayerGeometry) -> int:
        return self.weight_params(module, ranks) * geometry.out_pixels

    def rank_matrices(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        return (module.weight.detach(),)

    def build(self, module: nn.Module, ranks: Ranks) -> nn.Sequential:
        (r,) = ranks
        kw = {"device": "meta" if module.weight.is_meta else None, "dtype": module.weight.dtype}
        return nn.Sequential(
            nn.Linear(module.in_features, r, bias=False, **kw),
            nn.Linear(r, module.out_features, bias=module.bias is not None, **kw),
        )

    def factor_weights(self, module: nn.Module, ranks: Ranks) -> tuple[list[torch.Tensor], float]:
        (r,) = ranks
        f = decompose.linear_svd(module.weight, r)
        return [f.first, f.second], _rel(module.weight, f.second @ f.first)


# ================================================================================================ dense cost
def dense_weight_params(module: nn.Module) -> int:
    """Weights of an unfactorized Conv2d/Linear (bias excluded)."""
    return int(module.weight.numel())


def dense_macs(module: nn.Module, geometry: LayerGeometry) -> int:
    """MACs per image of an unfactorized Conv2d/Linear."""
    if isinstance(module, nn.Conv2d):
        t, s, kh, kw = _conv_meta(module)
        return t * (s // module.groups) * kh * kw * geometry.out_pixels
    return int(module.weight.numel()) * geometry.out_pixels


def _rel(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.detach().to(torch.float64).cpu()
    norm = float(torch.linalg.vector_norm(ref))
    if norm == 0.0:
        return 0.0
    err = float(torch.linalg.vector_norm(ref - approx.to(torch.float64).reshape(ref.shape)))
    return err / norm if math.isfinite(err) else math.inf
