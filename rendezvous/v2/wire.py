"""The v2 wire codec (docs/PROTOCOL.md): header, endpoints and plaintext bodies.

Pure functions and frozen dataclasses on bytes; no I/O and no cryptography (sealing
and opening live in :mod:`rendezvous.v2.crypto`).

Parsing is strict about the header (magic, version, a known type, zero reserved
bytes) and lax about plaintexts: a receiver reads the fields it knows and ignores
trailing bytes and reserved plaintext bytes, so a newer sender may add fields.
Senders always write reserved bytes as zero. Every error is a :class:`WireError`
whose message names the field and its value.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

__all__ = [
    "BIND_LEN",
    "BIND_PLAIN_LEN",
    "ENDPOINT_LEN",
    "FLAG_RELAY",
    "HEADER_LEN",
    "KEY_LEN",
    "MAGIC",
    "MAX_ENDPOINTS",
    "NONCE_LEN",
    "NONE_BYTES",
    "NOTIFY_PLAIN_MIN",
    "RELAY_LEN",
    "RELAY_PLAIN_LEN",
    "REPLY_PLAIN_MIN",
    "REQUEST_AD_LEN",
    "REQUEST_LEN",
    "REQUEST_PLAIN_LEN",
    "SERVER_MSG_OVERHEAD",
    "TAG_LEN",
    "VERSION",
    "BindBody",
    "BytesLike",
    "Endpoint",
    "MsgType",
    "NotifyBody",
    "RelayBody",
    "ReplyBody",
    "RequestBody",
    "Status",
    "WireError",
    "endpoint_bytes",
    "endpoint_or_none",
    "header",
    "looks_like_v2",
    "notify_len",
    "parse_header",
    "reply_len",
]

BytesLike = bytes | bytearray | memoryview  # what the decoders accept

MAGIC = b"wgp"
VERSION = 2
HEADER_LEN = 8
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
ENDPOINT_LEN = 18
MAX_ENDPOINTS = 2
REQUEST_PLAIN_LEN = 48
REQUEST_AD_LEN = HEADER_LEN + KEY_LEN  # associated data of a request: header || client_public
REQUEST_LEN = REQUEST_AD_LEN + NONCE_LEN + REQUEST_PLAIN_LEN + TAG_LEN  # 116
SERVER_MSG_OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN  # reply/notify bytes around the plaintext
REPLY_PLAIN_MIN = 34  # 16 fixed bytes + observed endpoint
NOTIFY_PLAIN_MIN = 44
NONE_BYTES = bytes(ENDPOINT_LEN)  # the all-zero endpoint ("::" port 0) means "none"
FLAG_RELAY = 0x01  # request flags: "and give this pair a relay" (docs/PROTOCOL.md, "Relay")
RELAY_PLAIN_LEN = 66  # server_time, request_id, flags, reserved, peer, relay endpoint
RELAY_LEN = SERVER_MSG_OVERHEAD + RELAY_PLAIN_LEN  # 102
BIND_PLAIN_LEN = 40  # timestamp, peer
BIND_LEN = REQUEST_AD_LEN + NONCE_LEN + BIND_PLAIN_LEN + TAG_LEN  # 108

_PREFIX = MAGIC + bytes((VERSION,))
_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6
_UNSPEC6, _UNSPEC4 = bytes(16), _MAPPED + bytes(4)
_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF

_REQUEST = struct.Struct("!QIBBH32s")  # timestamp, request_id, flags, nat, reserved, peer
_REPLY = struct.Struct("!IBBBBQ")  # request_id, status, peer_nat, count, reserved, server_time
_NOTIFY = struct.Struct("!Q32sBBH")  # server_time, peer, peer_nat, count, reserved
_RELAY = struct.Struct("!QIB3s32s")  # server_time, request_id, flags, reserved, peer
_BIND = struct.Struct("!Q32s")  # timestamp, peer
_PORT = struct.Struct("!H")
assert _REQUEST.size == REQUEST_PLAIN_LEN and _REPLY.size + ENDPOINT_LEN == REPLY_PLAIN_MIN
assert _NOTIFY.size == NOTIFY_PLAIN_MIN
assert _RELAY.size + ENDPOINT_LEN == RELAY_PLAIN_LEN and _BIND.size == BIND_PLAIN_LEN


class WireError(ValueError):
    """A malformed v2 datagram or field; the message names the field and value."""


class MsgType(IntEnum):
    REQUEST = 1
    REPLY = 2
    NOTIFY = 3
    RELAY = 4  # server -> client: the relay endpoint for a pair
    BIND = 5  # client -> relay: "the datagrams of this pair from me come from here"


class Status(IntEnum):
    FOUND = 0
    PENDING = 1
    STALE = 2


_TYPES = {int(t): t for t in MsgType}  # type byte -> MsgType
_HEADERS = {_PREFIX + bytes((t, 0, 0, 0)): t for t in MsgType}  # the 3 valid headers


def looks_like_v2(data: BytesLike) -> bool:
    """Cheap hot-path test: longer than a classic request and starts ``wgp`` 2."""
    return len(data) > 64 and data[:4] == _PREFIX


def header(t: MsgType) -> bytes:
    """The 8-byte cleartext header of a message of type ``t``."""
    try:
        return _PREFIX + bytes((MsgType(t), 0, 0, 0))
    except ValueError:
        raise WireError(f"type {t!r} is not a known message type (1..5)") from None


def parse_header(data: BytesLike) -> MsgType:
    """The type of a datagram whose header is valid; :class:`WireError` otherwise."""
    t = _HEADERS.get(bytes(data[:HEADER_LEN]))
    if t is not None:
        return t
    if len(data) < HEADER_LEN:
        raise WireError(
            f"datagram of {len(data)} bytes is shorter than the {HEADER_LEN}-byte header"
        )
    if data[:3] != MAGIC:
        raise WireError(f"magic {bytes(data[:3]).hex()} is not {MAGIC.hex()}")
    if data[3] != VERSION:
        raise WireError(f"version {data[3]} is not {VERSION}")
    if data[4] not in _TYPES:
        raise WireError(f"type {data[4]} is not a known message type (1..5)")
    raise WireError(f"reserved header bytes {bytes(data[5:8]).hex()} are not zero")


def _uint(name: str, value: object, mask: int) -> int:
    if type(value) is int and 0 <= value <= mask:  # the common case, fast
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= mask:
        raise WireError(f"{name} {value!r} is not an integer in 0..{mask}")
    return value


def _key(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != KEY_LEN:
        size = (
            len(value)
            if isinstance(value, (bytes, bytearray, memoryview))
            else type(value).__name__
        )
        raise WireError(f"{name} must be {KEY_LEN} bytes, got {size}")
    return bytes(value)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IPv4 or IPv6 address and UDP port.

    The address is normalised on construction: ``"2001:DB8::1"`` becomes
    ``"2001:db8::1"`` and an IPv4-mapped ``"::ffff:1.2.3.4"`` becomes ``"1.2.3.4"``, so
    equal endpoints compare equal whatever their spelling. Scoped addresses
    (``fe80::1%eth0``) are refused: a scope does not cross the wire.
    """

    ip: str
    port: int
    _addr: bytes = field(init=False, repr=False, compare=False)  # 16 bytes, IPv4 mapped

    def __post_init__(self) -> None:
        if not isinstance(self.ip, str):
            raise WireError(f"endpoint ip {self.ip!r} is not a string")
        _uint("endpoint port", self.port, _U16)
        try:
            addr = _MAPPED + socket.inet_pton(socket.AF_INET, self.ip)
        except (OSError, ValueError):
            try:
                addr = socket.inet_pton(socket.AF_INET6, self.ip)
            except (OSError, ValueError):
                raise WireError(f"endpoint ip {self.ip!r} is not an IPv4 or IPv6 address") from None
        object.__setattr__(self, "ip", _ntop(addr))
        object.__setattr__(self, "_addr", addr)

    @classmethod
    def _from_addr(cls, addr: bytes, port: int) -> Endpoint:
        # Fast path for decoded bytes: the address is already 16 valid bytes.
        self = object.__new__(cls)
        object.__setattr__(self, "ip", _ntop(addr))
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "_addr", addr)
        return self

    @property
    def family(self) -> int:
        """4 or 6."""
        return 4 if self._addr[:12] == _MAPPED else 6

    @property
    def is_none(self) -> bool:
        """True for the all-zero endpoint ``[::]:0``, which the wire uses for "none"."""
        return self.port == 0 and self._addr == bytes(16)

    @property
    def usable(self) -> bool:
        """False for port 0 or an unspecified address (``::``, ``0.0.0.0``): nobody can
        send to those, so a reply or notify never carries them as peer endpoints."""
        return self.port != 0 and self._addr != _UNSPEC6 and self._addr != _UNSPEC4

    def to_bytes(self) -> bytes:
        """The 18-byte wire form: 16-byte address (IPv4 mapped) and port."""
        return self._addr + _PORT.pack(self.port)

    @classmethod
    def from_bytes(cls, data: BytesLike) -> Endpoint:
        """The inverse of :meth:`to_bytes` (all-zero bytes give ``[::]:0``)."""
        if len(data) != ENDPOINT_LEN:
            raise WireError(f"endpoint must be {ENDPOINT_LEN} bytes, got {len(data)}")
        return cls._from_addr(bytes(data[:16]), _PORT.unpack_from(data, 16)[0])

    def source_bytes(self) -> bytes:
        """The server's packed source form: 4+2 bytes for IPv4, 16+2 for IPv6."""
        addr = self._addr[12:] if self._addr[:12] == _MAPPED else self._addr
        return addr + _PORT.pack(self.port)

    @classmethod
    def from_source(cls, packed: BytesLike) -> Endpoint:
        """The inverse of :meth:`source_bytes` (an IPv4-mapped 18-byte source is IPv4).

        Memoised (endpoints are immutable): the server sees the same sources again and again.
        """
        if len(packed) != 6 and len(packed) != 18:
            raise WireError(f"packed source must be 6 or 18 bytes, got {len(packed)}")
        return _from_source(bytes(packed))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"1.2.3.4:5"`` or ``"[2001:db8::1]:5"`` (the form :meth:`__str__` prints)."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if ":" not in host:
                sep = ""  # brackets are for IPv6 only
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                sep = ""  # a bare IPv6 address needs brackets
        if not sep or not port.isdigit() or not port.isascii():
            raise WireError(f"endpoint {text!r} is not ip:port or [ipv6]:port")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}" if self.family == 4 else f"[{self.ip}]:{self.port}"


@lru_cache(maxsize=4096)
def _from_source(packed: bytes) -> Endpoint:
    if len(packed) == 6:
        return Endpoint._from_addr(_MAPPED + packed[:4], _PORT.unpack_from(packed, 4)[0])
    return Endpoint._from_addr(packed[:16], _PORT.unpack_from(packed, 16)[0])


def _ntop(addr: bytes) -> str:
    if addr[:12] == _MAPPED:
        return socket.inet_ntop(socket.AF_INET, addr[12:])
    return socket.inet_ntop(socket.AF_INET6, addr)


def endpoint_or_none(data: BytesLike) -> Endpoint | None:
    """Decode 18 bytes, with the all-zero endpoint as None."""
    if data == NONE_BYTES:
        return None
    return Endpoint.from_bytes(data)


def endpoint_bytes(endpoint: Endpoint | None) -> bytes:
    """The inverse of :func:`endpoint_or_none`."""
    return NONE_BYTES if endpoint is None else endpoint.to_bytes()


def reply_len(count: int) -> int:
    """Size on the wire of a reply carrying ``count`` peer endpoints (70, 88, 106)."""
    return SERVER_MSG_OVERHEAD + REPLY_PLAIN_MIN + ENDPOINT_LEN * count


def notify_len(count: int) -> int:
    """Size on the wire of a notify carrying ``count`` peer endpoints (98, 116)."""
    return SERVER_MSG_OVERHEAD + NOTIFY_PLAIN_MIN + ENDPOINT_LEN * count


def _peer_endpoints(name: str, value: object, low: int) -> tuple[Endpoint, ...]:
    if not isinstance(value, (tuple, list)):
        raise WireError(f"{name} must be a tuple of Endpoint, got {type(value).__name__}")
    if not low <= len(value) <= MAX_ENDPOINTS:
        raise WireError(f"{name} count {len(value)} is not in {low}..{MAX_ENDPOINTS}")
    for i, ep in enumerate(value):
        if not isinstance(ep, Endpoint):
            raise WireError(f"{name}[{i}] {ep!r} is not an Endpoint")
        if not ep.usable:
            raise WireError(f"{name}[{i}] {ep} is not a usable peer endpoint")
    return tuple(value)


def _decode_endpoints(name: str, data: BytesLike, offset: int, count: int) -> tuple[Endpoint, ...]:
    need = offset + ENDPOINT_LEN * count
    if len(data) < need:
        raise WireError(
            f"{name} plaintext of {len(data)} bytes is too short for {count} endpoints ({need})"
        )
    return tuple(
        Endpoint.from_bytes(data[o : o + ENDPOINT_LEN]) for o in range(offset, need, ENDPOINT_LEN)
    )


@dataclass(frozen=True)
class RequestBody:
    """The 48-byte plaintext of a request (type 1)."""

    timestamp: int  # client time, ns since the Unix epoch, strictly increasing per key
    request_id: int  # random, non-zero, echoed in the reply
    peer: bytes  # the peer's public key (may be the client's own: "where am I?")
    nat: int = 0  # the client's NAT verdict
    flags: int = 0  # reserved, zero

    def __post_init__(self) -> None:
        _uint("timestamp", self.timestamp, _U64)
        _uint("request_id", self.request_id, _U32)
        if self.request_id == 0:
            raise WireError("request_id 0 is not allowed (must be non-zero)")
        object.__setattr__(self, "peer", _key("peer", self.peer))
        _uint("nat", self.nat, _U8)
        _uint("flags", self.flags, _U8)

    def to_bytes(self) -> bytes:
        return _REQUEST.pack(self.timestamp, self.request_id, self.flags, self.nat, 0, self.peer)

    @classmethod
    def from_bytes(cls, data: BytesLike) -> RequestBody:
        """Decode a plaintext; bytes after the 48 known ones are ignored."""
        if len(data) < REQUEST_PLAIN_LEN:
            raise WireError(
                f"request plaintext of {len(data)} bytes is shorter than {REQUEST_PLAIN_LEN}"
            )
        ts, rid, flags, nat, _reserved, peer = _REQUEST.unpack_from(data)
        if rid == 0:
            raise WireError("request_id 0 is not allowed (must be non-zero)")
        # struct guarantees every range: skip __post_init__ on this hot path.
        self = object.__new__(cls)
        self.__dict__.update(timestamp=ts, request_id=rid, peer=peer, nat=nat, flags=flags)
        return self


@dataclass(frozen=True)
class ReplyBody:
    """The plaintext of a reply (type 2): 34 + 18·n bytes."""

    request_id: int
    status: Status
    server_time: int  # ns since the epoch; for STALE, the lowest timestamp accepted next
    observed: Endpoint | None  # the requester as the server saw it (None: the zero endpoint)
    endpoints: tuple[Endpoint, ...] = ()  # FOUND: the peer's endpoints, IPv6 first (0..2)
    peer_nat: int = 0

    def __post_init__(self) -> None:
        _uint("request_id", self.request_id, _U32)
        if type(self.status) is not Status:
            if isinstance(self.status, bool):
                raise WireError(f"status {self.status!r} is not a known status (0..2)")
            try:
                object.__setattr__(self, "status", Status(self.status))
            except ValueError:
                raise WireError(f"status {self.status!r} is not a known status (0..2)") from None
        _uint("server_time", self.server_time, _U64)
        if self.observed is not None and not isinstance(self.observed, Endpoint):
            raise WireError(f"observed {self.observed!r} is not an Endpoint or None")
        object.__setattr__(self, "endpoints", _peer_endpoints("endpoints", self.endpoints, 0))
        _uint("peer_nat", self.peer_nat, _U8)

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                _REPLY.pack(
                    self.request_id,
                    self.status,
                    self.peer_nat,
                    len(self.endpoints),
                    0,
                    self.server_time,
                ),
                endpoint_bytes(self.observed),
                *(ep.to_bytes() for ep in self.endpoints),
            )
        )

    @classmethod
    def from_bytes(cls, data: BytesLike) -> ReplyBody:
        """Decode a plaintext; bytes after the endpoints are ignored."""
        if len(data) < REPLY_PLAIN_MIN:
            raise WireError(
                f"reply plaintext of {len(data)} bytes is shorter than {REPLY_PLAIN_MIN}"
            )
        rid, status, peer_nat, count, _reserved, server_time = _REPLY.unpack_from(data)
        if count > MAX_ENDPOINTS:
            raise WireError(f"reply endpoint count {count} is more than {MAX_ENDPOINTS}")
        observed = endpoint_or_none(data[_REPLY.size : REPLY_PLAIN_MIN])
        endpoints = _decode_endpoints("reply", data, REPLY_PLAIN_MIN, count)
        return cls(rid, status, server_time, observed, endpoints, peer_nat)


@dataclass(frozen=True)
class NotifyBody:
    """The plaintext of a notify (type 3): 44 + 18·n bytes."""

    server_time: int  # ns since the epoch; must increase per peer at the client
    peer: bytes  # the peer whose endpoints follow
    endpoints: tuple[Endpoint, ...]  # 1..2, IPv6 first
    peer_nat: int = 0

    def __post_init__(self) -> None:
        _uint("server_time", self.server_time, _U64)
        object.__setattr__(self, "peer", _key("peer", self.peer))
        object.__setattr__(self, "endpoints", _peer_endpoints("endpoints", self.endpoints, 1))
        _uint("peer_nat", self.peer_nat, _U8)

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                _NOTIFY.pack(self.server_time, self.peer, self.peer_nat, len(self.endpoints), 0),
                *(ep.to_bytes() for ep in self.endpoints),
            )
        )

    @classmethod
    def from_bytes(cls, data: BytesLike) -> NotifyBody:
        """Decode a plaintext; bytes after the endpoints are ignored."""
        if len(data) < NOTIFY_PLAIN_MIN:
            raise WireError(
                f"notify plaintext of {len(data)} bytes is shorter than {NOTIFY_PLAIN_MIN}"
            )
        server_time, peer, peer_nat, count, _reserved = _NOTIFY.unpack_from(data)
        if not 1 <= count <= MAX_ENDPOINTS:
            raise WireError(f"notify endpoint count {count} is not in 1..{MAX_ENDPOINTS}")
        endpoints = _decode_endpoints("notify", data, NOTIFY_PLAIN_MIN, count)
        return cls(server_time, peer, endpoints, peer_nat)


@dataclass(frozen=True)
class RelayBody:
    """The 66-byte plaintext of a relay message (type 4): the relay endpoint for the pair
    (us, PEER). REQUEST_ID echoes the request that asked for it (0 in the copy sent to
    the peer)."""

    server_time: int  # ns since the epoch; must increase per peer at the client
    request_id: int
    peer: bytes
    relay: Endpoint
    flags: int = 0  # reserved, zero

    def __post_init__(self) -> None:
        _uint("server_time", self.server_time, _U64)
        _uint("request_id", self.request_id, _U32)
        object.__setattr__(self, "peer", _key("peer", self.peer))
        if not isinstance(self.relay, Endpoint) or not self.relay.usable:
            raise WireError(f"relay {self.relay!r} is not a usable endpoint")
        _uint("flags", self.flags, _U8)

    def to_bytes(self) -> bytes:
        return (_RELAY.pack(self.server_time, self.request_id, self.flags, bytes(3), self.peer)
                + self.relay.to_bytes())

    @classmethod
    def from_bytes(cls, data: BytesLike) -> RelayBody:
        """Decode a plaintext; bytes after the 66 known ones are ignored."""
        if len(data) < RELAY_PLAIN_LEN:
            raise WireError(
                f"relay plaintext of {len(data)} bytes is shorter than {RELAY_PLAIN_LEN}"
            )
        server_time, rid, flags, _reserved, peer = _RELAY.unpack_from(data)
        relay = Endpoint.from_bytes(data[_RELAY.size:RELAY_PLAIN_LEN])
        return cls(server_time, rid, peer, relay, flags)


@dataclass(frozen=True)
class BindBody:
    """The 40-byte plaintext of a bind (type 5), sent to the relay from WireGuard's port."""

    timestamp: int  # ns since the epoch, strictly increasing per client key (per relay pair)
    peer: bytes  # the other side of the pair

    def __post_init__(self) -> None:
        _uint("timestamp", self.timestamp, _U64)
        object.__setattr__(self, "peer", _key("peer", self.peer))

    def to_bytes(self) -> bytes:
        return _BIND.pack(self.timestamp, self.peer)

    @classmethod
    def from_bytes(cls, data: BytesLike) -> BindBody:
        """Decode a plaintext; bytes after the 40 known ones are ignored."""
        if len(data) < BIND_PLAIN_LEN:
            raise WireError(f"bind plaintext of {len(data)} bytes is shorter than {BIND_PLAIN_LEN}")
        ts, peer = _BIND.unpack_from(data)
        return cls(ts, peer)
