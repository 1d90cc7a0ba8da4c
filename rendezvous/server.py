"""The rendezvous server's I/O shell: sockets, the event loop, signals and stats logs.

All decisions are made by :class:`rendezvous.service.Service`; this module only moves
datagrams between the kernel and it, in batches (recvmmsg/sendmmsg) where it can.

Dual stack: IPv4 sockets and IPv6 sockets (``IPV6_V6ONLY``, so an IPv6 socket never sees
IPv4-mapped sources) are opened side by side on one port. A wildcard bind asks for the
request's destination address (``IP_PKTINFO`` / ``IPV6_RECVPKTINFO``) so that the reply
leaves from the address the client talked to. IPv6 sockets use the per-datagram reader.
After each read, the v2 notifications the service queued are sent from a socket of the
destination's family, from the local address the notified client's request arrived at
when that is known; a failed send is counted, never fatal.
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
from .logsetup import peer_fields
from .service import Service
from .v2.wire import Endpoint, looks_like_v2

__all__ = ["ListenError", "Server", "ServerOptions", "buffer_shortfall", "format_address",
           "open_socket"]

log = logging.getLogger(__name__)

_SO_RCVBUF = 4 << 20
# Replies waiting in a slow link's queue stay charged to the socket: the default send
# buffer (208 KiB) holds only ~200 small ones, so a burst of requests lost the rest.
_SO_SNDBUF = 4 << 20
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: & on the IntFlag costs microseconds


_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


class ListenError(OSError):
    """A listening socket could not be opened (address in use, no permission, ...)."""


@dataclass(frozen=True)
class ServerOptions:
    listen: Sequence[tuple[str, int]] = (("0.0.0.0", 49918), ("::", 49918))
    io: str = "auto"  # auto | mmsg | plain
    stats_interval: float = 60.0
    verbose: bool = False
    batch: int = 256  # datagrams per recvmmsg; bigger batches spread the per-call cost
    ipv6_optional: bool = False  # skip a "::" that fails for lack of IPv6 (the default)
    # Probe sockets (--probe-port): they answer self-lookups only and register nothing
    # (Service.probe), read one datagram at a time; no notification leaves from them.
    probe: Sequence[tuple[str, int]] = ()
    relay_ports: Sequence[int] = ()  # v2 relay: these ports on every listen address
    reuse_port: bool = False  # SO_REUSEPORT on the listen and probe sockets (--workers)


def is_ipv6(addr: str) -> bool:
    return ":" in addr


def format_address(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if is_ipv6(addr) else f"{addr}:{port}"


def open_socket(addr: str, port: int, reuse_port: bool = False,
                small_replies: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ADDR:PORT (IPv4 or IPv6), asking for the
    destination address of each datagram on a wildcard bind. REUSE_PORT: several
    processes bind the same ADDR:PORT and the kernel spreads the sources over them
    (each source always to the same socket). SMALL_REPLIES (IPv4): every datagram sent
    from it is small (a reply is never longer than its request; a notification is a
    few hundred bytes), so each goes out with DF set and IP ID 0, as RFC 6864 (4.1)
    allows for a datagram that is never fragmented. That spares the kernel its shared
    IP ID generator per datagram (IP_PMTUDISC_PROBE: DF, no path MTU state). The
    relay's sockets, which forward full-size packets, keep the default."""
    v6 = is_ipv6(addr)
    where = format_address(addr, port)
    try:
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as e:
        why = "IPv6 is not available on this host" if v6 and e.errno in _NO_IPV6 else e.strerror
        raise ListenError(e.errno, f"cannot listen on {where}: {why}") from None
    try:
        for opt, size in ((socket.SO_RCVBUF, _SO_RCVBUF), (socket.SO_SNDBUF, _SO_SNDBUF)):
            try:  # the kernel caps both at net.core.[rw]mem_max
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if small_replies and not v6:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE)
        sock.bind((addr, port))
        if addr == "0.0.0.0":
            sock.setsockopt(socket.IPPROTO_IP, mmsg.IP_PKTINFO, 1)
        elif addr == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "address already in use",
               errno.EACCES: "permission denied (ports below 1024 need root)",
               errno.EADDRNOTAVAIL: "no such local address"}.get(e.errno or 0, e.strerror)
        if v6 and addr == "::" and e.errno == errno.EADDRNOTAVAIL:
            why = "IPv6 is not available on this host"
        raise ListenError(e.errno, f"cannot listen on {where}: {why}") from None
    return sock


def buffer_shortfall(sock: socket.socket, rcvbuf: int = _SO_RCVBUF,
                     sndbuf: int = _SO_SNDBUF) -> list[str]:
    """Which of SOCK's buffers the kernel granted less than RCVBUF / SNDBUF bytes of (it
    caps them at net.core.rmem_max / wmem_max unless the process may override that),
    e.g. ``["receive 208 of 4096 KiB (net.core.rmem_max)"]``; empty when both are as
    asked."""
    short = []
    for what, opt, asked, knob in (("receive", socket.SO_RCVBUF, rcvbuf, "rmem_max"),
                                   ("send", socket.SO_SNDBUF, sndbuf, "wmem_max")):
        got = sock.getsockopt(socket.SOL_SOCKET, opt) // 2  # it reports twice the size
        if got < asked:
            short.append(f"{what} {got >> 10} of {asked >> 10} KiB (net.core.{knob})")
    return short


def _is_wildcard(sock: socket.socket) -> bool:
    return sock.getsockname()[0] in ("0.0.0.0", "::")


class Server:
    """Serve SERVICE on the given sockets until :meth:`stop` (or a signal)."""

    def __init__(self, service: Service, options: ServerOptions,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.options = options
        self.clock = clock
        self.sockets: list[socket.socket] = []
        self.probe_sockets: list[socket.socket] = []
        self.skipped: list[str] = []  # optional addresses that could not be opened, and why
        self.send_failed = 0
        self.notify_sent = 0
        self.notify_failed = 0
        self.notify_published = 0  # handed to the server holding the client's mapping
        self.notices_received = 0  # from other servers, sent from here
        self._routes: list[tuple[int, bytes | None, socket.socket]] = []  # family, bound, sock
        self.relay_sockets: list[tuple[int, socket.socket]] = []  # (relay port, socket)
        self.relay_send_failed = 0
        self._running = True  # until stop(): a signal before serve() must still stop it
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def open(self) -> None:
        """Open every listening socket. Port 0 picks a free port for the first socket and
        the others share it. A failing ``::`` is skipped when IPv6 is optional and the
        host has none."""
        try:
            self.skipped += self._open_each(self.options.listen, self.sockets)  # logged by the caller
            self._open_each(self.options.probe, self.probe_sockets)
            self._open_relay()
        except ListenError:
            self.close()
            raise
        self._routes = []
        for sock in self.sockets:
            v6 = sock.family == socket.AF_INET6
            host = sock.getsockname()[0]
            bound = None if _is_wildcard(sock) else socket.inet_pton(sock.family, host)
            self._routes.append((6 if v6 else 4, bound, sock))

    def _open_each(self, addrs: Sequence[tuple[str, int]],
                   into: list[socket.socket]) -> list[str]:
        """Open a socket for each (address, port) into INTO; port 0 takes the first
        socket's port. Returns why each optional ``::`` was skipped."""
        skipped = []
        for addr, port in addrs:
            if port == 0 and into:
                port = into[0].getsockname()[1]
            try:
                into.append(open_socket(addr, port, self.options.reuse_port,
                                        small_replies=True))
            except ListenError as e:
                if not (self.options.ipv6_optional and addr == "::" and e.errno in _NO_IPV6):
                    raise
                skipped.append(e.strerror)
        return skipped

    def _open_relay(self) -> None:
        """The relay's sockets: each relay port on each listening address."""
        for sock in list(self.sockets):
            host = sock.getsockname()[0]
            for port in self.options.relay_ports:
                self.relay_sockets.append((port, open_socket(host, port)))

    def _relay_reader(self, port: int, sock: socket.socket) -> Callable[[], None]:
        """Forward what the relay table says, straight from this socket; never parsed here."""
        relay = self.service.v2.relay if self.service.v2 is not None else None
        assert relay is not None, "relay sockets without a relay"
        handle, clock = relay.handle, self.clock
        v6 = sock.family == socket.AF_INET6

        def read() -> None:
            for _ in range(1024):
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    log.debug("relay recvfrom: %s", e)
                    continue
                pk = addr[1].to_bytes(2, "big")
                src = (socket.inet_pton(socket.AF_INET6, addr[0].partition("%")[0]) if v6
                       else socket.inet_aton(addr[0])) + pk
                dest = handle(port, data, src, clock())
                if dest is None:
                    continue
                to = ((socket.inet_ntop(socket.AF_INET6, dest[:16]), int.from_bytes(dest[16:], "big"))
                      if v6 else (socket.inet_ntoa(dest[:4]), int.from_bytes(dest[4:], "big")))
                # A full send buffer is not waited for here, unlike the service's
                # replies: the relay forwards a tunnel's traffic, and a downlink slower
                # than that traffic would keep it full; queueing more would only delay
                # the server's other work and the tunnel's packets (bufferbloat), while
                # dropping is what a router does and what the tunnel's own congestion
                # control expects. Bursts fit in the 4 MiB buffer; drops are counted.
                try:
                    sock.sendto(data, to)
                except OSError as e:
                    self.relay_send_failed += 1
                    log.debug("relay sendto %s: %s", to, e)

        return read

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.sockets]

    @property
    def probe_addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.probe_sockets]

    def close(self) -> None:
        for s in self.sockets + self.probe_sockets:
            s.close()
        self.sockets.clear()
        self.probe_sockets.clear()
        for _, s in self.relay_sockets:
            s.close()
        self.relay_sockets.clear()
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
            pktinfo = _is_wildcard(sock)
            if use_mmsg and sock.family == socket.AF_INET:
                batch = mmsg.Batch(self.options.batch, 2048, pktinfo)
                handlers[sock.fileno()] = self._mmsg_reader(sock, batch)
            else:
                handlers[sock.fileno()] = self._plain_reader(sock, pktinfo)
        for sock in self.probe_sockets:
            handlers[sock.fileno()] = self._plain_reader(sock, _is_wildcard(sock), probe=True)
        for port, sock in self.relay_sockets:
            handlers[sock.fileno()] = self._relay_reader(port, sock)
        poller = select.poll()
        for fd in handlers:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        service = self.service
        store = service.store if hasattr(service.store, "tick") else None
        store_fd = self._watch_store(poller, handlers, None)
        interval = self.options.stats_interval
        next_stats = self.clock() + interval if interval > 0 else float("inf")
        next_sweep = self.clock() + 10
        while self._running:
            events = poller.poll(1000)
            service.set_wall_clock(self.clock(), time.time_ns())
            for fd, _ in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler()
                    if service.v2 is not None:
                        self.send_notifications()
            now = self.clock()
            self.service.tick(now)
            if store and store.tick(now):
                store_fd = self._watch_store(poller, handlers, store_fd)
            if now >= next_sweep:
                self.service.sweep(now)
                next_sweep = now + 10
            if now >= next_stats:
                self.log_stats()
                next_stats = now + interval

    def _watch_store(self, poller: select.poll, handlers: dict[int, Callable[[], None]],
                     old: int | None) -> int | None:
        """Poll the store's notification socket (anew after a resubscribe)."""
        if old is not None:
            handlers.pop(old, None)
            try:
                poller.unregister(old)
            except (KeyError, ValueError):
                pass
        store = self.service.store
        fd = store.fileno() if store is not None and hasattr(store, "fileno") else None
        if fd is not None:
            handlers[fd] = self._read_notices
            poller.register(fd, select.POLLIN)
        return fd

    def _read_notices(self) -> None:
        """Notifications other servers publish for clients whose mapping we hold."""
        from .store import Notice, StoreError
        store = self.service.store
        room = mmsg.SendWait()
        for payload in store.notices():
            try:
                notice = Notice.decode(payload)
            except StoreError as e:
                store.stats.notices_bad += 1
                log.debug("store: %s", e)
                continue
            self.notices_received += 1
            self.notify_sent += self._send_notification(notice.destination, notice.datagram,
                                                        notice.local, room)

    def log_stats(self) -> None:
        stats = self.service.snapshot()
        stats["send_failed"] = self.send_failed
        if self.service.v2 is not None:
            stats["notify_sent"] = self.notify_sent
            stats["notify_failed"] = self.notify_failed
            if self.service.store is not None:
                stats["notify_published"] = self.notify_published
                stats["notices_received"] = self.notices_received
        if self.relay_sockets:
            stats["relay_send_failed"] = self.relay_send_failed
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in stats.items()))

    def _mmsg_reader(self, sock: socket.socket, batch: mmsg.Batch) -> Callable[[], None]:
        fd = sock.fileno()
        def logged(data: bytes, src: bytes, now: float) -> bytes | None:
            reply = self.service.handle(data, src, now)
            self._log_request(data, src, reply)
            return reply

        handle = logged if self.options.verbose else self.service.handle
        # Whole batches of classic requests in bulk (not when each request is logged).
        if self.options.verbose:
            bulk = None
        elif self.service.store is not None:
            from .sharedbatch import SharedBatch
            bulk = SharedBatch(self.service).handle
        else:
            bulk = ClassicBatch(self.service).handle
        clock = self.clock

        def read() -> None:
            room = mmsg.SendWait()  # for the notifications' full send buffer, per call
            # Bounded: after 16 full batches, give housekeeping and other sockets a turn.
            for _ in range(16):
                n, _sent, failed = batch.exchange(fd, handle, clock(), bulk)
                self.send_failed += failed
                if self.service.v2 is not None:
                    self.send_notifications(room)
                if n < batch.size:
                    return

        return read

    def _plain_reader(self, sock: socket.socket, pktinfo: bool,
                      probe: bool = False) -> Callable[[], None]:
        handle = self.service.probe if probe else self.service.handle
        clock = self.clock
        verbose = self.options.verbose
        v2 = self.service.v2
        v6 = sock.family == socket.AF_INET6
        ancsize = (socket.CMSG_SPACE(20 if v6 else 12)) if pktinfo else 0
        pkt_level, pkt_type = ((socket.IPPROTO_IPV6, _IPV6_PKTINFO) if v6
                               else (socket.IPPROTO_IP, mmsg.IP_PKTINFO))

        def read() -> None:
            room = mmsg.SendWait()  # for a full send buffer, once per call
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
                port = addr[1].to_bytes(2, "big")
                if v6:
                    src = socket.inet_pton(socket.AF_INET6, addr[0].partition("%")[0]) + port
                else:
                    src = socket.inet_aton(addr[0]) + port
                local = None
                cmsg: list[tuple[int, int, bytes]] = []
                for lvl, typ, d in anc:
                    if lvl != pkt_level or typ != pkt_type:
                        continue
                    if v6 and len(d) >= 20:  # in6_pktinfo: addr, ifindex
                        local = d[:16]
                        cmsg = [(lvl, typ, d[:20])]
                    elif not v6 and len(d) >= 12:  # in_pktinfo: ifindex, spec_dst, addr
                        local = d[8:12]
                        cmsg = [(lvl, typ, bytes(4) + d[8:12] + bytes(4))]
                reply = handle(data, src, clock(), local)
                if verbose:
                    self._log_request(data, src, reply)
                while reply is not None:
                    try:
                        sock.sendmsg([reply], cmsg, 0, addr)
                    except BlockingIOError:
                        if room.wait(sock.fileno()):
                            continue
                        self.send_failed += 1
                    except OSError as e:
                        self.send_failed += 1
                        log.debug("sendmsg to %s: %s", addr, e)
                    break
                if v2 is not None and v2.outbox:  # right after the reply: punch together
                    self.send_notifications(room)

        return read

    def send_notifications(self, room: mmsg.SendWait | None = None) -> int:
        """Send the v2 notifications the service queued (or hand them to the server
        holding the client's mapping); return how many were sent from here. A full send
        buffer is waited for within ROOM (the caller's read call), or a SendWait of its
        own."""
        sent = 0
        room = room or mmsg.SendWait()
        store = self.service.store
        for n in self.service.drain_notifications():
            if n.server is not None and store is not None:
                from .store import Notice
                if store.publish(n.server, Notice(n.destination, n.datagram, n.local).encode()):
                    self.notify_published += 1
                else:
                    self.notify_failed += 1
                continue
            sent += self._send_notification(n.destination, n.datagram, n.local, room)
        self.notify_sent += sent
        return sent

    def _send_notification(self, dest: bytes, datagram: bytes, local: bytes | None,
                           room: mmsg.SendWait) -> int:
        """Send DATAGRAM to DEST from LOCAL where possible; 1 if sent, else 0 (counted).
        A full send buffer is waited for within ROOM."""
        fam = 4 if len(dest) == 6 else 6
        # the socket bound to the local address, else a wildcard one (with that
        # address as the source where known), else any socket of the family
        same = [(bound, s) for family, bound, s in self._routes if family == fam]
        sock = next((s for bound, s in same if bound is not None and bound == local), None)
        cmsg: list[tuple[int, int, bytes]] = []
        if sock is None:
            sock = next((s for bound, s in same if bound is None), None)
            if sock is not None and local is not None:
                cmsg = ([(socket.IPPROTO_IPV6, _IPV6_PKTINFO, local + bytes(4))] if fam == 6
                        else [(socket.IPPROTO_IP, mmsg.IP_PKTINFO, bytes(4) + local + bytes(4))])
        if sock is None and same:
            sock = same[0][1]
        if sock is None:
            self.notify_failed += 1
            return 0
        port = int.from_bytes(dest[-2:], "big")
        to: tuple[str, int] | tuple[str, int, int, int]
        if fam == 4:
            to = (socket.inet_ntoa(dest[:4]), port)
        else:
            to = (socket.inet_ntop(socket.AF_INET6, dest[:16]), port, 0, 0)
        while True:
            try:
                sock.sendmsg([datagram], cmsg, 0, to)
            except BlockingIOError:
                if room.wait(sock.fileno()):
                    continue
                self.notify_failed += 1
                log.debug("notify to %s: the send buffer stays full", to)
                return 0
            except OSError as e:
                self.notify_failed += 1
                log.debug("notify to %s: %s", to, e)
                return 0
            return 1

    @staticmethod
    def _log_request(data: bytes, src: bytes, reply: bytes | None) -> None:
        who = str(Endpoint.from_source(src))
        if len(data) != 64 and looks_like_v2(data):
            log.debug("%s: v2 %s", who, "dropped" if reply is None else f"reply of {len(reply)} bytes",
                      extra=peer_fields(addr=who, result="dropped" if reply is None else "v2"))
        elif len(data) != 64:
            log.debug("%s: dropped a %d-byte datagram", who, len(data),
                      extra=peer_fields(addr=who, result="dropped"))
        elif reply is None:
            log.debug("%s: dropped request from %s", who, short_key(data[:32]),
                      extra=peer_fields(data[:32], who, result="dropped"))
        else:
            found = format_endpoint(reply) if reply else "not found"
            log.debug("%s: %s asks for %s -> %s", who, short_key(data[:32]),
                      short_key(data[32:]), found,
                      extra=peer_fields(data[:32], who, target=short_key(data[32:]),
                                        answer=format_endpoint(reply) if reply else None,
                                        result="found" if reply else "not_found"))
