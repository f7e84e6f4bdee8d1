"""Data-aware factors on ONNX input: layer inputs collected with ONNX Runtime, whitened (output-error) SVD.

:func:`input_grams` adds each candidate's input tensor as an output of a copy of the graph, runs it on
calibration inputs and accumulates each layer's input second moment ``XXᵀ`` (im2col patches of a conv at
sampled output positions, the features of a Gemm/MatMul). :func:`whitened_svd` then factors a layer
``W`` (``T × k``, im2col layout) as ``Ŵ = U_r U_rᵀ W`` with ``U_r`` the top left singular vectors of
``W L`` (``LLᵀ = XXᵀ``), the rank-``r`` map of that form with the least output error ``‖(W − Ŵ) X‖`` —
for the channel-SVD family (``svd``, ``pointwise-svd``, ``linear-svd``); the other factorizations keep
their weight-space factors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from compress.onnx_in.graph import InputSpec, ort_run
from compress.onnx_in.layers import OnnxLayer
from lowrank_core.errors import UserInputError

__all__ = ["WHITENED", "input_grams", "load_npy_inputs", "whitened_svd"]

WHITENED = ("svd", "pointwise-svd", "linear-svd")
POSITIONS_PER_IMAGE = 64


def load_npy_inputs(folder: str | os.PathLike[str], spec: InputSpec, *, limit: int = 256) -> list[np.ndarray]:
    """Calibration batches from the ``.npy`` files of ``folder`` (each ``(n, *input dims)`` or one input).

    Raises:
        UserInputError: no ``.npy`` file, or an array whose shape does not fit the model's input.
    """
    files = sorted(Path(folder).glob("*.npy"))
    if not files:
        raise UserInputError(f"DATA {str(folder)!r} holds no .npy file of model inputs")
    batches, count = [], 0
    for path in files:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{path} is not a readable .npy array ({exc})") from None
        if array.shape == spec.shape[1:]:
            array = array[None]
        if array.shape[1:] != spec.shape[1:] or not np.isfinite(array).all():
            raise UserInputError(
                f"{path} holds {list(array.shape)}: expected finite inputs of shape [n, {', '.join(map(str, spec.shape[1:]))}]"
            )
        batches.append(array[: limit - count].astype(spec.dtype))
        count += len(batches[-1])
        if count >= limit:
            break
    return batches


def _patches(x: torch.Tensor, layer: OnnxLayer, rng: np.random.Generator) -> torch.Tensor:
    """Sampled im2col columns ``(k, n)`` of a conv's input (``k = S·kh·kw``, PyTorch's unfold order)."""
    a = layer.attrs
    module = layer.module
    assert module is not None
    top, left, bottom, right = a["pads"]
    x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, tuple(module.kernel_size), dilation=tuple(a["dilations"]), stride=tuple(a["strides"]))
    n, k, positions = cols.shape
    take = min(positions, POSITIONS_PER_IMAGE)
    idx = torch.from_numpy(rng.choice(positions, size=take, replace=False))
    return cols[:, :, idx].permute(1, 0, 2).reshape(k, n * take)


def input_grams(
    model: onnx.ModelProto, layers: Sequence[OnnxLayer], batches: Iterable[dict[str, np.ndarray]], *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per layer path, the float64 second moment ``XXᵀ / n`` of its inputs over ``batches`` (ORT feeds)."""
    wanted = [layer for layer in layers if layer.module is not None and layer.reason is None]
    if any(layer.module.groups != 1 for layer in wanted if layer.op == "Conv"):  # type: ignore[union-attr]
        wanted = [layer for layer in wanted if layer.op != "Conv" or layer.module.groups == 1]  # type: ignore[union-attr]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    names = sorted({layer.node.input[0] for layer in wanted})
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    rng = np.random.default_rng(seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for feeds in batches:
        values = ort_run(probe, feeds, outputs=names)
        for layer in wanted:
            x = torch.from_numpy(np.asarray(values[layer.node.input[0]], dtype=np.float64))
            if layer.op == "Conv":
                cols = _patches(x, layer, rng)
            else:
                cols = x.reshape(-1, x.shape[-1]).T if layer.op == "MatMul" or not layer.attrs.get("transA") else x
            gram = cols @ cols.T
            sums[layer.path] = sums.get(layer.path, 0) + gram  # type: ignore[assignment]
            counts[layer.path] = counts.get(layer.path, 0) + int(cols.shape[1])
    return {p: g / max(counts[p], 1) for p, g in sums.items()}


def whitened_svd(weight: torch.Tensor, rank: int, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(first (r, k), second (T, r), output relative error)`` for ``weight`` ``(T, k)`` and input second moment ``gram``.

    ``second @ first = U_r U_rᵀ W`` with ``U_r`` the top left singular vectors of ``W L`` (``L Lᵀ = gram``,
    damped by 1e-6 of its mean eigenvalue so a rank-deficient calibration set still works).
    """
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    g = gram.to(torch.float64)
    k = g.shape[0]
    evals, evecs = torch.linalg.eigh(g + torch.eye(k, dtype=g.dtype) * 1e-6 * float(g.trace()) / max(k, 1))
    root = evecs * evals.clamp_min(0).sqrt()[None, :]  # root @ rootᵀ = gram
    m = w @ root
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    u_r = u[:, :rank]
    first = u_r.T @ w
    resid = m - u_r @ (u_r.T @ m)
    norm = float(torch.linalg.matrix_norm(m))
    return first, u_r, (float(torch.linalg.matrix_norm(resid)) / norm if norm > 0 else 0.0)
