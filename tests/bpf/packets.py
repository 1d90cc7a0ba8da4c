"""A battery of crafted packets for the reply filters, built with scapy.

Each :class:`Case` says what goes on the wire (``frames``, layer-3 bytes, in order),
what a raw UDP socket's filter would see according to our model of the kernel
(``model``: the same packet, or the reassembled datagram for fragments, or the
packet trimmed to its IP total length), whether the kernel hands anything to a raw
UDP socket at all (``delivered``), and the verdict we want from the filter on the
model (``accept``). test_kernel.py checks the model against a real kernel;
test_programs.py runs the interpreter and looks_like_* on ``model``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPOption_NOP,
    IPOption_Router_Alert,
    IPOption_RR,
    fragment,
)
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    fragment6,
)
from scapy.packet import Packet, Raw

SERVER4, CLIENT4, OTHER4 = "10.99.0.1", "10.99.0.2", "10.99.0.3"
SERVER6, CLIENT6, OTHER6 = "fd00:99::1", "fd00:99::2", "fd00:99::3"
SERVER_PORT, WG_PORT = 49918, 51820
CLASSIC_REPLY = bytes([192, 0, 2, 33]) + struct.pack("!H", 51821)


@dataclass(frozen=True)
class Case:
    name: str
    frames: tuple[bytes, ...]
    model: bytes
    delivered: bool
    accept: bool


def _ip(src: str = SERVER4, **kw: Any) -> IP:
    kw.setdefault("id", 0x4242)
    return IP(src=src, dst=CLIENT4, **kw)


def _udp(sport: int = SERVER_PORT, dport: int = WG_PORT) -> UDP:
    return UDP(sport=sport, dport=dport)


def _one(name: str, pkt: Packet | bytes, *, delivered: bool = True, accept: bool) -> Case:
    raw = bytes(pkt)
    return Case(name, (raw,), raw, delivered, accept)


def _with_ip_header(ip: IP, l4: bytes) -> bytes:
    """An IPv4 packet carrying exactly ``l4`` (lengths and checksum filled in)."""
    return bytes(ip / Raw(l4))


def ipv4_cases() -> list[Case]:
    cases = [
        _one("reply-classic", _ip() / _udp() / Raw(CLASSIC_REPLY), accept=True),
        _one("reply-empty", _ip() / _udp(), accept=True),
        _one("reply-100", _ip() / _udp() / Raw(b"r" * 100), accept=True),
        _one("reply-256", _ip() / _udp() / Raw(b"r" * 256), accept=True),
        _one("reply-257-truncated", _ip() / _udp() / Raw(b"r" * 257), accept=True),
        _one("reply-1400-truncated", _ip() / _udp() / Raw(b"r" * 1400), accept=True),
        _one("reply-df", _ip(flags="DF") / _udp() / Raw(CLASSIC_REPLY), accept=True),
        _one("wrong-src-ip", _ip(src=OTHER4) / _udp() / Raw(CLASSIC_REPLY), accept=False),
        _one("wrong-src-port", _ip() / _udp(sport=SERVER_PORT + 1) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("wrong-dst-port", _ip() / _udp(dport=WG_PORT + 1) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("swapped-ports", _ip() / _udp(WG_PORT, SERVER_PORT) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("wireguard-from-peer", _ip(src=OTHER4) / _udp(51820) / Raw(b"\x01" + bytes(147)),
             accept=False),
        _one("tcp-same-ports", _ip() / TCP(sport=SERVER_PORT, dport=WG_PORT, flags="SA"),
             delivered=False, accept=False),
        _one("icmp-echo", _ip() / ICMP() / Raw(b"ping"), delivered=False, accept=False),
        _one("icmp-unreach-quoting-udp",
             _ip() / ICMP(type=3, code=3)
             / IP(src=CLIENT4, dst=SERVER4) / UDP(sport=WG_PORT, dport=SERVER_PORT),
             delivered=False, accept=False),
        _one("options-nop", _ip(options=[IPOption_NOP()] * 4) / _udp() / Raw(CLASSIC_REPLY),
             accept=True),
        _one("options-router-alert",
             _ip(options=[IPOption_Router_Alert()]) / _udp() / Raw(CLASSIC_REPLY), accept=True),
        _one("options-rr-max-ihl",
             _ip(options=[IPOption_RR(routers=["0.0.0.0"] * 9), IPOption_NOP()])
             / _udp() / Raw(CLASSIC_REPLY), accept=True),
        _one("options-wrong-port",
             _ip(options=[IPOption_NOP()] * 8) / _udp(dport=WG_PORT + 1) / Raw(CLASSIC_REPLY),
             accept=False),
        # Raw sockets see the IP header; a UDP header cut short is delivered as is.
        _one("udp-header-4-bytes", _with_ip_header(_ip(proto=17), bytes(_udp())[:4]),
             accept=False),
        _one("udp-header-7-bytes", _with_ip_header(_ip(proto=17), bytes(_udp())[:7]),
             accept=False),
        _one("no-udp-header", _with_ip_header(_ip(proto=17), b""), accept=False),
        # The filter does not check the UDP length field (the kernel's UDP layer,
        # which would, runs after raw delivery): the client must.
        _one("udp-length-lies", _with_ip_header(
            _ip(proto=17), struct.pack("!HHHH", SERVER_PORT, WG_PORT, 100, 0) + CLASSIC_REPLY),
            accept=True),
    ]

    # Frame longer than the IP total length (link-layer padding): trimmed first.
    good = bytes(_ip() / _udp() / Raw(CLASSIC_REPLY))
    cases.append(Case("trailing-junk", (good + b"JUNKJUNK",), good, True, True))

    # Broken headers never reach a raw socket.
    bad_sum = bytearray(good)
    bad_sum[10] ^= 0xFF
    cases.append(Case("bad-ip-checksum", (bytes(bad_sum),), bytes(bad_sum), False, True))
    long_len = bytes(_ip(len=len(good) + 20) / _udp() / Raw(CLASSIC_REPLY))
    cases.append(Case("total-length-beyond-frame", (long_len,), long_len, False, True))
    short_ihl = bytearray(good)
    short_ihl[0] = 0x44
    cases.append(Case("ihl-4", (bytes(short_ihl),), bytes(short_ihl), False, False))

    # Fragments: reassembled before raw delivery; a lone fragment never arrives.
    whole = _ip() / _udp() / Raw(bytes(range(256)) * 4)
    frags = [bytes(f) for f in fragment(whole, fragsize=400)]
    cases.append(Case("fragments", tuple(frags), bytes(whole), True, True))
    cases.append(Case("fragments-reversed", tuple(reversed(frags)), bytes(whole), True, True))
    small = _ip() / _udp() / Raw(CLASSIC_REPLY + bytes(90))
    small_frags = [bytes(f) for f in fragment(small, fragsize=48)]
    cases.append(Case("fragments-small-reply", tuple(small_frags), bytes(small), True, True))
    first = bytes(_ip(id=0x5151, flags="MF") / _udp() / Raw(b"f" * 64))
    cases.append(Case("lone-first-fragment", (first,), first, False, True))
    # A later fragment whose data happens to start with the right ports.
    later = _with_ip_header(_ip(id=0x5252, proto=17, frag=8),
                            struct.pack("!HHHH", SERVER_PORT, WG_PORT, 14, 0) + CLASSIC_REPLY)
    cases.append(Case("lone-later-fragment-port-lookalike", (later,), later, False, False))
    return cases


# --- IPv6 ------------------------------------------------------------------------------

def _ip6(src: str = SERVER6) -> IPv6:
    return IPv6(src=src, dst=CLIENT6)


def split_ipv6(packet: bytes) -> tuple[bytes, bytes, int]:
    """(network header + extension headers, transport data, next header)."""
    nh, off = packet[6], 40
    while nh in (0, 43, 60, 44):
        if nh == 44:
            nh, off = packet[off], off + 8
        else:
            nh, off = packet[off], off + 8 * (packet[off + 1] + 1)
    return packet[:off], packet[off:], nh


def ipv6_cases() -> list[Case]:
    cases = [
        _one("reply-classic", _ip6() / _udp() / Raw(CLASSIC_REPLY), accept=True),
        _one("reply-empty", _ip6() / _udp(), accept=True),
        _one("reply-256", _ip6() / _udp() / Raw(b"r" * 256), accept=True),
        _one("reply-257-truncated", _ip6() / _udp() / Raw(b"r" * 257), accept=True),
        _one("reply-1400-truncated", _ip6() / _udp() / Raw(b"r" * 1400), accept=True),
        _one("wrong-src-ip", _ip6(OTHER6) / _udp() / Raw(CLASSIC_REPLY), accept=False),
        _one("wrong-src-ip-last-word-only", _ip6("fd00:99::1:1") / _udp() / Raw(CLASSIC_REPLY),
             accept=False),
        _one("wrong-src-ip-first-word-only", _ip6("fd01:99::1") / _udp() / Raw(CLASSIC_REPLY),
             accept=False),
        _one("wrong-src-port", _ip6() / _udp(sport=SERVER_PORT + 1) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("wrong-dst-port", _ip6() / _udp(dport=WG_PORT + 1) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("swapped-ports", _ip6() / _udp(WG_PORT, SERVER_PORT) / Raw(CLASSIC_REPLY),
             accept=False),
        _one("hop-by-hop", _ip6() / IPv6ExtHdrHopByHop() / _udp() / Raw(CLASSIC_REPLY),
             accept=True),
        _one("dest-options", _ip6() / IPv6ExtHdrDestOpt() / _udp() / Raw(CLASSIC_REPLY),
             accept=True),
        _one("dest-options-wrong-src", _ip6(OTHER6) / IPv6ExtHdrDestOpt() / _udp()
             / Raw(CLASSIC_REPLY), accept=False),
        # The IPv6 filter trusts the socket's protocol (the next-header field is not
        # UDP when extension headers come first), so it would pass TCP with the
        # right ports; an IPPROTO_UDP raw socket never receives TCP.
        _one("tcp-same-ports", _ip6() / TCP(sport=SERVER_PORT, dport=WG_PORT, flags="SA"),
             delivered=False, accept=True),
        _one("icmpv6-echo", _ip6() / ICMPv6EchoRequest(), delivered=False, accept=False),
        _one("udp-header-4-bytes", _ip6() / Raw(bytes(_udp())[:4]), accept=False),
    ]
    # scapy's IPv6/Raw sets nh=59 (no next header); make those UDP.
    fixed = []
    for c in cases:
        if c.name == "udp-header-4-bytes":
            raw = bytearray(c.model)
            raw[6] = 17
            c = Case(c.name, (bytes(raw),), bytes(raw), c.delivered, c.accept)
        fixed.append(c)
    cases = fixed

    whole = _ip6() / _udp() / Raw(bytes(range(256)) * 4)
    frags = [bytes(f) for f in fragment6(
        _ip6() / IPv6ExtHdrFragment(id=0x6161) / _udp() / Raw(bytes(range(256)) * 4), 500)]
    cases.append(Case("fragments", tuple(frags), bytes(whole), True, True))
    lone = [bytes(f) for f in fragment6(
        _ip6() / IPv6ExtHdrFragment(id=0x6262) / _udp() / Raw(bytes(range(256)) * 4), 500)]
    cases.append(Case("lone-later-fragment", (lone[1],), lone[1], False, False))
    return cases
