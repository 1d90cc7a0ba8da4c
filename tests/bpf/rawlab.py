"""Two network namespaces joined by a veth pair, for watching what the kernel hands
a raw UDP socket with and without a filter.

``srv`` writes whole Ethernet frames with an AF_PACKET socket, so every header can
be malformed on purpose; ``cli`` holds two raw sockets of the family under test:
one with no filter (what the kernel gives any raw socket, i.e. what a filter
sees) and one with the filter. After each test packet a sentinel packet, which
both sockets accept, marks the end of what that packet produced. The sending
thread is pinned to one CPU so that packets are processed in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bpf import Insn, attach_filter, drain
from tests.nstools import Netns, veth

ETH_P_IP, ETH_P_IPV6, ETH_P_ALL = 0x0800, 0x86DD, 0x0003
SRV_IF, CLI_IF = "s0", "c0"


@dataclass
class Observation:
    unfiltered: list[tuple[bytes, str]]   # (data, source address) per datagram
    filtered: list[tuple[bytes, str]]


class RawLab:
    def __init__(self, addr4: tuple[str, str], addr6: tuple[str, str]) -> None:
        self.srv = Netns("bpfsrv")
        try:
            self.cli = Netns("bpfcli")
        except BaseException:
            self.srv.close()
            raise
        try:
            self._setup(addr4, addr6)
        except BaseException:
            self.close()
            raise
        self.socks: list[socket.socket] = []

    def _setup(self, addr4: tuple[str, str], addr6: tuple[str, str]) -> None:
        veth(self.srv, SRV_IF, f"{addr4[0]}/24", self.cli, CLI_IF, f"{addr4[1]}/24")
        for ns, ifn, a in ((self.srv, SRV_IF, addr6[0]), (self.cli, CLI_IF, addr6[1])):
            ns.run(["ip", "-6", "addr", "add", f"{a}/64", "dev", ifn, "nodad"])
        for key in ("all", "default", CLI_IF):
            self.cli.run(["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"])
        self.srv_mac = self._mac(self.srv, SRV_IF)
        self.cli_mac = self._mac(self.cli, CLI_IF)
        with self.srv.entered():
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.tx.bind((SRV_IF, 0))

    @staticmethod
    def _mac(ns: Netns, ifname: str) -> bytes:
        info = json.loads(ns.run(["ip", "-j", "link", "show", ifname]).stdout)[0]
        return bytes.fromhex(info["address"].replace(":", ""))

    def raw_socket(self, family: int, program: Sequence[Insn] | None = None) -> socket.socket:
        with self.cli.entered():
            s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.socks.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if program is not None:
            attach_filter(s, program)
        drain(s)
        return s

    @contextlib.contextmanager
    def sockets(self, family: int, *programs: Sequence[Insn] | None
                ) -> Iterator[list[socket.socket]]:
        """Raw UDP sockets in ``cli`` (one per program; None for no filter), closed
        afterwards: every raw socket sees every packet, so none may outlive a test."""
        socks = [self.raw_socket(family, p) for p in programs]
        try:
            yield socks
        finally:
            for s in socks:
                s.close()
                self.socks.remove(s)

    def send(self, l3: bytes) -> None:
        ethertype = ETH_P_IPV6 if l3[0] >> 4 == 6 else ETH_P_IP
        self.tx.send(self.cli_mac + self.srv_mac + struct.pack("!H", ethertype) + l3)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(before)})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    def exchange(self, frames: Sequence[bytes], sentinel: bytes,
                 unfiltered: socket.socket, filtered: socket.socket) -> Observation:
        """Send FRAMES then SENTINEL (a reply both sockets accept, made unique by a
        random payload, and by a random IP id for IPv4); collect what each socket
        received before the sentinel, which may arrive truncated."""
        if sentinel[0] >> 4 == 6:
            expect, least = sentinel[40:], 8        # raw IPv6 data: UDP header on
        else:
            expect, least = sentinel, 28            # raw IPv4 data: whole packet

        def is_sentinel(data: bytes) -> bool:
            return len(data) >= least and expect.startswith(data)

        with self.pinned():
            for f in frames:
                self.send(f)
            self.send(sentinel)
        return Observation(until(unfiltered, is_sentinel), until(filtered, is_sentinel))

    def close(self) -> None:
        for s in getattr(self, "socks", []):
            s.close()
        if hasattr(self, "tx"):
            self.tx.close()
        self.cli.close()
        self.srv.close()


def until(sock: socket.socket, is_sentinel: Callable[[bytes], bool],
          timeout: float = 10.0) -> list[tuple[bytes, str]]:
    """Datagrams received before the sentinel (which is consumed)."""
    sock.settimeout(timeout)
    got: list[tuple[bytes, str]] = []
    while True:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            raise AssertionError(f"the sentinel never arrived; got {len(got)} datagram(s)") \
                from None
        if is_sentinel(data):
            return got
        got.append((data, addr[0]))
