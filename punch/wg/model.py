"""The typed model of a WireGuard device, shared by every backend."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import InvalidArgument

__all__ = ["Peer", "Device", "KEY_LEN", "check_key", "check_endpoint", "check_keepalive"]

KEY_LEN = 32


@dataclass(frozen=True)
class Peer:
    """One peer as the device reports it.

    ``last_handshake`` is unix time in seconds, None if there never was a handshake;
    ``keepalive`` is the persistent keepalive interval in seconds, 0 when off.
    """

    public_key: bytes
    endpoint: tuple[str, int] | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    allowed_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    """A WireGuard interface: its own keys and port, and its peers in device order."""

    name: str
    public_key: bytes | None = None
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[Peer, ...] = ()

    def peer(self, public_key: bytes) -> Peer | None:
        """The peer with this raw 32-byte public key, or None."""
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None

    def __repr__(self) -> str:  # never print the private key
        return (f"Device(name={self.name!r}, public_key={self.public_key!r}, "
                f"private_key={'<set>' if self.private_key else None}, "
                f"listen_port={self.listen_port}, fwmark={self.fwmark}, peers={self.peers!r})")


def check_key(key: bytes, what: str = "public key") -> bytes:
    """Return KEY if it is 32 raw bytes, else raise InvalidArgument."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise InvalidArgument(f"{what} must be {KEY_LEN} raw bytes, got {key!r}")
    return bytes(key)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def check_endpoint(endpoint: tuple[str, int]) -> tuple[IPAddress, int]:
    """Validate an ``(ip, port)`` endpoint; return the parsed address and the port."""
    try:
        host, port = endpoint
    except (TypeError, ValueError):
        raise InvalidArgument(f"endpoint must be (ip, port), got {endpoint!r}") from None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(f"endpoint address is not an IP address: {host!r}") from None
    if getattr(addr, "scope_id", None):
        raise InvalidArgument(f"scoped endpoint addresses are not supported: {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise InvalidArgument(f"endpoint port must be 1..65535, got {port!r}")
    return addr, port


def check_keepalive(keepalive: int) -> int:
    """Validate a persistent keepalive interval in seconds (0 = off)."""
    if not isinstance(keepalive, int) or isinstance(keepalive, bool) or not 0 <= keepalive < 65536:
        raise InvalidArgument(f"keepalive must be 0..65535 seconds, got {keepalive!r}")
    return keepalive
