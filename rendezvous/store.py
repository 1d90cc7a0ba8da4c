"""The shared store: what several rendezvous servers keep in one Redis (``--store``).

Pure: the key schema, the value codecs and the commands the service needs, built from
and decoded into plain values. The I/O lives in :mod:`rendezvous.redisstore`, which
executes these commands (a pipeline per batch or request) and reports the store
unavailable instead of raising, so the service falls back to its own tables.

Design (docs/OPERATIONS.md, "Several servers"):
- Every server keeps its embedded tables as before and *also* writes what it learns to
  Redis; lookups of other keys go to Redis, which holds the newest registration
  whichever server received it. When Redis is unreachable a server answers from its own
  tables (what it has seen itself) and writes nothing until Redis is back.
- Expiry is Redis's: every key is written with ``PX`` (the ttl), so a key not refreshed
  through any server disappears from all of them.
- Classic: ``c:<key>`` -> the 6-byte endpoint (written and read a batch at a time by
  :data:`CLASSIC_SCRIPT`).
- v2: ``r4:<key>`` / ``r6:<key>`` -> one registration per family (:class:`SharedRegistration`:
  the source, the server address it arrived at, the NAT verdict and the id of the server
  that holds the client's NAT mapping); ``a:<key><peer>`` -> KEY asked for PEER (the
  consent state); ``t:<key><peer>`` -> what KEY was last told about PEER's endpoints.
- Notifications for a client whose mapping another server holds are published on that
  server's channel ``n:<server id>`` (:class:`Notice`); only that server can reach the
  client through its NAT (the mapping is toward that server's address and port).
- The relay: ``rl:<pair>`` -> which server relays the pair and where (``SET NX``: the
  first server to allocate wins and the other offers the same relay).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Keys",
    "Notice",
    "RelayClaim",
    "SharedStore",
    "SharedRegistration",
    "StoreError",
    "StoreURL",
    "parse_store_url",
    "CLASSIC_SCRIPT",
    "V2_SCRIPT",
    "window_args",
    "ScriptMissing",
    "classic_payload",
    "classic_values",
    "keys",
]

KEY_LEN = 32


class StoreError(ValueError):
    """A bad --store value, or a malformed value read from the store."""


@dataclass(frozen=True)
class StoreURL:
    host: str
    port: int = 6379
    db: int = 0
    password: str | None = None
    prefix: str = "wgpunch:"

    def __str__(self) -> str:  # never the password
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


_SERVER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def valid_server_id(text: str) -> bool:
    return bool(_SERVER_ID.fullmatch(text))


def parse_store_url(text: str) -> StoreURL:
    """``redis://[:PASSWORD@]HOST[:PORT][/DB]`` (IPv6 hosts in brackets)."""
    u = urllib.parse.urlsplit(text)
    if u.scheme != "redis":
        raise StoreError(f"--store {text!r}: only redis://HOST:PORT/DB is supported")
    try:
        port = u.port or 6379
    except ValueError:
        raise StoreError(f"--store {text!r}: bad port") from None
    if not u.hostname:
        raise StoreError(f"--store {text!r}: no host")
    path = u.path.strip("/")
    if path and not path.isdigit():
        raise StoreError(f"--store {text!r}: the database must be a number, got {path!r}")
    if u.query or u.fragment:
        raise StoreError(f"--store {text!r}: no query or fragment expected")
    password = urllib.parse.unquote(u.password) if u.password else None
    return StoreURL(u.hostname, port, int(path or 0), password)


Command = Sequence[bytes | str | int]


class SharedStore(Protocol):
    """What the service needs of a store connection (:class:`rendezvous.redisstore.RedisStore`)."""

    keys: Keys
    server_id: str

    def execute(self, commands: Sequence[Command]) -> list[object] | None:
        """The replies (one round trip), or None: unavailable (answer from own tables)."""

    def execute_raw(self, payload: bytes, n: int) -> list[object] | None:
        """Like :meth:`execute` for N commands already encoded as PAYLOAD."""

    def send(self, commands: Sequence[Command]) -> bool:
        """Send without waiting for replies; False if unavailable."""

    def publish(self, server_id: str, payload: bytes) -> bool:
        """A notice for the server SERVER_ID (its channel)."""

    def snapshot(self) -> dict[str, int]:
        """Counters for the stats line and metrics."""


class Keys:
    """The store's key names under a prefix."""

    def __init__(self, prefix: str = "wgpunch:") -> None:
        p = prefix.encode()
        self.classic_p = p + b"c:"
        self.reg4_p = p + b"r4:"
        self.reg6_p = p + b"r6:"
        self.ask_p = p + b"a:"
        self.told_p = p + b"t:"
        self.relay_p = p + b"rl:"
        self.window_p = p + b"w:"
        self.notify_p = p + b"n:"

    def classic(self, key: bytes) -> bytes:
        return self.classic_p + key

    def reg(self, key: bytes, family: int) -> bytes:
        return (self.reg4_p if family == 4 else self.reg6_p) + key

    def ask(self, key: bytes, peer: bytes) -> bytes:
        return self.ask_p + key + peer

    def window(self, key: bytes) -> bytes:
        return self.window_p + key

    def told(self, key: bytes, peer: bytes) -> bytes:
        return self.told_p + key + peer

    def relay(self, a: bytes, b: bytes) -> bytes:
        return self.relay_p + min(a, b) + max(a, b)

    def channel(self, server_id: str) -> bytes:
        return self.notify_p + server_id.encode()


keys = Keys()


# One round trip per batch of classic requests, and one reply: a script that writes
# every registration and returns all the lookups as one bulk string (6 bytes each, six
# zero bytes for an absent key), so neither side handles a reply per request.
CLASSIC_SCRIPT = b"""
local n = tonumber(ARGV[2])
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[1])
end
if #KEYS == n then return '' end
local vals = redis.call('MGET', unpack(KEYS, n + 1, #KEYS))
for i = 1, #vals do
  if not vals[i] or #vals[i] ~= 6 then vals[i] = '\0\0\0\0\0\0' end
end
return table.concat(vals)
"""
CLASSIC_SHA = hashlib.sha1(CLASSIC_SCRIPT).hexdigest().encode()
_ABSENT = bytes(6)


class ScriptMissing(StoreError):
    """Redis does not have the script yet (``NOSCRIPT``): load it and retry."""


def script_load(script: bytes = CLASSIC_SCRIPT) -> list[bytes]:
    """SCRIPT LOAD of SCRIPT (after a NOSCRIPT reply)."""
    return [b"SCRIPT", b"LOAD", script]


def classic_payload(k: Keys, keys: Sequence[bytes], endpoints: bytes | bytearray,
                    lookups: Sequence[bytes], ttl_ms: int) -> bytes:
    """The RESP bytes of one EVALSHA of :data:`CLASSIC_SCRIPT`: SET ``keys[i]`` to
    ``endpoints[6 * i:6 * i + 6]`` with the ttl, for every i, then look up LOOKUPS.
    Keys are 32 bytes (classic keys), so every argument is built by C-level joins."""
    n, m = len(keys), len(lookups)
    if len(endpoints) != 6 * n:
        raise ValueError(f"{n} keys need {6 * n} bytes of endpoints, got {len(endpoints)}")
    if sum(map(len, keys)) != KEY_LEN * n or sum(map(len, lookups)) != KEY_LEN * m:
        raise ValueError("classic keys are 32 bytes")
    prefix = k.classic_p
    head = b"$%d\r\n%s" % (len(prefix) + KEY_LEN, prefix)
    sep = b"\r\n" + head
    ttl = b"%d" % ttl_ms
    count = b"%d" % n
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%d\r\n"
             % (5 + 2 * n + m, CLASSIC_SHA, len(b"%d" % (n + m)), n + m)]
    if n + m:
        parts += [head, sep.join([*keys, *lookups]), b"\r\n"]
    parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ttl), ttl, len(count), count))
    if n:
        ep = bytes(endpoints)
        parts += [b"$6\r\n", b"\r\n$6\r\n".join([ep[i:i + 6] for i in range(0, 6 * n, 6)]),
                  b"\r\n"]
    return b"".join(parts)


def classic_values(reply: object, n_lookups: int) -> list[bytes | None]:
    """The endpoints the script found (None: absent); ScriptMissing or StoreError."""
    if isinstance(reply, Exception):
        if str(reply).startswith("NOSCRIPT"):
            raise ScriptMissing(str(reply))
        raise StoreError(f"the classic script failed: {reply}")
    if not isinstance(reply, bytes) or len(reply) != 6 * n_lookups:
        raise StoreError(f"the classic script returned {reply!r:.60} for {n_lookups} lookups")
    return [None if v == _ABSENT else v for v in
            (reply[i:i + 6] for i in range(0, len(reply), 6))]


# A v2 request's admission across servers: the replay window of rendezvous/v2/replay.py
# kept in the store (``w:<key>``), checked and updated atomically with the request's
# registration and ask, which are written only if the timestamp is fresh. Without it a
# request captured on the path could be replayed to *another* server of the set.
# Timestamps are 64-bit nanoseconds, beyond a Lua number's 53-bit precision, so they
# travel as 20-digit zero-padded strings, which compare like the numbers; the caller
# passes TS - span and TS + span the same way (:func:`window_args`).
# KEYS: window, registration, ask. ARGV: ts, ts - span, ts + span, keep ms, recent
# max, registration value, ttl ms. Returns 1 (fresh: recorded and written) or 0.
V2_SCRIPT = b"""
local v = redis.call('GET', KEYS[1])
local ts = ARGV[1]
local newest, floor, recent = nil, nil, {}
if v and #v >= 40 then
  newest = string.sub(v, 1, 20)
  floor = string.sub(v, 21, 40)
  for i = 41, #v - 19, 20 do recent[#recent + 1] = string.sub(v, i, i + 19) end
end
if newest and ts <= newest then
  if ts == newest or ts <= floor or ARGV[3] <= newest then return 0 end
  for _, t in ipairs(recent) do if t == ts then return 0 end end
  recent[#recent + 1] = ts
else
  if newest then
    recent[#recent + 1] = newest
  else
    floor = string.rep('0', 20)
  end
  newest = ts
  local kept = {}
  for _, t in ipairs(recent) do if t > ARGV[2] then kept[#kept + 1] = t end end
  recent = kept
end
table.sort(recent)
local max = tonumber(ARGV[5])
if #recent > max then
  local drop = recent[#recent - max]
  if drop > floor then floor = drop end
  local kept = {}
  for i = #recent - max + 1, #recent do kept[#kept + 1] = recent[i] end
  recent = kept
end
redis.call('SET', KEYS[1], newest .. floor .. table.concat(recent), 'PX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[7])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[7])
return 1
"""
V2_SHA = hashlib.sha1(V2_SCRIPT).hexdigest().encode()


def _stamp(t: int) -> bytes:
    return b"%020d" % min(max(t, 0), 10**20 - 1)


def window_args(ts: int, span: int) -> tuple[bytes, bytes, bytes]:
    """TS, TS - SPAN and TS + SPAN as the script's 20-digit strings."""
    return _stamp(ts), _stamp(ts - span), _stamp(ts + span)


@dataclass(frozen=True)
class SharedRegistration:
    """One family's registration of a v2 client, as stored: the source (6 or 18
    bytes), the local server address it arrived at (4 or 16 bytes, or None), the
    client's NAT verdict and the id of the server that received it."""

    source: bytes
    local: bytes | None
    nat: int
    server: str

    def encode(self) -> bytes:
        local = self.local or b""
        return (bytes((self.nat, len(self.source))) + self.source + bytes((len(local),))
                + local + self.server.encode())

    @classmethod
    def decode(cls, data: bytes) -> SharedRegistration:
        try:
            nat, n = data[0], data[1]
            source = data[2:2 + n]
            m = data[2 + n]
            local = data[3 + n:3 + n + m]
            server = data[3 + n + m:].decode()
        except (IndexError, UnicodeDecodeError):
            raise StoreError(f"a malformed registration of {len(data)} bytes") from None
        if n not in (6, 18) or len(source) != n or m not in (0, 4, 16) or len(local) != m \
                or not valid_server_id(server):
            raise StoreError(f"a malformed registration of {len(data)} bytes")
        return cls(source, local or None, nat, server)


def encode_endpoints(endpoints: Sequence[bytes]) -> bytes:
    """Endpoints (at most one 18-byte and one 6-byte, in that order), back to back: the
    total length (0, 6, 18 or 24) says which."""
    return b"".join(endpoints)


def decode_endpoints(data: bytes) -> tuple[bytes, ...]:
    if len(data) == 0:
        return ()
    if len(data) in (6, 18):
        return (data,)
    if len(data) == 24:
        return (data[:18], data[18:])
    raise StoreError(f"a malformed endpoint list of {len(data)} bytes")


@dataclass(frozen=True)
class RelayClaim:
    """Which server relays a pair, and where clients reach it (6- or 18-byte source
    form: the relay address and port)."""

    relay: bytes
    server: str

    def encode(self) -> bytes:
        return bytes((len(self.relay),)) + self.relay + self.server.encode()

    @classmethod
    def decode(cls, data: bytes) -> RelayClaim:
        n = data[0] if data else 0
        try:
            server = data[1 + n:].decode()
        except UnicodeDecodeError:
            server = ""
        if n not in (6, 18) or len(data) < 1 + n or not valid_server_id(server):
            raise StoreError(f"a malformed relay claim of {len(data)} bytes")
        return cls(data[1:1 + n], server)


@dataclass(frozen=True)
class Notice:
    """A notification another server must send: DATAGRAM to DESTINATION (packed source
    form), from its local address LOCAL when known."""

    destination: bytes
    datagram: bytes
    local: bytes | None = None

    def encode(self) -> bytes:
        local = self.local or b""
        return bytes((len(self.destination), len(local))) + self.destination + local + self.datagram

    @classmethod
    def decode(cls, data: bytes) -> Notice:
        if len(data) < 2:
            raise StoreError(f"a notice of {len(data)} bytes")
        n, m = data[0], data[1]
        if n not in (6, 18) or m not in (0, 4, 16) or len(data) < 2 + n + m + 1:
            raise StoreError(f"a malformed notice of {len(data)} bytes")
        return cls(destination=data[2:2 + n], datagram=data[2 + n + m:],
                   local=data[2 + n:2 + n + m] or None)
