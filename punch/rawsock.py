"""The raw socket that speaks to the rendezvous server from WireGuard's port.

WireGuard owns the UDP socket on its listen port, so we cannot bind it. Instead an
AF_INET/SOCK_RAW/IPPROTO_UDP socket sends datagrams whose UDP header (ours) carries
WireGuard's port as the source: the request then leaves through the very NAT mapping
WireGuard's own traffic uses, and the server sees WireGuard's public endpoint.

The same socket receives every UDP packet that reaches the host, tunnel traffic
included, so a classic BPF filter lets only the server's replies to WireGuard's port
through, and every packet is checked again in Python before it is believed.

Order matters for speed: the client sends its first request as soon as the socket
exists and attaches the filter right after (setting up cffi costs ~25 ms). Whatever
queued up before the filter bypassed it, so :meth:`RawChannel.arm` drains the queue
through the Python check, which accepts exactly what the filter accepts (the bpf
tests prove it): the server's early reply is kept, everything else is discarded.

:class:`RawChannel6` is the IPv6 twin (protocol v2): an AF_INET6/SOCK_RAW/IPPROTO_UDP
socket, which receives the UDP header onward (the source address comes from
recvfrom), with :func:`bpf.programs.ipv6_reply_filter`. IPv6 makes the UDP checksum
mandatory; the socket option IPV6_CHECKSUM has the kernel compute it (see punch/udp.py).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Iterator

from collections import deque

from bpf.insn import Program
from bpf.programs import (
    ipv4_reply_filter, ipv6_reply_filter, looks_like_ipv4_reply, looks_like_ipv6_reply,
)

from .errors import FilterRefused, NotPermitted, PunchError
from .udp import UdpError, build_udp, parse_ipv4_udp, parse_udp, udp_header

__all__ = ["RawChannel", "RawChannel6", "open_channel", "source_address_for"]

log = logging.getLogger(__name__)

_SEND_ERRORS = (errno.EAGAIN, errno.ENOBUFS, errno.EHOSTUNREACH, errno.ENETUNREACH,
                errno.EPERM, errno.ECONNREFUSED, errno.EADDRNOTAVAIL)
_UDP_CHECKSUM_OFFSET = 6


def source_address_for(dst: tuple[str, int]) -> str:
    """The local address the kernel picks to reach DST (a routing lookup, no traffic);
    DST may be IPv4 or IPv6. PunchError when there is no route."""
    family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(dst)
        return str(probe.getsockname()[0])
    except OSError as e:
        raise PunchError(f"no route to {dst[0]}: {e.strerror}") from None
    finally:
        probe.close()


class RawChannel:
    """Send from WireGuard's port to the server (and to peers); receive the server's replies."""

    family = 4
    _af = socket.AF_INET

    def __init__(self, server: tuple[str, int], wg_port: int) -> None:
        self.server = server
        self.wg_port = wg_port
        self.ignored = 0
        self.armed = False
        self._early: deque[bytes] = deque()
        self._src_cache: dict[str, tuple[str, float]] = {}
        try:
            self.sock = socket.socket(self._af, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError:
            raise NotPermitted("opening a raw socket needs root (CAP_NET_RAW)") from None
        self.sock.setblocking(False)

    def _filter(self) -> Program:
        return ipv4_reply_filter(self.server[0], self.server[1], self.wg_port)

    def arm(self) -> None:
        """Attach the reply filter, then drain what queued before it (keeping replies)."""
        from bpf.attach import attach_filter

        try:
            attach_filter(self.sock, self._filter())
        except OSError as e:
            self.sock.close()
            raise FilterRefused(f"cannot attach the reply filter to the raw socket on port "
                                f"{self.wg_port}: {e}") from None
        self.armed = True
        before = self.ignored
        self._early.extend(self._read())
        if self.ignored > before:
            log.debug("drained %d packets queued before the filter", self.ignored - before)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _source_for(self, dst_ip: str, now: float) -> str:
        cached = self._src_cache.get(dst_ip)
        if cached is not None and cached[1] > now:
            return cached[0]
        src = source_address_for((dst_ip, 9))
        self._src_cache[dst_ip] = (src, now + 5.0)
        return src

    def send(self, dst: tuple[str, int], payload: bytes) -> bool:
        """Send PAYLOAD to DST from WireGuard's port; False if the kernel refused it now,
        or there is no route to DST now (the network went away for a while: a daemon
        carries on, and its next tries go out once the route is back)."""
        try:
            src = self._source_for(dst[0], time.monotonic())
        except PunchError as e:
            log.debug("send to %s:%d failed: %s", dst[0], dst[1], e)
            return False
        datagram = build_udp(src, dst[0], self.wg_port, dst[1], payload)
        return self._sendto(datagram, dst)

    def _sendto(self, datagram: bytes, dst: tuple[str, int]) -> bool:
        try:
            self.sock.sendto(datagram, (dst[0], 0))
            return True
        except OSError as e:
            if e.errno in _SEND_ERRORS:
                log.debug("send to %s:%d failed: %s", dst[0], dst[1], e.strerror)
                self._src_cache.pop(dst[0], None)
                return False
            raise

    def send_to_server(self, payload: bytes) -> bool:
        return self.send(self.server, payload)

    def poke(self, dst: tuple[str, int]) -> bool:
        """An empty datagram toward a peer: opens our NAT for its answer; WireGuard drops it."""
        return self.send(dst, b"")

    def replies(self) -> Iterator[bytes]:
        """The payloads of the server's replies waiting on the socket (non-blocking)."""
        while self._early:
            yield self._early.popleft()
        yield from self._read()

    def _read(self) -> Iterator[bytes]:
        server_ip, server_port = self.server
        while True:
            try:
                packet = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            if not looks_like_ipv4_reply(packet, server_ip, server_port, self.wg_port):
                self.ignored += 1
                continue
            try:
                yield parse_ipv4_udp(packet).payload
            except UdpError as e:
                self.ignored += 1
                log.debug("ignored a packet: %s", e)

    def close(self) -> None:
        if self.armed and self.sock.fileno() >= 0:
            from bpf.attach import detach_filter

            try:
                detach_filter(self.sock)
            except OSError:
                pass
        self.sock.close()


class RawChannel6(RawChannel):
    """The IPv6 channel: same interface; the kernel writes the UDP checksum."""

    family = 6
    _af = socket.AF_INET6

    def __init__(self, server: tuple[str, int], wg_port: int) -> None:
        super().__init__(server, wg_port)
        try:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, _UDP_CHECKSUM_OFFSET)
        except OSError:
            self.sock.close()
            raise

    def _filter(self) -> Program:
        return ipv6_reply_filter(self.server[0], self.server[1], self.wg_port)

    def send(self, dst: tuple[str, int], payload: bytes) -> bool:
        """Send PAYLOAD to DST (IPv6) from WireGuard's port; False if refused now."""
        return self._sendto(udp_header(self.wg_port, dst[1], payload), dst)

    def _read(self) -> Iterator[bytes]:
        server_ip, server_port = self.server
        while True:
            try:
                segment, source = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            if not looks_like_ipv6_reply(segment, source[0], server_ip, server_port,
                                         self.wg_port):
                self.ignored += 1
                continue
            try:
                yield parse_udp(segment, source[0]).payload
            except UdpError as e:
                self.ignored += 1
                log.debug("ignored a packet: %s", e)


def open_channel(server: tuple[str, int], wg_port: int) -> RawChannel:
    """The channel for SERVER's address family."""
    return (RawChannel6 if ":" in server[0] else RawChannel)(server, wg_port)
