"""The virtual environment a test hands to ``make`` (``VENV=``): the one running the tests, never another.

``make`` installs the project into ``$(VENV)`` when its stamp is older than ``pyproject.toml``. Deriving
``VENV`` from ``Path(sys.executable).resolve()`` followed ``.venv/bin/python``'s symlink out of the
virtual environment to the interpreter it was made from, so ``make venv`` ran ``pip install -e '.[dev]'``
into the machine's own Python. ``sys.prefix`` is the environment's root without following links; a test
that is not running inside a virtual environment (``sys.prefix == sys.base_prefix``) skips rather than
let ``make`` install anything outside the checkout's venv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

__all__ = ["in_venv", "venv_for_make"]


def in_venv() -> bool:
    """Whether this interpreter runs inside a virtual environment (PEP 405)."""
    return sys.prefix != sys.base_prefix


def venv_for_make() -> Path:
    """``VENV=`` for ``make``: this interpreter's virtual environment (``sys.prefix``, links not followed).

    Skips the calling test, with the reason, when the tests do not run inside a virtual environment.
    """
    if not in_venv():
        pytest.skip(
            f"runs make, which installs the project into VENV; these tests run in {sys.prefix}, not in a virtual "
            "environment, and never install outside one (run them from .venv: make test)"
        )
    venv = Path(sys.prefix)
    assert (venv / "pyvenv.cfg").is_file(), f"{venv} has no pyvenv.cfg: not a virtual environment"
    return venv
