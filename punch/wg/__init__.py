"""WireGuard access for the punch client: one backend interface, two implementations.

:func:`open_backend` picks the userspace UAPI socket (wireguard-go, boringtun) when
``/var/run/wireguard/<iface>.sock`` exists, else kernel WireGuard over generic netlink,
as wireguard-tools does. Never runs the ``wg`` binary.
"""

from typing import TYPE_CHECKING, Any

from .backend import Backend
from .errors import (
    BackendTimeout,
    BackendUnavailable,
    DeviceNotFound,
    InvalidArgument,
    NetlinkOperationError,
    PermissionDenied,
    ProtocolError,
    UapiError,
    WgError,
)
from .link import link_exists, link_up
from .model import Device, Peer
from .selection import open_backend
from .uapi_backend import DEFAULT_UAPI_DIR, UapiBackend
from .x25519 import public_from_private

if TYPE_CHECKING:
    from .netlink import NetlinkBackend


def __getattr__(name: str) -> Any:
    """NetlinkBackend loads on first use: a UAPI device never needs it."""
    if name == "NetlinkBackend":
        from .netlink import NetlinkBackend

        return NetlinkBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Backend",
    "BackendTimeout",
    "BackendUnavailable",
    "DEFAULT_UAPI_DIR",
    "Device",
    "DeviceNotFound",
    "InvalidArgument",
    "NetlinkBackend",
    "NetlinkOperationError",
    "Peer",
    "PermissionDenied",
    "ProtocolError",
    "UapiBackend",
    "UapiError",
    "WgError",
    "link_exists",
    "link_up",
    "open_backend",
    "public_from_private",
]
