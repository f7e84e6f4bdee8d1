"""CC's input routes (spec §7): which pruned input channels can be removed from their producer conv.

The coupling analysis uses Torch-Pruning's dependency graph; the surgery itself is CC's applier.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Route", "input_routes"]


# ================================================================================================ dependencies
@dataclass(frozen=True)
class Route:
    """How a conv's input channels can be removed: from the producer (``thinned``) or by a ``gather``."""

    kind: str
    producer: str | None = None
    norms: tuple[str, ...] = ()


def input_routes(
    model: nn.Module, example: torch.Tensor, candidates: Sequence[str], producers: Sequence[str]
) -> tuple[dict[str, Route], str | None]:
    """Which candidate convs read a tensor that only they use, made by one plain conv through BN/ReLU.

    Torch-Pruning's dependency graph answers the coupling question: the pruning group of a conv's input
    channels lists every layer that must shrink with them. When that group is just {this conv's input,
    one producer conv's output, BatchNorm2d layers, element-wise ops} with identical indices, the channels
    can be removed physically. Any other group (the residual stream of a ResNet couples every block's conv,
    a concat, a second consumer) means a Gather. Torch-Pruning is used only for this analysis: its pruning
    functions would thin the dense producer before it is decomposed, while the spec removes rows of the
    producer's *final 1×1 factor* (the decomposition is made from the full original weight), and the
    applier must rebuild the architecture from the plan alone (``init="empty"``), so the surgery is ours.

    Args:
        model: The dense model (a copy is traced).
        example: One input batch.
        candidates: The convs whose inputs cc prunes.
        producers: Convs that may be thinned: the candidates and every other plain (``groups=1``) conv, whose
            function does not change when channels that only the pruned consumer read are removed.

    Returns:
        ``(route per candidate, warning or None)``; when the analysis fails every route is ``gather``.
    """
    gather = {p: Route("gather") for p in candidates}
    if not candidates:
        return gather, None
    try:
        import torch_pruning as tp
    except ImportError:
        return gather, (
            "cc: torch-pruning is not installed, so no producer conv is thinned: every pruned input channel is "
            "gathered (pip install 'torch-pruning>=1.5' for physical channel removal)"
        )
    probe = copy.deepcopy(model).cpu().float().eval().requires_grad_(True)
    names = {m: n for n, m in probe.named_modules()}
    cand = set(producers)
    try:
        graph = tp.DependencyGraph().build_dependency(probe, example_inputs=example.cpu().float(), verbose=False)
    except Exception as exc:  # the tracer raises many types on models it cannot follow
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return gather, (
            f"cc: the dependency analysis (Torch-Pruning) failed on this model ({type(exc).__name__}: {reason}), so "
            "no producer conv is thinned: every pruned input channel is gathered"
        )
    routes: dict[str, Route] = {}
    for path in candidates:
        conv = probe.get_submodule(path)
        probe_idx = sorted({0, conv.in_channels - 1})
        group = graph.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=probe_idx)
        producer, norms, local = None, [], True
        for dep, idxs in group:
            module = dep.target.module
            name = names.get(module)
            handler = getattr(dep.handler, "__name__", "")
            if sorted(int(i) for i in idxs) != probe_idx:
                local = False
            elif (module is conv and handler == "prune_in_channels") or dep.target.type == tp.ops.OPTYPE.ELEMENTWISE:
                continue
            elif isinstance(module, nn.BatchNorm2d) and handler == "prune_out_channels" and name is not None:
                norms.append(name)
            elif (
                isinstance(module, nn.Conv2d)
                and handler == "prune_out_channels"
                and module is not conv
                and producer is None
                and name in cand
                and module.groups == 1
            ):
                producer = name
            else:
                local = False
            if not local:
                break
        routes[path] = Route("thinned", producer, tuple(norms)) if local and producer else Route("gather")
    return routes, None
