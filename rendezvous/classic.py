"""The classic rendezvous wire protocol, byte-compatible with wireguard-tools'
contrib/nat-hole-punching example.

Request (client -> server, UDP, default port 49918): exactly 64 bytes,
``my_pubkey`` (32 raw bytes) followed by ``their_pubkey`` (32 raw bytes).

Reply (server -> client): exactly 6 bytes, the requested peer's observed IPv4
address and UDP port in network byte order; or an empty datagram when the server
knows no address for ``their_pubkey``.

Pure functions on bytes; no I/O.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PORT",
    "KEY_LEN",
    "REQUEST_LEN",
    "REPLY_LEN",
    "ZERO_KEY",
    "ClassicError",
    "Endpoint",
    "Request",
    "decode_reply",
    "encode_reply",
    "format_endpoint",
    "short_key",
]

DEFAULT_PORT = 49918
KEY_LEN = 32
REQUEST_LEN = 2 * KEY_LEN
REPLY_LEN = 6
ZERO_KEY = bytes(KEY_LEN)

_REPLY = struct.Struct("!4sH")


class ClassicError(ValueError):
    """A datagram that is not a well-formed classic message."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IPv4 address and UDP port, as carried in a classic reply."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError:
            raise ClassicError(f"endpoint ip {self.ip!r} is not an IPv4 address") from None
        if not 0 <= self.port <= 0xFFFF:
            raise ClassicError(f"endpoint port {self.port} is out of range 0..65535")

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    def packed(self) -> bytes:
        """The 6-byte wire form (also the registry's compact value)."""
        return _REPLY.pack(ipaddress.IPv4Address(self.ip).packed, self.port)

    @classmethod
    def unpack(cls, data: bytes) -> Endpoint:
        if len(data) != REPLY_LEN:
            raise ClassicError(f"endpoint must be {REPLY_LEN} bytes, got {len(data)}")
        raw_ip, port = _REPLY.unpack(data)
        return cls(str(ipaddress.IPv4Address(raw_ip)), port)


@dataclass(frozen=True, slots=True)
class Request:
    """``{my_pubkey, their_pubkey}``: register me, tell me where they are."""

    my_key: bytes
    their_key: bytes

    def __post_init__(self) -> None:
        for name in ("my_key", "their_key"):
            value = getattr(self, name)
            if len(value) != KEY_LEN:
                raise ClassicError(f"{name} must be {KEY_LEN} bytes, got {len(value)}")

    def to_bytes(self) -> bytes:
        return self.my_key + self.their_key

    @classmethod
    def from_bytes(cls, data: bytes) -> Request:
        if len(data) != REQUEST_LEN:
            raise ClassicError(f"classic request must be {REQUEST_LEN} bytes, got {len(data)}")
        return cls(bytes(data[:KEY_LEN]), bytes(data[KEY_LEN:]))


def encode_reply(endpoint: Endpoint | None) -> bytes:
    """6 bytes for a known peer, empty for an unknown one."""
    return b"" if endpoint is None else endpoint.packed()


def decode_reply(data: bytes) -> Endpoint | None:
    """The inverse of :func:`encode_reply`; any other length is an error."""
    if len(data) == 0:
        return None
    if len(data) != REPLY_LEN:
        raise ClassicError(f"classic reply must be 0 or {REPLY_LEN} bytes, got {len(data)}")
    return Endpoint.unpack(data)


def short_key(key: bytes) -> str:
    """A key as people see it in `wg` output, shortened: the first 8 base64 characters."""
    return base64.b64encode(key).decode()[:8] + "…"


def format_endpoint(packed: bytes) -> str:
    """A packed 4-byte IPv4 + 2-byte port as ip:port."""
    return f"{'.'.join(str(b) for b in packed[:4])}:{int.from_bytes(packed[4:6], 'big')}"
