"""Interface state through rtnetlink (pyroute2.IPRoute); works for kernel WireGuard and
for wireguard-go's tun device alike."""

from __future__ import annotations

import errno
import logging
from typing import Any

from .errors import DeviceNotFound, PermissionDenied, WgError

__all__ = ["link_exists", "link_up"]

log = logging.getLogger(__name__)


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def link_exists(ifname: str) -> bool:
    """True if an interface named IFNAME exists in the current network namespace."""
    with _iproute() as ip:
        return bool(ip.link_lookup(ifname=ifname))


def link_up(ifname: str) -> None:
    """Set IFNAME administratively up (a no-op if it already is)."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ip:
        index = ip.link_lookup(ifname=ifname)
        if not index:
            raise DeviceNotFound(f"{ifname}: no such interface", ifname)
        try:
            ip.link("set", index=index[0], state="up")
        except NetlinkError as e:
            if e.code in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(f"{ifname}: setting the link up needs CAP_NET_ADMIN",
                                       ifname) from None
            if e.code == errno.ENODEV:
                raise DeviceNotFound(f"{ifname}: no such interface", ifname) from None
            raise WgError(f"{ifname}: cannot set the link up: {e}", ifname) from None
    log.debug("%s: link up", ifname)
