"""Compression methods: one module (or small package) each, found by the registry.

Every module of this package registers its methods on import (:func:`compress.methods.base.register`);
:func:`load_methods` imports them all, then the ``lowrank_deploy.methods`` entry points of installed
packages, so a new method is one new module here — or one entry point in a third-party package, pointing
at a module that registers on import or at a :class:`~compress.methods.base.Method` instance.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from typing import Any

from compress.methods.base import ENTRY_POINT_GROUP, REGISTRY, Method, Needs, Option, register
from compress.targets import Target
from lowrank_core.errors import UserInputError

__all__ = ["Method", "Needs", "Option", "get_method", "load_methods", "method_config", "method_names", "register"]

_loaded = False
_DEFAULT: Any = object()


def load_methods() -> dict[str, Method]:
    """Import every built-in method module and every ``lowrank_deploy.methods`` entry point (once)."""
    global _loaded
    if _loaded:
        return REGISTRY
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:  # a broken plug-in must not take the built-in methods down
            raise UserInputError(
                f"method plug-in {entry.name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}; "
                "fix or uninstall that package"
            ) from exc
        if isinstance(loaded, Method) and loaded.name not in REGISTRY:
            register(loaded)
    return REGISTRY


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        UserInputError: no such method (the message lists the known ones).
    """
    methods = load_methods()
    try:
        return methods[name]
    except KeyError:
        raise UserInputError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}") from None


def method_names() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(load_methods())


def method_config(name: str, *, ratio: Any = _DEFAULT, flops: float | None = None, **options: Any) -> Any:
    """Build the config of method ``name``.

    Without ``ratio`` and ``flops`` the method's default target applies (``RATIO=4``; ``FLOPS=0.5`` for
    ``cc``); ``ratio=None`` without ``flops`` means no target (the method's own knob: EVBMF's ω, joint
    SVD's ρ, …). Other options that are ``None`` fall back to the config's defaults.

    Raises:
        UserInputError: unknown method, an option it does not take, or an invalid target.
    """
    method = get_method(name)
    given_ratio = None if ratio is _DEFAULT else ratio
    target = Target.from_options(ratio=given_ratio, flops=flops)
    use_default = target is None and ratio is _DEFAULT
    return method.make_config(target, use_default_target=use_default, **options)
