"""One error tree for everything that can go wrong talking to WireGuard.

Every message names the interface, so a log line is enough to tell which device failed.
"""

from __future__ import annotations

import os

__all__ = [
    "WgError",
    "DeviceNotFound",
    "BackendUnavailable",
    "PermissionDenied",
    "BackendTimeout",
    "UapiError",
    "NetlinkOperationError",
    "ProtocolError",
    "InvalidArgument",
]


class WgError(Exception):
    """Base class of every error raised by :mod:`punch.wg`."""

    def __init__(self, message: str, ifname: str | None = None) -> None:
        super().__init__(message)
        self.ifname = ifname


class DeviceNotFound(WgError):
    """The interface does not exist, or is not a WireGuard interface."""


class BackendUnavailable(WgError):
    """Neither a usable userspace socket nor kernel WireGuard is there to talk to."""


class PermissionDenied(WgError):
    """The caller lacks the privilege (CAP_NET_ADMIN, socket permissions)."""


class BackendTimeout(WgError):
    """The backend did not answer in time."""


class UapiError(WgError):
    """The userspace implementation answered ``errno=N`` with N != 0."""

    def __init__(self, errno: int, operation: str, ifname: str | None = None) -> None:
        self.errno = abs(errno)
        self.operation = operation
        super().__init__(
            f"{ifname or '?'}: UAPI {operation} failed: errno={errno} "
            f"({os.strerror(self.errno)})",
            ifname,
        )


class NetlinkOperationError(WgError):
    """Kernel WireGuard refused a netlink request with an errno we have no better class for."""

    def __init__(self, errno: int, operation: str, ifname: str | None = None) -> None:
        self.errno = abs(errno)
        self.operation = operation
        super().__init__(
            f"{ifname or '?'}: netlink {operation} failed: errno={self.errno} "
            f"({os.strerror(self.errno)})",
            ifname,
        )


class ProtocolError(WgError):
    """The backend sent something we cannot parse (the remote side's fault)."""


class InvalidArgument(WgError, ValueError):
    """The caller passed a value that cannot be sent (our caller's fault)."""
