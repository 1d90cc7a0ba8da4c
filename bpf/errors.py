"""The bpf package's exceptions: one tree, each class named after whose fault it was.

- :class:`BpfEncodingError`: a field out of range or bytes that are not a whole
  ``struct sock_filter`` array (the caller built or passed something malformed).
- :class:`BpfValidationError`: a program the kernel would refuse; ``index`` names
  the offending instruction (``None`` for whole-program faults such as length).
- :class:`BpfUnsupportedError`: the interpreter met something it does not model
  (link-layer or ancillary loads); the program may well be valid for the kernel.
- :class:`BpfAttachError`: the kernel refused a socket option; an ``OSError``
  carrying the ``errno``.
"""

from __future__ import annotations

__all__ = [
    "BpfAttachError",
    "BpfEncodingError",
    "BpfError",
    "BpfUnsupportedError",
    "BpfValidationError",
]


class BpfError(Exception):
    """Base class of every error this package raises on purpose."""


class BpfEncodingError(BpfError, ValueError):
    """An instruction field out of range, or bytes that do not decode."""


class BpfValidationError(BpfError, ValueError):
    """A program the kernel's classic BPF checker would reject."""

    def __init__(self, message: str, index: int | None = None) -> None:
        self.index = index
        super().__init__(f"instruction {index}: {message}" if index is not None else message)


class BpfUnsupportedError(BpfError):
    """The interpreter does not model this (valid) instruction or offset."""


class BpfAttachError(BpfError, OSError):
    """A setsockopt/getsockopt on a socket filter failed; ``errno`` says why."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)
