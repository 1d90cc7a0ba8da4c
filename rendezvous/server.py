"""The rendezvous server's I/O shell: sockets, the event loop, signals and stats logs.

All decisions are made by :class:`rendezvous.service.Service`; this module only moves
datagrams between the kernel and it, in batches (recvmmsg/sendmmsg) where it can.
"""

from __future__ import annotations

import errno
import logging
import select
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import mmsg
from .batch import ClassicBatch
from .classic import format_endpoint, short_key
from .service import Service

__all__ = ["ListenError", "Server", "ServerOptions", "open_socket"]

log = logging.getLogger(__name__)

_SO_RCVBUF = 4 << 20
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: & on the IntFlag costs microseconds


class ListenError(OSError):
    """A listening socket could not be opened (address in use, no permission, ...)."""


@dataclass(frozen=True)
class ServerOptions:
    listen: Sequence[tuple[str, int]] = (("0.0.0.0", 49918),)
    io: str = "auto"  # auto | mmsg | plain
    stats_interval: float = 60.0
    verbose: bool = False
    batch: int = 256  # datagrams per recvmmsg; bigger batches spread the per-call cost


def open_socket(addr: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ADDR:PORT, with IP_PKTINFO on a wildcard bind."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        raise ListenError(e.errno, f"cannot create a UDP socket: {e.strerror}") from None
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SO_RCVBUF)
        except OSError:
            pass
        sock.bind((addr, port))
        if addr == "0.0.0.0":
            sock.setsockopt(socket.IPPROTO_IP, mmsg.IP_PKTINFO, 1)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "address already in use",
               errno.EACCES: "permission denied (ports below 1024 need root)",
               errno.EADDRNOTAVAIL: "no such local address"}.get(e.errno or 0, e.strerror)
        raise ListenError(e.errno, f"cannot listen on {addr}:{port}: {why}") from None
    return sock


class Server:
    """Serve SERVICE on the given sockets until :meth:`stop` (or a signal)."""

    def __init__(self, service: Service, options: ServerOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.options = options
        self.clock = clock
        self.sockets: list[socket.socket] = []
        self.send_failed = 0
        self._running = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def open(self) -> None:
        try:
            for addr, port in self.options.listen:
                self.sockets.append(open_socket(addr, port))
        except ListenError:
            self.close()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname() for s in self.sockets]

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        self._wake_r.close()
        self._wake_w.close()

    def stop(self, *_: object) -> None:
        """Ask the loop to finish; safe from a signal handler."""
        self._running = False
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)

    def _use_mmsg(self) -> bool:
        if self.options.io == "plain":
            return False
        if self.options.io == "mmsg" and not mmsg.MMSG_AVAILABLE:
            raise OSError("--io mmsg: recvmmsg/sendmmsg are not available here")
        return mmsg.MMSG_AVAILABLE

    def serve(self) -> None:
        """Run until stopped."""
        use_mmsg = self._use_mmsg()
        handlers: dict[int, Callable[[], None]] = {}
        for sock in self.sockets:
            pktinfo = sock.getsockname()[0] == "0.0.0.0"
            if use_mmsg:
                batch = mmsg.Batch(self.options.batch, 2048, pktinfo)
                handlers[sock.fileno()] = self._mmsg_reader(sock, batch)
            else:
                handlers[sock.fileno()] = self._plain_reader(sock, pktinfo)
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        self._running = True
        interval = self.options.stats_interval
        next_stats = self.clock() + interval if interval > 0 else float("inf")
        next_sweep = self.clock() + 10
        while self._running:
            for fd, _ in poller.poll(1000):
                handler = handlers.get(fd)
                if handler is not None:
                    handler()
            now = self.clock()
            self.service.tick(now)
            if now >= next_sweep:
                self.service.sweep(now)
                next_sweep = now + 10
            if now >= next_stats:
                self.log_stats()
                next_stats = now + interval

    def log_stats(self) -> None:
        stats = self.service.snapshot()
        stats["send_failed"] = self.send_failed
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in stats.items()))

    def _mmsg_reader(self, sock: socket.socket, batch: mmsg.Batch) -> Callable[[], None]:
        fd = sock.fileno()
        def logged(data: bytes, src: bytes, now: float) -> bytes | None:
            reply = self.service.handle(data, src, now)
            self._log_request(data, src, reply)
            return reply

        handle = logged if self.options.verbose else self.service.handle
        # Whole batches of classic requests in bulk (not when each request is logged).
        bulk = None if self.options.verbose else ClassicBatch(self.service).handle
        clock = self.clock

        def read() -> None:
            # Bounded: after 16 full batches, give housekeeping and other sockets a turn.
            for _ in range(16):
                n, _sent, failed = batch.exchange(fd, handle, clock(), bulk)
                self.send_failed += failed
                if n < batch.size:
                    return

        return read

    def _plain_reader(self, sock: socket.socket, pktinfo: bool) -> Callable[[], None]:
        handle = self.service.handle
        clock = self.clock
        verbose = self.options.verbose
        ancsize = socket.CMSG_SPACE(12) if pktinfo else 0

        def read() -> None:
            for _ in range(1024):
                try:
                    data, anc, flags, addr = sock.recvmsg(2048, ancsize)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # e.g. an ICMP error reported on the socket
                    log.debug("recvmsg: %s", e)
                    continue
                if flags & _MSG_TRUNC:
                    data = data + b"\0"  # any truncated datagram is too long to be valid
                src = socket.inet_aton(addr[0]) + addr[1].to_bytes(2, "big")
                reply = handle(data, src, clock())
                if verbose:
                    self._log_request(data, src, reply)
                if reply is None:
                    continue
                cmsg = [(lvl, typ, bytes(4) + d[8:12] + bytes(4))
                        for lvl, typ, d in anc if typ == mmsg.IP_PKTINFO and len(d) >= 12]
                try:
                    sock.sendmsg([reply], cmsg, 0, addr)
                except OSError as e:
                    self.send_failed += 1
                    log.debug("sendmsg to %s:%d: %s", addr[0], addr[1], e)

        return read

    @staticmethod
    def _log_request(data: bytes, src: bytes, reply: bytes | None) -> None:
        who = format_endpoint(src)
        if len(data) != 64:
            log.debug("%s: dropped a %d-byte datagram", who, len(data))
        elif reply is None:
            log.debug("%s: dropped request from %s", who, short_key(data[:32]))
        else:
            found = format_endpoint(reply) if reply else "not found"
            log.debug("%s: %s asks for %s -> %s", who, short_key(data[:32]),
                      short_key(data[32:]), found)
