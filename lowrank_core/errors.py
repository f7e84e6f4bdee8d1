"""One exception hierarchy for the whole pipeline.

Every user-facing failure (bad model name, impossible ratio, corrupt file, missing backend) raises a
subclass of :class:`LowrankDeployError` whose message is one line naming the problem and the fix. The
command lines map that base class to exit code 1 without a traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class LowrankDeployError(Exception):
    """Base class of every expected, user-facing error."""


class UserInputError(LowrankDeployError):
    """A command-line argument or file given by the user is invalid."""


class CompressionError(LowrankDeployError):
    """A compression plan cannot be made or applied (unsupported layer, unreachable ratio, ...)."""


class ExportError(LowrankDeployError):
    """An ONNX export or graph pass failed."""


class ParityError(ExportError):
    """Exported outputs differ from PyTorch by more than the tolerance."""


class RuntimeUnavailableError(LowrankDeployError):
    """A requested backend (CUDA, TensorRT, an ONNX Runtime provider) is not installed or not usable."""
