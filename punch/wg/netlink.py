"""The kernel backend: generic netlink family "wireguard" through pyroute2.

:func:`device_from_messages` is the pure part: it turns the messages of one
``WG_CMD_GET_DEVICE`` dump (as pyroute2 decodes them) into a :class:`Device`. A dump
of a big device spans several messages: only the first carries the device's own
attributes, and a peer whose allowed IPs did not fit continues in the next message
with just its public key and more allowed IPs.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from base64 import b64decode, b64encode
from collections.abc import Iterable
from typing import Any

from .backend import Backend
from .errors import (
    BackendUnavailable,
    DeviceNotFound,
    NetlinkOperationError,
    PermissionDenied,
    ProtocolError,
    WgError,
)
from .model import KEY_LEN, Device, Peer, check_endpoint, check_keepalive, check_key

__all__ = ["NetlinkBackend", "device_from_messages", "netlink_error"]

log = logging.getLogger(__name__)


def _key(value: Any, what: str) -> bytes:
    """pyroute2 hands keys over base64-encoded; we want 32 raw bytes."""
    try:
        raw = b64decode(value, validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise ProtocolError(f"netlink {what}: not a base64 {KEY_LEN}-byte key: {value!r}")
    return raw


def _allowed_ip(nla: Any) -> str:
    family = nla.get_attr("WGALLOWEDIP_A_FAMILY")
    addr_hex = nla.get_attr("WGALLOWEDIP_A_IPADDR")
    cidr = nla.get_attr("WGALLOWEDIP_A_CIDR_MASK")
    if addr_hex is None or cidr is None:
        raise ProtocolError(f"netlink allowed IP without address or mask: {nla!r}")
    raw = bytes.fromhex(addr_hex.replace(":", "")) if isinstance(addr_hex, str) else bytes(addr_hex)
    if len(raw) not in (4, 16) or (family is not None and family not in (2, 10)):
        raise ProtocolError(f"netlink allowed IP: family {family}, address {addr_hex!r}")
    try:
        return str(ipaddress.ip_network((ipaddress.ip_address(raw), cidr), strict=False))
    except ValueError:
        raise ProtocolError(f"netlink allowed IP: bad mask /{cidr} for {addr_hex!r}") from None


class _PeerAcc:
    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.endpoint: tuple[str, int] | None = None
        self.last_handshake: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.keepalive = 0
        self.allowed_ips: list[str] = []

    def update(self, nla: Any) -> None:
        ep = nla.get_attr("WGPEER_A_ENDPOINT")
        if ep is not None:
            self.endpoint = (ep["addr"], int(ep["port"]))
        hs = nla.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
        if hs is not None and (hs["tv_sec"] or hs["tv_nsec"]):
            self.last_handshake = hs["tv_sec"] + hs["tv_nsec"] / 1e9
        for attr, name in (("WGPEER_A_RX_BYTES", "rx_bytes"), ("WGPEER_A_TX_BYTES", "tx_bytes"),
                           ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "keepalive")):
            value = nla.get_attr(attr)
            if value is not None:
                setattr(self, name, int(value))
        for aip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ():
            self.allowed_ips.append(_allowed_ip(aip))

    def freeze(self) -> Peer:
        return Peer(self.public_key, self.endpoint, self.last_handshake, self.rx_bytes,
                    self.tx_bytes, self.keepalive, tuple(self.allowed_ips))


def device_from_messages(ifname: str, messages: Iterable[Any]) -> Device:
    """Merge the messages of one get-device dump (pyroute2 ``wgmsg`` objects) into a Device."""
    name = ifname
    public_key = private_key = None
    listen_port = fwmark = 0
    peers: dict[bytes, _PeerAcc] = {}
    seen = False
    for msg in messages:
        seen = True
        if msg.get_attr("WGDEVICE_A_IFNAME") is not None:
            name = msg.get_attr("WGDEVICE_A_IFNAME")
        if msg.get_attr("WGDEVICE_A_PUBLIC_KEY") is not None:
            public_key = _key(msg.get_attr("WGDEVICE_A_PUBLIC_KEY"), "device public key")
        if msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None:
            private_key = _key(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"), "device private key")
        if msg.get_attr("WGDEVICE_A_LISTEN_PORT") is not None:
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT"))
        if msg.get_attr("WGDEVICE_A_FWMARK") is not None:
            fwmark = int(msg.get_attr("WGDEVICE_A_FWMARK"))
        for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _key(nla.get_attr("WGPEER_A_PUBLIC_KEY"), "peer public key")
            acc = peers.get(key)
            if acc is None:
                acc = peers[key] = _PeerAcc(key)
            acc.update(nla)
    if not seen:
        raise ProtocolError(f"{ifname}: empty netlink reply to get-device", ifname)
    return Device(name, public_key, private_key, listen_port, fwmark,
                  tuple(p.freeze() for p in peers.values()))


def netlink_error(e: Exception, ifname: str, operation: str) -> WgError:
    """Our error for a pyroute2 NetlinkError raised by OPERATION on IFNAME."""
    code = abs(getattr(e, "code", 0) or 0)
    if code == errno.ENODEV:
        return DeviceNotFound(f"{ifname}: no such interface", ifname)
    if code == errno.EOPNOTSUPP:
        return DeviceNotFound(f"{ifname}: not a WireGuard interface", ifname)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{ifname}: netlink {operation} needs CAP_NET_ADMIN (run as "
                                "root)", ifname)
    return NetlinkOperationError(code, operation, ifname)


class NetlinkBackend(Backend):
    """Kernel WireGuard through pyroute2's generic netlink socket.

    The socket is opened in the constructor, so it talks to the network namespace the
    calling thread is in at that moment.
    """

    kind = "netlink"

    def __init__(self, ifname: str) -> None:
        super().__init__(ifname)
        try:
            from pyroute2 import WireGuard
            from pyroute2.netlink.exceptions import NetlinkError
        except ImportError as e:  # pragma: no cover - pyroute2 is a dependency
            raise BackendUnavailable(f"{ifname}: pyroute2 is not importable: {e}", ifname) from e
        self._NetlinkError = NetlinkError
        try:
            self._wg: Any = WireGuard()
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                raise BackendUnavailable(
                    f"{ifname}: no WireGuard kernel module (generic netlink family "
                    "'wireguard' not found)", ifname) from None
            raise netlink_error(e, ifname, "open") from None

    def get_device(self) -> Device:
        try:
            messages = self._wg.info(self.ifname)
        except self._NetlinkError as e:
            raise netlink_error(e, self.ifname, "get") from None
        return device_from_messages(self.ifname, messages)

    def set_peer(self, public_key: bytes, *, endpoint: tuple[str, int] | None = None,
                 keepalive: int | None = None) -> None:
        # pyroute2 sends only what the dict holds: no allowed IPs and no replace flag, so
        # the kernel keeps the peer's allowed IPs; update_only keeps it from creating one.
        peer: dict[str, Any] = {"public_key": b64encode(check_key(public_key)).decode(),
                                "update_only": True}
        if endpoint is not None:
            addr, port = check_endpoint(endpoint)
            peer["endpoint_addr"] = str(addr)
            peer["endpoint_port"] = port
        if keepalive is not None:
            peer["persistent_keepalive"] = check_keepalive(keepalive)
        try:
            self._wg.set(self.ifname, peer=peer)
        except self._NetlinkError as e:
            raise netlink_error(e, self.ifname, "set") from None
        log.debug("%s: set peer %s endpoint=%s keepalive=%s", self.ifname,
                  public_key.hex()[:8], endpoint, keepalive)

    def close(self) -> None:
        wg, self._wg = getattr(self, "_wg", None), None
        if wg is not None:
            wg.close()
