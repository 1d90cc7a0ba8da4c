"""Choose the backend the way wireguard-tools' ipc.c does: the userspace UAPI socket if
one exists for the interface, else kernel generic netlink."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from .backend import Backend
from .errors import BackendUnavailable
from .uapi_backend import DEFAULT_TIMEOUT, DEFAULT_UAPI_DIR, UapiBackend, uapi_socket_path

__all__ = ["open_backend"]

log = logging.getLogger(__name__)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def open_backend(ifname: str, uapi_dir: Path = DEFAULT_UAPI_DIR, *,
                 timeout: float = DEFAULT_TIMEOUT) -> Backend:
    """A backend for IFNAME: UAPI if ``UAPI_DIR/IFNAME.sock`` is a socket, else netlink."""
    path = uapi_socket_path(ifname, uapi_dir)
    if _is_socket(path):
        log.debug("%s: using the userspace socket %s", ifname, path)
        return UapiBackend(ifname, uapi_dir=uapi_dir, timeout=timeout)
    try:
        from .netlink import NetlinkBackend  # only without a UAPI socket

        backend = NetlinkBackend(ifname)
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{ifname}: no WireGuard kernel module and no userspace socket "
                                 f"at {path}", ifname) from e
    log.debug("%s: using kernel WireGuard over netlink", ifname)
    return backend
