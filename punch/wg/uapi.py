"""The WireGuard cross-platform userspace API (UAPI) as a pure codec: no I/O.

Requests are ``get=1`` or ``set=1`` followed by ``key=value`` lines and a blank line.
Replies are ``key=value`` lines ending with ``errno=N`` and a blank line; keys are
lowercase hex. Feed reply lines to :class:`ReplyParser` (or whole text to
:func:`parse_get_reply` / :func:`parse_set_reply`); the socket shell lives in
:mod:`punch.wg.uapi_backend`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import ProtocolError, UapiError
from .model import KEY_LEN, Device, Peer, check_endpoint, check_keepalive, check_key
from .x25519 import public_from_private

__all__ = [
    "GET_REQUEST",
    "encode_get",
    "encode_set_peer",
    "format_endpoint",
    "parse_endpoint",
    "reply_complete",
    "ReplyParser",
    "parse_get_reply",
    "parse_set_reply",
]

log = logging.getLogger(__name__)

GET_REQUEST = b"get=1\n\n"
TERMINATOR = b"\n\n"


def encode_get() -> bytes:
    """The request that dumps the whole device."""
    return GET_REQUEST


def format_endpoint(endpoint: tuple[str, int]) -> str:
    """``ip:port``, with IPv6 addresses in brackets (``[2001:db8::1]:51820``)."""
    addr, port = check_endpoint(endpoint)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def encode_set_peer(public_key: bytes, *, endpoint: tuple[str, int] | None = None,
                    keepalive: int | None = None) -> bytes:
    """A ``set=1`` request that updates one existing peer (``update_only=true``).

    Only the fields given are sent; the peer is never created, removed, or has its
    allowed IPs touched.
    """
    lines = ["set=1", f"public_key={check_key(public_key).hex()}", "update_only=true"]
    if endpoint is not None:
        lines.append(f"endpoint={format_endpoint(endpoint)}")
    if keepalive is not None:
        lines.append(f"persistent_keepalive_interval={check_keepalive(keepalive)}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def reply_complete(buffer: bytes) -> bool:
    """True once BUFFER holds a whole reply (it ends with the terminating blank line)."""
    return buffer.endswith(TERMINATOR) or buffer == b"\n"


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse ``1.2.3.4:5`` or ``[2001:db8::1]:5`` into ``(ip, port)``; ProtocolError if not."""
    host, sep, port_s = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ProtocolError(f"IPv6 endpoint without brackets: {text!r}")
    try:
        ipaddress.ip_address(host)
        port = int(port_s)
    except ValueError:
        raise ProtocolError(f"bad endpoint {text!r}") from None
    if not sep or not 0 <= port < 65536:
        raise ProtocolError(f"bad endpoint {text!r}")
    return host, port


def _hex_key(key: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != KEY_LEN or len(value) != 2 * KEY_LEN:
        raise ProtocolError(f"{key}: not a {KEY_LEN}-byte hex key: {value!r}")
    return raw


def _uint(key: str, value: str, limit: int = 2**64) -> int:
    if not value.isdigit() or int(value) >= limit:
        raise ProtocolError(f"{key}: not an unsigned integer below {limit}: {value!r}")
    return int(value)


@dataclass
class _PeerFields:
    public_key: bytes
    endpoint: tuple[str, int] | None = None
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0
    allowed_ips: list[str] = field(default_factory=list)

    def freeze(self) -> Peer:
        hs = None
        if self.handshake_sec or self.handshake_nsec:
            hs = self.handshake_sec + self.handshake_nsec / 1e9
        return Peer(self.public_key, self.endpoint, hs, self.rx_bytes, self.tx_bytes,
                    self.keepalive, tuple(self.allowed_ips))


_IGNORED = frozenset({"preshared_key", "protocol_version"})
_PEER_KEYS = _IGNORED | {"endpoint", "last_handshake_time_sec", "last_handshake_time_nsec",
                         "rx_bytes", "tx_bytes", "persistent_keepalive_interval", "allowed_ip"}


class ReplyParser:
    """Incremental parser of one UAPI reply, fed one line (without newline) at a time.

    ``feed_line`` returns True after the terminating blank line. Then ``device()`` gives
    the parsed device (for ``get``) and ``check()`` raises :class:`UapiError` when the
    reply carried a non-zero errno (``device()`` checks too).
    """

    def __init__(self, ifname: str, operation: str = "get") -> None:
        self.ifname = ifname
        self.operation = operation
        self.done = False
        self.errno: int | None = None
        self._private_key: bytes | None = None
        self._listen_port = 0
        self._fwmark = 0
        self._peers: list[_PeerFields] = []

    def _fail(self, message: str) -> ProtocolError:
        return ProtocolError(f"{self.ifname}: UAPI {self.operation} reply: {message}", self.ifname)

    def feed_line(self, line: str) -> bool:
        if self.done:
            raise self._fail(f"data after the end of the reply: {line!r}")
        if line == "":
            if self.errno is None:
                raise self._fail("ended without errno")
            self.done = True
            return True
        if self.errno is not None:
            raise self._fail(f"data after errno: {line!r}")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise self._fail(f"malformed line {line!r}")
        try:
            self._field(key, value)
        except ProtocolError as e:
            raise self._fail(str(e)) from None
        return False

    def feed(self, lines: Iterable[str]) -> bool:
        for line in lines:
            if self.feed_line(line):
                return True
        return self.done

    def _field(self, key: str, value: str) -> None:
        if key == "errno":
            try:
                self.errno = int(value)
            except ValueError:
                raise ProtocolError(f"errno: not an integer: {value!r}") from None
        elif key == "private_key":
            self._private_key = _hex_key(key, value)
        elif key == "listen_port":
            self._listen_port = _uint(key, value, 65536)
        elif key == "fwmark":
            self._fwmark = _uint(key, value, 2**32)
        elif key == "public_key":
            self._peers.append(_PeerFields(_hex_key(key, value)))
        elif not self._peers:
            if key in _PEER_KEYS:
                raise ProtocolError(f"peer field {key!r} before any public_key")
            log.debug("%s: ignoring unknown UAPI device key %r", self.ifname, key)
        else:
            self._peer_field(self._peers[-1], key, value)

    @staticmethod
    def _peer_field(peer: _PeerFields, key: str, value: str) -> None:
        if key == "endpoint":
            peer.endpoint = parse_endpoint(value)
        elif key == "last_handshake_time_sec":
            peer.handshake_sec = _uint(key, value)
        elif key == "last_handshake_time_nsec":
            peer.handshake_nsec = _uint(key, value, 10**9)
        elif key == "rx_bytes":
            peer.rx_bytes = _uint(key, value)
        elif key == "tx_bytes":
            peer.tx_bytes = _uint(key, value)
        elif key == "persistent_keepalive_interval":
            peer.keepalive = _uint(key, value, 65536)
        elif key == "allowed_ip":
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ProtocolError(f"allowed_ip: not a CIDR: {value!r}") from None
            peer.allowed_ips.append(str(net))
        elif key not in _IGNORED:
            log.debug("ignoring unknown UAPI peer key %r", key)

    def check(self) -> None:
        """Raise unless a complete reply with errno=0 was fed."""
        if not self.done:
            raise self._fail("incomplete (no terminating blank line)")
        if self.errno:
            raise UapiError(self.errno, self.operation, self.ifname)

    def device(self) -> Device:
        self.check()
        pub = public_from_private(self._private_key) if self._private_key else None
        return Device(self.ifname, pub, self._private_key, self._listen_port, self._fwmark,
                      tuple(p.freeze() for p in self._peers))


def _lines(reply: str | bytes | Iterable[str]) -> Iterable[str]:
    if isinstance(reply, bytes):
        try:
            reply = reply.decode("ascii")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"UAPI reply is not ASCII: {e}") from None
    if isinstance(reply, str):
        if not reply.endswith("\n"):
            raise ProtocolError(f"UAPI reply does not end with a newline: {reply[-40:]!r}")
        return reply[:-1].split("\n")
    return (line.rstrip("\n") for line in reply)


def _parse(ifname: str, operation: str, reply: str | bytes | Iterable[str]) -> ReplyParser:
    parser = ReplyParser(ifname, operation)
    for line in _lines(reply):
        parser.feed_line(line)
    parser.check()
    return parser


def parse_get_reply(ifname: str, reply: str | bytes | Iterable[str]) -> Device:
    """Parse a whole ``get=1`` reply (text, bytes, or lines) into a :class:`Device`."""
    return _parse(ifname, "get", reply).device()


def parse_set_reply(ifname: str, reply: str | bytes | Iterable[str]) -> None:
    """Check a whole ``set=1`` reply; raise :class:`UapiError` on a non-zero errno."""
    _parse(ifname, "set", reply)

