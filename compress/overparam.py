"""Over-parameterized training: exactly collapsible linear expansions and orthogonality regularizers.

Stage A/B/C of the VBMF + Tucker-2 pipeline (``method-vbmf-tucker.md`` §4.3–§4.4, a reconstruction — the
paper's text was not available):

* :class:`ExpandedConv2d` replaces ``Conv(S→T, k×k)`` by ``1×1 (S→e·S) → k×k (e·S→e·T) → 1×1 (e·T→T)``
  (ExpandNets' linear expansion, e = 4): no bias and no nonlinearity inside the chain, so it collapses
  to one stock conv with the identical function, ``W[t,s] = Σ_b Σ_a C[t,b] · B[b,a] · A[a,s]``;
  :class:`ExpandedLinear` does the same for FC layers;
* :func:`expand_` / :func:`collapse_` swap them in and out of a model in place;
* :class:`OrthogonalityRegularizer` adds ``λ(progress) · Σ R(M)`` over the expansion convs, with soft
  orthogonality ``‖M Mᵀ − I‖²_F`` on the smaller Gram side or SRIP ``σ_max(MᵀM − I)²`` (one power
  iteration per call), and a step-decay schedule of λ. It plugs into :class:`compress.train.Trainer`.

Written by hand: ExpandNets has no maintained package, and the collapse is a two-line tensor
contraction; the regularizers are the published formulas (Bansal et al., NeurIPS 2018).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_core.errors import UserInputError

__all__ = [
    "ExpandedConv2d",
    "ExpandedLinear",
    "OrthogonalityRegularizer",
    "collapse_",
    "expand_",
    "soft_orthogonality",
    "srip",
]


class ExpandedConv2d(nn.Module):
    """``1×1 (S→e·S) → k×k (e·S→e·T, the original stride/padding/dilation) → 1×1 (e·T→T, the original bias)``."""

    def __init__(self, conv: nn.Conv2d, expansion: int = 4) -> None:
        super().__init__()
        if conv.groups != 1:
            raise UserInputError(f"cannot expand a grouped conv (groups={conv.groups}); exclude it from expansion")
        if conv.padding_mode != "zeros":
            raise UserInputError(f"cannot expand a conv with padding_mode={conv.padding_mode!r}; exclude it")
        if expansion < 1:
            raise UserInputError(f"expansion rate must be ≥ 1, got {expansion}")
        s, t = conv.in_channels, conv.out_channels
        self.expansion = expansion
        self.expand = nn.Conv2d(s, expansion * s, 1, bias=False)
        self.core = nn.Conv2d(
            expansion * s,
            expansion * t,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
        )
        self.project = nn.Conv2d(expansion * t, t, 1, bias=conv.bias is not None)
        self.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if conv.bias is not None and self.project.bias is not None:
            with torch.no_grad():
                self.project.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three convs in sequence (linear: no activation inside)."""
        return self.project(self.core(self.expand(x)))

    def collapsed_weight(self) -> torch.Tensor:
        """The single ``T×S×k×k`` kernel with the same function."""
        a = self.expand.weight[:, :, 0, 0]  # e·S × S
        c = self.project.weight[:, :, 0, 0]  # T × e·T
        return torch.einsum("tb,bahw,as->tshw", c, self.core.weight, a)

    def collapse(self) -> nn.Conv2d:
        """A stock ``nn.Conv2d`` computing exactly this chain."""
        core = self.core
        conv = nn.Conv2d(
            self.expand.in_channels,
            self.project.out_channels,
            core.kernel_size,
            stride=core.stride,
            padding=core.padding,
            dilation=core.dilation,
            bias=self.project.bias is not None,
        ).to(device=core.weight.device, dtype=core.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.collapsed_weight())
            if self.project.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.project.bias)
        return conv

    def factor_matrices(self) -> list[torch.Tensor]:
        """Each conv of the chain as a matrix ``weight.reshape(out, -1)`` (what the regularizers see)."""
        return [m.weight.reshape(m.weight.shape[0], -1) for m in (self.expand, self.core, self.project)]


class ExpandedLinear(nn.Module):
    """``Linear(in→e·in) → Linear(e·in→e·out) → Linear(e·out→out, the original bias)``."""

    def __init__(self, linear: nn.Linear, expansion: int = 4) -> None:
        super().__init__()
        if expansion < 1:
            raise UserInputError(f"expansion rate must be ≥ 1, got {expansion}")
        i, o = linear.in_features, linear.out_features
        self.expansion = expansion
        self.expand = nn.Linear(i, expansion * i, bias=False)
        self.core = nn.Linear(expansion * i, expansion * o, bias=False)
        self.project = nn.Linear(expansion * o, o, bias=linear.bias is not None)
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.bias is not None and self.project.bias is not None:
            with torch.no_grad():
                self.project.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three linear maps in sequence."""
        return self.project(self.core(self.expand(x)))

    def collapse(self) -> nn.Linear:
        """A stock ``nn.Linear`` computing exactly this chain."""
        w = self.project.weight @ self.core.weight @ self.expand.weight
        lin = nn.Linear(w.shape[1], w.shape[0], bias=self.project.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.project.bias is not None and lin.bias is not None:
                lin.bias.copy_(self.project.bias)
        return lin

    def factor_matrices(self) -> list[torch.Tensor]:
        """The three weight matrices."""
        return [self.expand.weight, self.core.weight, self.project.weight]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def expand_(
    model: nn.Module,
    *,
    expansion: int = 4,
    min_kernel: int = 3,
    keep_stem: bool = True,
    linear: bool = False,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Replace k×k convs (k ≥ ``min_kernel``) — and FC layers with ``linear`` — by expanded chains, in place.

    The stem (the first conv) stays when ``keep_stem`` (the spec keeps it when it sees the 3 image
    channels; a 1-channel stem is tiny either way). Grouped convs and other padding modes are left alone.

    Returns:
        Paths of the replaced modules.
    """
    convs = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0][0] if convs else None
    chosen: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(fnmatch.fnmatchcase(path, pat) for pat in exclude):
            continue
        if isinstance(module, nn.Conv2d):
            if (keep_stem and path == stem) or module.groups != 1 or module.padding_mode != "zeros":
                continue
            if min(module.kernel_size) >= min_kernel:
                chosen.append((path, ExpandedConv2d(module, expansion)))
        elif linear and isinstance(module, nn.Linear):
            chosen.append((path, ExpandedLinear(module, expansion)))
    for path, replacement in chosen:
        _set_module(model, path, replacement)
    return [p for p, _ in chosen]


def collapse_(model: nn.Module) -> list[str]:
    """Collapse every expanded chain back to one stock conv / linear layer, in place; return their paths."""
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, (ExpandedConv2d, ExpandedLinear))]
    for path, module in found:
        _set_module(model, path, module.collapse())
    return [p for p, _ in found]


def _inside_chain(model: nn.Module, module: nn.Module) -> bool:
    chains = [m for m in model.modules() if isinstance(m, (ExpandedConv2d, ExpandedLinear))]
    return any(module is sub for chain in chains for sub in chain.modules())


# ------------------------------------------------------------------------------------------ regularizers
def soft_orthogonality(m: torch.Tensor) -> torch.Tensor:
    """``‖M Mᵀ − I‖²_F`` for a wide ``M`` (rows orthonormal), ``‖Mᵀ M − I‖²_F`` for a tall one."""
    p, q = m.shape
    gram = m @ m.T if p <= q else m.T @ m
    eye = torch.eye(gram.shape[0], device=m.device, dtype=m.dtype)
    return ((gram - eye) ** 2).sum()


def srip(m: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SRIP ``σ_max(Mᵀ M − I)²`` on the smaller Gram side, by one power-iteration step from ``v``.

    Returns:
        The penalty and the updated (detached) iteration vector to pass next time.
    """
    p, q = m.shape
    gram = m @ m.T if p <= q else m.T @ m
    d = gram - torch.eye(gram.shape[0], device=m.device, dtype=m.dtype)
    if v is None or v.shape[0] != d.shape[0]:
        v = torch.randn(d.shape[0], device=m.device, dtype=m.dtype)
    v = F.normalize(v.detach(), dim=0)
    u = F.normalize(d @ v, dim=0)
    sigma = (d @ u).norm()  # ≈ σ_max(D) for the symmetric D after one iteration (Bansal et al.'s estimate)
    return sigma**2, u.detach()


@dataclass
class OrthogonalityRegularizer:
    """``λ(progress) · Σ_l R(M_l)`` over the matrices of every expanded chain in the model.

    ``λ`` starts at ``weight``, is multiplied by 0.1 at each of ``milestones`` (fractions of training)
    and is 0 from ``off_after`` on (§4.4's default: ×0.1 at 50 % and 75 %, off for the last 10 %).
    """

    weight: float = 1e-4
    kind: str = "so"
    milestones: tuple[float, ...] = (0.5, 0.75)
    off_after: float = 0.9
    scope: str = "auto"
    name: str = "ortho"

    def __post_init__(self) -> None:
        if self.kind not in ("so", "srip"):
            raise UserInputError(f"unknown orthogonality regularizer {self.kind!r}; use so or srip")
        if self.weight < 0:
            raise UserInputError(f"orthogonality weight must be ≥ 0, got {self.weight}")
        if self.scope not in ("auto", "expanded", "all"):
            raise UserInputError(f"unknown orthogonality scope {self.scope!r}; use auto, expanded or all")
        self._vectors: dict[int, torch.Tensor] = {}

    def weight_at(self, progress: float) -> float:
        """λ at ``progress`` ∈ [0, 1] of the run."""
        if progress >= self.off_after:
            return 0.0
        return self.weight * 0.1 ** sum(progress >= m for m in self.milestones)

    def matrices(self, model: nn.Module) -> list[tuple[int, torch.Tensor]]:
        """``(key, M)`` for every regularized matrix.

        The factors of each expanded chain; or — with ``scope="auto"`` in a model without chains, or
        ``scope="all"`` — every conv/linear weight as ``weight.reshape(out, -1)`` (Bansal et al.'s
        placement; the ablation "orthogonality, no expansion").
        """
        out: list[tuple[int, torch.Tensor]] = []
        if self.scope in ("auto", "expanded"):
            for module in model.modules():
                if isinstance(module, (ExpandedConv2d, ExpandedLinear)):
                    out.extend((id(module) * 4 + i, m) for i, m in enumerate(module.factor_matrices()))
        if self.scope == "all" or (self.scope == "auto" and not out):
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and not _inside_chain(model, module):
                    out.append((id(module) * 4, module.weight.reshape(module.weight.shape[0], -1)))
        return out

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Unweighted ``Σ_l R(M_l)`` (0 when the model has nothing to regularize)."""
        total = None
        for key, m in self.matrices(model):
            if self.kind == "so":
                value = soft_orthogonality(m)
            else:
                value, self._vectors[key] = srip(m, self._vectors.get(key))
            total = value if total is None else total + value
        if total is None:
            param = next(model.parameters(), None)
            return torch.zeros((), device=None if param is None else param.device)
        return total

    def __call__(self, model: nn.Module, progress: float) -> torch.Tensor:
        """The weighted penalty (logged by the trainer under ``name``)."""
        lam = self.weight_at(progress)
        if lam == 0.0:
            param = next(model.parameters(), None)
            return torch.zeros((), device=None if param is None else param.device)
        return lam * self.penalty(model)
