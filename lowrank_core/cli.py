"""Command-line plumbing shared by ``python -m compress|export|runtime``.

Follows Polygraphy's ``tools/_main.py``: a ``main(argv) -> int`` whose single expected-error type
(:class:`~lowrank_core.errors.LowrankDeployError`) becomes one line on stderr and exit code 1. Argument
errors are one line too (exit 2), not argparse's usage block.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lowrank_core.errors import LowrankDeployError


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are a single ``prog: error: message`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and exit with status 2."""
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_main(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print expected errors as ``prog: error: message`` and return 1.

    SIGTERM is handled like Ctrl-C (temporary files removed, exit 128 + signal); a full disk, a read-only
    folder or a denied write is one line too (exit 1).
    """
    from lowrank_core.integrity import Terminated, install_signal_handlers

    install_signal_handlers()
    try:
        return main(argv)
    except LowrankDeployError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Terminated as exc:
        print(f"{prog}: terminated ({exc})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" writing {exc.filename!r}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}; free space or choose another OUT", file=sys.stderr)
        return 1


_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
)
"""OSError numbers that are the machine's state, not a bug: reported in one line."""
