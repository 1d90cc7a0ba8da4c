"""The client's socket filters: let through the rendezvous server's replies to
WireGuard's port and nothing else, plus pure-Python twins (``looks_like_*``) that
accept exactly the same packets, as a second line of defence after recv().

The client owns no UDP socket (WireGuard does), so it reads replies from a raw
socket that sees every incoming UDP datagram of the host, including all of
WireGuard's traffic. What the kernel hands such a socket, and so what a filter on
it sees at offset 0, was measured on Linux 6.18 (tests/bpf/test_kernel.py keeps
checking it):

AF_INET, SOCK_RAW, IPPROTO_UDP
    Data starts at the IPv4 header (options included); recv() returns the whole
    IPv4 packet. The kernel has already dropped packets with a bad header
    checksum, a header length under 20 bytes or a total length beyond the frame,
    and trimmed link-layer padding, so ``len`` is the IP total length.
    Fragments are reassembled before raw delivery: a filter only ever sees whole
    datagrams (fragment offset 0, MF clear); a lone fragment is never delivered.

AF_INET6, SOCK_RAW, IPPROTO_UDP
    Data starts at the UDP header, after the IPv6 header and any extension
    headers; recv() returns the UDP header and payload, recvfrom() gives the
    source address. The IPv6 header is still in the buffer in front of the data
    and a classic filter can read it at ``SKF_NET_OFF + n`` (-0x100000 + n): that
    is how :func:`ipv6_reply_filter` checks the source address (bytes 8..23).
    Fragments are reassembled first here too.

Accepted length. A filter returns how many bytes to keep. These keep the IP
header (IPv4 only), the 8-byte UDP header and at most ``max_payload`` bytes of
payload, so a flood of large WireGuard packets that happens to match costs
little. A classic reply is 0 or 6 bytes; :data:`DEFAULT_MAX_PAYLOAD` (256) leaves
room for a richer future reply (IPv6 endpoints, several candidates, a version
byte, a MAC) without copying whole WireGuard packets. A reply longer than
``max_payload`` arrives truncated: compare the UDP length field with what recv()
returned to notice.

What the filters check (IPv4): version 4, protocol 17, source address, fragment
offset 0, header length (IHL, options honoured) of at least 20 bytes, UDP source
port = server port, UDP destination port = WireGuard's port, and a whole 8-byte
UDP header present. (IPv6): source address, ports, whole UDP header; the socket
protocol already guarantees UDP, and the next-header field at offset 6 cannot be
trusted to say so when extension headers are present.

Both filters are written for one socket type each: attaching the IPv4 one to an
AF_INET6 raw socket (or vice versa) makes it read the wrong bytes.
"""

from __future__ import annotations

import functools
import ipaddress

from .errors import BpfEncodingError
from .insn import (
    SKF_NET_OFF,
    Program,
    add_k,
    and_k,
    jeq,
    jge,
    jset,
    ld_abs_b,
    ld_abs_h,
    ld_abs_w,
    ld_ind_h,
    ld_len,
    ldx_msh,
    ret_a,
    ret_k,
    sub_x,
    txa,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "IPPROTO_UDP",
    "UDP_HEADER_LEN",
    "ipv4_reply_filter",
    "ipv6_reply_filter",
    "looks_like_ipv4_reply",
    "looks_like_ipv6_reply",
]

DEFAULT_MAX_PAYLOAD = 256
"""Payload bytes kept per reply: room for a v2 reply; a classic one is 0 or 6 bytes."""
MAX_PAYLOAD_LIMIT = 0xFFFF - 8
IPPROTO_UDP = 17
UDP_HEADER_LEN = 8
IPV4_MIN_HEADER = 20
_FRAG_OFFSET_MASK = 0x1FFF


def _port(name: str, port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise BpfEncodingError(f"{name}={port!r} is not a UDP port (1..65535)")
    return port


def _max_payload(n: int) -> int:
    if not isinstance(n, int) or not 0 <= n <= MAX_PAYLOAD_LIMIT:
        raise BpfEncodingError(f"max_payload={n!r} is out of range 0..{MAX_PAYLOAD_LIMIT}")
    return n


def _v4(ip: str | ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError:
        raise BpfEncodingError(f"server_ip={ip!r} is not an IPv4 address") from None


@functools.lru_cache(maxsize=64)
def _v4_packed(ip: str | ipaddress.IPv4Address) -> bytes:
    return _v4(ip).packed


def _v6(ip: str | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(ip.split("%")[0] if isinstance(ip, str) else ip)
    except ValueError:
        raise BpfEncodingError(f"server_ip={ip!r} is not an IPv6 address") from None


def ipv4_reply_filter(server_ip: str | ipaddress.IPv4Address, server_port: int, wg_port: int,
                      max_payload: int = DEFAULT_MAX_PAYLOAD) -> Program:
    """Filter for an AF_INET/SOCK_RAW/IPPROTO_UDP socket (data = IPv4 header onward).

    Accepts UDP from ``server_ip:server_port`` to ``wg_port``; keeps the IP header,
    the UDP header and up to ``max_payload`` payload bytes. Drops everything else.
    """
    src = int(_v4(server_ip))
    sport, dport = _port("server_port", server_port), _port("wg_port", wg_port)
    keep = UDP_HEADER_LEN + _max_payload(max_payload)
    drop = 22  # index of the final "ret #0"; jf/jt offsets below count to it
    prog = (
        ld_abs_b(0),                           # 0  A = version << 4 | IHL
        and_k(0xF0),                           # 1
        jeq(0x40, 0, drop - 3),                # 2  IPv4?
        ld_abs_b(9),                           # 3  A = protocol
        jeq(IPPROTO_UDP, 0, drop - 5),         # 4  UDP?
        ld_abs_w(12),                          # 5  A = source address
        jeq(src, 0, drop - 7),                 # 6  from the server?
        ld_abs_h(6),                           # 7  A = flags | fragment offset
        jset(_FRAG_OFFSET_MASK, drop - 9, 0),  # 8  a later fragment: no UDP header
        ldx_msh(0),                            # 9  X = IP header length (IHL * 4)
        txa(),                                 # 10
        jge(IPV4_MIN_HEADER, 0, drop - 12),    # 11 at least 20 bytes?
        ld_ind_h(0),                           # 12 A = UDP source port
        jeq(sport, 0, drop - 14),              # 13 the server's port?
        ld_ind_h(2),                           # 14 A = UDP destination port
        jeq(dport, 0, drop - 16),              # 15 WireGuard's port?
        ld_len(),                              # 16 A = packet length (= IP total length)
        sub_x(),                               # 17 A = bytes from the UDP header on
        jge(UDP_HEADER_LEN, 0, drop - 19),     # 18 a whole UDP header?
        txa(),                                 # 19 accept IP header + UDP header
        add_k(keep),                           # 20   + max_payload bytes
        ret_a(),                               # 21
        ret_k(0),                              # 22 drop
    )
    assert len(prog) == drop + 1
    return prog


def ipv6_reply_filter(server_ip6: str | ipaddress.IPv6Address, server_port: int,
                      wg_port: int, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Program:
    """Filter for an AF_INET6/SOCK_RAW/IPPROTO_UDP socket (data = UDP header onward).

    Checks the source address in the IPv6 header through ``SKF_NET_OFF``, then the
    ports; keeps the UDP header and up to ``max_payload`` payload bytes.
    """
    words = _v6(server_ip6).packed
    w = [int.from_bytes(words[i:i + 4], "big") for i in range(0, 16, 4)]
    sport, dport = _port("server_port", server_port), _port("wg_port", wg_port)
    keep = UDP_HEADER_LEN + _max_payload(max_payload)
    drop = 15
    prog = (
        ld_abs_w(SKF_NET_OFF + 8),             # 0  IPv6 source address, word 0
        jeq(w[0], 0, drop - 2),                # 1
        ld_abs_w(SKF_NET_OFF + 12),            # 2  word 1
        jeq(w[1], 0, drop - 4),                # 3
        ld_abs_w(SKF_NET_OFF + 16),            # 4  word 2
        jeq(w[2], 0, drop - 6),                # 5
        ld_abs_w(SKF_NET_OFF + 20),            # 6  word 3
        jeq(w[3], 0, drop - 8),                # 7
        ld_abs_h(0),                           # 8  A = UDP source port
        jeq(sport, 0, drop - 10),              # 9  the server's port?
        ld_abs_h(2),                           # 10 A = UDP destination port
        jeq(dport, 0, drop - 12),              # 11 WireGuard's port?
        ld_len(),                              # 12 A = UDP length as delivered
        jge(UDP_HEADER_LEN, 0, drop - 14),     # 13 a whole UDP header?
        ret_k(keep),                           # 14 UDP header + max_payload bytes
        ret_k(0),                              # 15 drop
    )
    assert len(prog) == drop + 1
    return prog


def looks_like_ipv4_reply(packet: bytes, server_ip: str | ipaddress.IPv4Address,
                          server_port: int, wg_port: int) -> bool:
    """True exactly when :func:`ipv4_reply_filter` would accept ``packet`` (an IPv4
    packet, header first, as a raw AF_INET socket returns it, possibly truncated by
    the filter)."""
    if len(packet) < IPV4_MIN_HEADER + UDP_HEADER_LEN:
        return False
    first = packet[0]
    ihl = (first & 0x0F) * 4
    return (first & 0xF0 == 0x40
            and packet[9] == IPPROTO_UDP
            and packet[12:16] == _v4_packed(server_ip)
            and not int.from_bytes(packet[6:8], "big") & _FRAG_OFFSET_MASK
            and ihl >= IPV4_MIN_HEADER
            and len(packet) - ihl >= UDP_HEADER_LEN
            and int.from_bytes(packet[ihl:ihl + 2], "big") == server_port
            and int.from_bytes(packet[ihl + 2:ihl + 4], "big") == wg_port)


def looks_like_ipv6_reply(packet: bytes, source: str | ipaddress.IPv6Address,
                          server_ip6: str | ipaddress.IPv6Address, server_port: int,
                          wg_port: int) -> bool:
    """True exactly when :func:`ipv6_reply_filter` would accept ``packet`` (a UDP
    header and payload, as a raw AF_INET6 socket returns it) sent from ``source``
    (the address recvfrom() reports, i.e. the IPv6 header's source address)."""
    return (len(packet) >= UDP_HEADER_LEN
            and _v6(source) == _v6(server_ip6)
            and int.from_bytes(packet[0:2], "big") == server_port
            and int.from_bytes(packet[2:4], "big") == wg_port)
