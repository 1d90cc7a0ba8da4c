"""The IPv6 raw channel with real packets between two namespaces joined by a veth pair.

The "server" side is a plain UDP socket, so the kernel's own checks decide what
arrives: a UDP/IPv6 datagram with a zero or wrong checksum is dropped there. That is
how these tests measure which ways of writing the mandatory IPv6 checksum work.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from punch.rawsock import RawChannel6, open_channel, source_address_for
from punch.udp import build_udp6, udp_header
from tests.nstools import Netns, veth

pytestmark = pytest.mark.root

CLIENT, SERVER, OTHER = "fd00:6b::1", "fd00:6b::2", "fd00:6b::3"
WG_PORT, SERVER_PORT = 51820, 49918


@pytest.fixture
def pair():
    """(client namespace, server namespace), joined; the server has a second address."""
    with Netns("r6c") as c, Netns("r6s") as s:
        veth(c, "vc", "10.66.0.1/24", s, "vs", "10.66.0.2/24")
        c.run(["ip", "-6", "addr", "add", f"{CLIENT}/64", "dev", "vc", "nodad"])
        for addr in (SERVER, OTHER):
            s.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", "vs", "nodad"])
        yield c, s


def udp6(ns: Netns, addr: str, port: int) -> socket.socket:
    with ns.entered():
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind((addr, port))
    sock.settimeout(2)
    return sock


def received(sock: socket.socket, timeout: float = 0.5) -> list[tuple[bytes, tuple]]:
    out = []
    sock.settimeout(timeout)
    while True:
        try:
            data, src = sock.recvfrom(2048)
        except TimeoutError:
            return out
        out.append((data, src[:2]))
        sock.settimeout(0.1)


def wait_readable(fd: int, timeout: float = 2.0) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(timeout * 1000), "nothing arrived"


def test_the_ipv6_udp_checksum_is_mandatory_and_both_ways_of_writing_it_work(pair):
    c, s = pair
    server = udp6(s, "::", SERVER_PORT)
    with c.entered():
        plain = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
        kernel = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
    kernel.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 6)
    dst = (SERVER, 0)

    def junk_sum(payload: bytes) -> bytes:
        return struct.pack("!HHHH", WG_PORT, SERVER_PORT, 8 + len(payload), 0x1234) + payload

    plain.sendto(udp_header(WG_PORT, SERVER_PORT, b"zero-sum"), dst)   # checksum 0
    plain.sendto(junk_sum(b"wrong-sum"), dst)                            # a wrong one
    plain.sendto(build_udp6(CLIENT, SERVER, WG_PORT, SERVER_PORT, b"ours"), dst)
    kernel.sendto(udp_header(WG_PORT, SERVER_PORT, b"kernel"), dst)
    kernel.sendto(junk_sum(b"kernel-over-junk"), dst)  # the kernel overwrites the field
    got = received(server)
    assert [d for d, _ in got] == [b"ours", b"kernel", b"kernel-over-junk"]
    assert all(src == (CLIENT, WG_PORT) for _, src in got)
    for sock in (plain, kernel, server):
        sock.close()


def test_channel_sends_from_wireguards_port_and_keeps_only_the_servers_replies(pair):
    c, s = pair
    server = udp6(s, SERVER, SERVER_PORT)
    wrong_port = udp6(s, SERVER, SERVER_PORT + 1)
    wrong_addr = udp6(s, OTHER, SERVER_PORT)
    with c.entered():
        ch = open_channel((SERVER, SERVER_PORT), WG_PORT)
        assert isinstance(ch, RawChannel6) and ch.family == 6
        assert source_address_for((SERVER, SERVER_PORT)) == CLIENT
        # Sent before the filter is attached (like the client's first request).
        assert ch.send_to_server(b"request-1")
    data, src = server.recvfrom(100)
    assert data == b"request-1" and src[:2] == (CLIENT, WG_PORT)
    # Before arm(): a stranger's packet and the server's early reply both queue up.
    wrong_port.sendto(b"early-junk", (CLIENT, WG_PORT))
    server.sendto(b"early-reply", (CLIENT, WG_PORT))
    wait_readable(ch.fileno())
    time.sleep(0.1)
    ch.arm()  # drains the queue through the Python check: the reply is kept
    assert ch.ignored >= 1
    ignored = ch.ignored
    # After arm(): the kernel filter drops what is not the server's reply to our port.
    wrong_port.sendto(b"junk-port", (CLIENT, WG_PORT))
    wrong_addr.sendto(b"junk-addr", (CLIENT, WG_PORT))
    server.sendto(b"not-for-wg", (CLIENT, WG_PORT + 1))
    server.sendto(b"reply-2", (CLIENT, WG_PORT))
    wait_readable(ch.fileno())
    time.sleep(0.1)
    assert list(ch.replies()) == [b"early-reply", b"reply-2"]
    assert ch.ignored == ignored  # the filter, not Python, dropped the junk
    # A poke toward a peer: an empty datagram from WireGuard's port.
    peer = udp6(s, OTHER, 40000)
    assert ch.poke((OTHER, 40000))
    data, src = peer.recvfrom(100)
    assert data == b"" and src[:2] == (CLIENT, WG_PORT)
    ch.close()
    for sock in (server, wrong_port, wrong_addr, peer):
        sock.close()


def test_a_long_reply_is_cut_by_the_filter_and_refused(pair):
    """The filter keeps 256 payload bytes; a longer datagram must not pass as shorter."""
    c, s = pair
    server = udp6(s, SERVER, SERVER_PORT)
    with c.entered():
        ch = RawChannel6((SERVER, SERVER_PORT), WG_PORT)
        ch.arm()
    server.sendto(bytes(300), (CLIENT, WG_PORT))
    server.sendto(b"ok", (CLIENT, WG_PORT))
    wait_readable(ch.fileno())
    time.sleep(0.1)
    assert list(ch.replies()) == [b"ok"] and ch.ignored == 1
    ch.close()
    server.close()


def test_no_route_is_a_clear_error(pair):
    c, _ = pair
    from punch.errors import PunchError

    with c.entered(), pytest.raises(PunchError, match="no route to 2001:db8::1"):
        source_address_for(("2001:db8::1", 9))
