"""Work that does not depend on the target, kept across the plans of one latency solve.

The latency solver (:mod:`compress.latency.solve`) plans the same model at up to ~30 knob values. Inside
:func:`reuse_scope` the knob-independent parts — CC's gradient statistics, sensitivity curves and heuristic
trajectories, LRSD's calibration images and statistics, ``auto``'s candidate errors — are computed once
and looked up afterwards by :func:`memoized`. Keys are content fingerprints (:func:`fingerprint`) of the
weights and data involved, so a deep copy of the model finds the entries of the original, and a changed
weight never finds a stale one. Outside a scope :func:`memoized` just computes: plans are the same with
or without the scope.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["Memo", "active_memo", "fingerprint", "memoized", "reuse_scope"]

T = TypeVar("T")


class Memo:
    """Results by ``(kind, key)``, with per-kind compute counts (``computed``) and hits (``hits``)."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, Hashable], Any] = {}
        self.computed: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def get(self, kind: str, key: Hashable, compute: Callable[[], T]) -> T:
        """The stored result of ``(kind, key)``, computing and storing it on the first call."""
        full = (kind, key)
        if full in self.store:
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return self.store[full]
        value = compute()
        self.store[full] = value
        self.computed[kind] = self.computed.get(kind, 0) + 1
        return value


_ACTIVE: ContextVar[Memo | None] = ContextVar("lowrank_deploy_reuse", default=None)


def active_memo() -> Memo | None:
    """The memo of the enclosing :func:`reuse_scope`, or ``None``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def reuse_scope() -> Iterator[Memo]:
    """Within the block, :func:`memoized` keeps its results (a nested scope shares the outer one's memo)."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    memo = Memo()
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)


def memoized(kind: str, key: Callable[[], Hashable], compute: Callable[[], T]) -> T:
    """``compute()``, or inside a :func:`reuse_scope` its stored result for ``key()`` (the key is built only there)."""
    memo = _ACTIVE.get()
    if memo is None:
        return compute()
    return memo.get(kind, key(), compute)


def _feed(h: Any, obj: Any) -> None:
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, nn.Module):
        h.update(b"M")
        for name, value in obj.state_dict().items():
            h.update(name.encode())
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def fingerprint(*objs: Any) -> str:
    """A content digest of tensors, modules (their state dict), sequences, dicts and plain values."""
    h = hashlib.blake2b(digest_size=20)
    for obj in objs:
        _feed(h, obj)
    return h.hexdigest()
