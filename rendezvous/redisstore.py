"""The I/O of the shared store: connections to Redis, pipelines, pub/sub, outages.

Thin: the commands and what their replies mean are :mod:`rendezvous.store`'s and the
service's; this module sends them and reads replies (RESP2, :mod:`rendezvous.resp`) on
plain TCP sockets, with a deadline on every round trip.

Outages never stop the server. A failed connect, a broken connection, a reply that
does not come within ``timeout`` or a malformed one marks the store *down*: every call
returns None at once (the service then answers from its own tables), one warning is
logged, and a reconnect is tried after ``retry`` seconds, doubling up to ``retry_max``.
When a reconnect works, one line says so and how long the outage lasted.

Two connections: one for commands (pipelined: one round trip per batch of requests;
:meth:`RedisStore.send` adds commands whose replies nobody waits for, read and dropped
before the next round trip) and one subscribed to this server's notification channel,
whose socket the server polls (:meth:`RedisStore.fileno`, :meth:`RedisStore.notices`).
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Sequence

from . import resp
from .store import Keys, StoreURL

__all__ = ["RedisStore", "StoreStats"]

log = logging.getLogger(__name__)


class _Down(Exception):
    """Internal: the connection failed; the text says how."""


class _Conn:
    def __init__(self, url: StoreURL, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.parser = resp.Parser()
        self.unread = 0  # replies of send() still to be read and dropped

    def open(self) -> None:
        try:
            sock = socket.create_connection((self.url.host, self.url.port), timeout=self.timeout)
        except OSError as e:
            raise _Down(f"cannot connect: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.parser, self.unread = sock, resp.Parser(), 0
        hello: list[list[bytes | str | int]] = []
        if self.url.password is not None:
            hello.append(["AUTH", self.url.password])
        if self.url.db:
            hello.append(["SELECT", self.url.db])
        hello.append(["PING"])
        for r in self.roundtrip(hello):
            if isinstance(r, resp.ReplyError):
                self.close()
                raise _Down(f"refused: {r}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, payload: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(payload)
        except OSError as e:
            self.close()
            raise _Down(f"send failed: {e.strerror or e}") from None

    def read(self, n: int) -> list[object]:
        """The next N replies (after the unread ones), within the deadline."""
        assert self.sock is not None
        deadline = time.monotonic() + self.timeout
        out: list[object] = []
        while True:
            for r in self.parser.replies():
                if self.unread:
                    self.unread -= 1
                else:
                    out.append(r)
            if len(out) >= n:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise _Down(f"no reply within {self.timeout:g}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError as e:
                self.close()
                raise _Down(f"receive failed: {e.strerror or e}") from None
            if not data:
                self.close()
                raise _Down("the server closed the connection")
            self.parser.feed(data)

    def roundtrip(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[object]:
        return self.exchange(resp.encode_many(commands), len(commands))

    def exchange(self, payload: bytes, n: int) -> list[object]:
        self.send(payload)
        try:
            return self.read(n)
        except resp.ProtocolError as e:
            self.close()
            raise _Down(f"bad reply: {e}") from None


class StoreStats:
    def __init__(self) -> None:
        self.roundtrips = 0
        self.commands = 0
        self.failures = 0   # round trips or connects that failed
        self.outages = 0    # times the store went down
        self.skipped = 0    # calls answered "unavailable" at once, during an outage
        self.notices_in = 0
        self.notices_bad = 0


class RedisStore:
    """The shared store at URL for the server SERVER_ID (its notification channel)."""

    def __init__(self, url: StoreURL, server_id: str, *, timeout: float = 0.25,
                 retry: float = 0.5, retry_max: float = 8.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.server_id = server_id
        self.keys = Keys(url.prefix)
        self.channel = self.keys.channel(server_id)
        self.stats = StoreStats()
        self._clock = clock
        self._retry_min, self._retry_max = retry, retry_max
        self._retry = retry
        self._cmd = _Conn(url, timeout)
        self._sub = _Conn(url, timeout)
        self._down_since: float | None = None
        self._next_try = 0.0
        self._sub_next_try = 0.0

    # -- state ------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._down_since is None and self._cmd.sock is not None

    def _failed(self, why: str) -> None:
        self.stats.failures += 1
        self._cmd.close()
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self.stats.outages += 1
            self._retry = self._retry_min
            log.warning("store %s unavailable (%s): answering from this server's own "
                        "tables until it is back", self.url, why)
        else:
            self._retry = min(self._retry * 2, self._retry_max)
            log.debug("store %s still unavailable (%s); next try in %gs", self.url, why,
                      self._retry)
        self._next_try = now + self._retry

    def _ready(self) -> bool:
        """Connected, or reconnected now if an outage's retry is due."""
        if self._cmd.sock is not None and self._down_since is None:
            return True
        now = self._clock()
        if self._down_since is not None and now < self._next_try:
            self.stats.skipped += 1
            return False
        try:
            self._cmd.open()
        except _Down as e:
            self._failed(str(e))
            return False
        if self._down_since is not None:
            log.info("store %s is back after %.1fs", self.url, now - self._down_since)
        self._down_since = None
        return True

    def _reconnect_once(self, why: str) -> bool:
        """A connection that was up broke (e.g. Redis restarted): one new connection at
        once, before calling the store down. Not for timeouts (a hung Redis would cost
        the deadline twice)."""
        if why.startswith("no reply"):
            self._failed(why)
            return False
        try:
            self._cmd.open()
        except _Down as e:
            self._failed(f"{why}; then {e}")
            return False
        log.info("store %s: reconnected (%s)", self.url, why)
        return True

    def connect(self) -> bool:
        """Connect both connections now (at start: the caller logs the outcome)."""
        ok = self._ready()
        if ok:
            self._subscribe()
        return ok

    # -- commands ---------------------------------------------------------------------

    def execute(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[object] | None:
        """The replies to COMMANDS (one round trip), or None if the store is down."""
        if not commands:
            return []
        return self.execute_raw(resp.encode_many(commands), len(commands))

    def execute_raw(self, payload: bytes, n: int) -> list[object] | None:
        """The replies to the N commands encoded in PAYLOAD, or None if the store is down."""
        if not self._ready():
            return None
        try:
            replies = self._cmd.exchange(payload, n)
        except _Down as e:
            if not self._reconnect_once(str(e)):
                return None
            try:
                replies = self._cmd.exchange(payload, n)
            except _Down as e2:
                self._failed(str(e2))
                return None
        self.stats.roundtrips += 1
        self.stats.commands += n
        return replies

    def send(self, commands: Sequence[Sequence[bytes | str | int]]) -> bool:
        """Send COMMANDS without waiting for their replies (dropped when they come)."""
        if not commands:
            return True
        if not self._ready():
            return False
        payload = resp.encode_many(commands)
        try:
            self._cmd.send(payload)
        except _Down as e:
            if not self._reconnect_once(str(e)):
                return False
            try:
                self._cmd.send(payload)
            except _Down as e2:
                self._failed(str(e2))
                return False
        self._cmd.unread += len(commands)
        self.stats.commands += len(commands)
        if self._cmd.unread > 4096:  # keep Redis's output buffer for us small
            self.execute([["PING"]])
        return True

    def publish(self, server_id: str, payload: bytes) -> bool:
        return self.send([[b"PUBLISH", self.keys.channel(server_id), payload]])

    # -- notifications ----------------------------------------------------------------

    def _subscribe(self) -> None:
        try:
            self._sub.open()
            replies = self._sub.roundtrip([[b"SUBSCRIBE", self.channel]])
        except _Down as e:
            self._sub.close()
            self._sub_next_try = self._clock() + self._retry_max / 4
            log.debug("store %s: cannot subscribe (%s)", self.url, e)
            return
        if not (isinstance(replies[0], list) and replies[0][:1] == [b"subscribe"]):
            self._sub.close()
            return
        assert self._sub.sock is not None
        self._sub.sock.setblocking(False)

    def fileno(self) -> int | None:
        """The subscribed socket to poll for notices (None while not subscribed)."""
        return None if self._sub.sock is None else self._sub.sock.fileno()

    def notices(self) -> list[bytes]:
        """Notice payloads that arrived on this server's channel (non-blocking)."""
        sub = self._sub
        if sub.sock is None:
            return []
        out: list[bytes] = []
        while True:
            try:
                data = sub.sock.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                sub.close()
                self._sub_next_try = self._clock() + self._retry_min
                log.warning("store %s: the notification channel closed; resubscribing",
                            self.url)
                break
            sub.parser.feed(data)
        try:
            for r in sub.parser.replies():
                if isinstance(r, list) and len(r) == 3 and r[0] == b"message" and \
                        isinstance(r[2], bytes):
                    out.append(r[2])
                    self.stats.notices_in += 1
        except resp.ProtocolError:
            sub.close()
        return out

    def tick(self, now: float) -> bool:
        """Housekeeping: resubscribe, retry a down store. Returns whether the
        subscribed socket changed (the caller re-registers it with its poller)."""
        changed = False
        if self._sub.sock is None and now >= self._sub_next_try:
            if self._ready():
                self._subscribe()
                changed = self._sub.sock is not None
            else:
                self._sub_next_try = self._next_try
        elif self._down_since is not None and now >= self._next_try:
            self._ready()
        if self._cmd.sock is not None and self._cmd.unread and self._down_since is None:
            self._drain()
        return changed

    def _drain(self) -> None:
        """Read and drop the replies of send() that have come (non-blocking)."""
        c = self._cmd
        assert c.sock is not None
        while c.unread:
            r, _, _ = select.select([c.sock], [], [], 0)
            if not r:
                return
            try:
                data = c.sock.recv(1 << 18)
            except OSError as e:
                self._failed(f"receive failed: {e.strerror or e}")
                return
            if not data:
                self._failed("the server closed the connection")
                return
            c.parser.feed(data)
            try:
                for _ in c.parser.replies():
                    c.unread = max(0, c.unread - 1)
            except resp.ProtocolError as e:
                self._failed(f"bad reply: {e}")
                return

    def close(self) -> None:
        self._cmd.close()
        self._sub.close()

    def snapshot(self) -> dict[str, int]:
        s = self.stats
        return {"store_up": int(self.up), "store_roundtrips": s.roundtrips,
                "store_commands": s.commands, "store_failures": s.failures,
                "store_outages": s.outages, "store_skipped": s.skipped,
                "store_notices_in": s.notices_in, "store_notices_bad": s.notices_bad}
