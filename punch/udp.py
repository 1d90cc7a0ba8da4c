"""UDP for the raw sockets: build our own UDP header, parse received packets.

IPv4: the raw socket (AF_INET, SOCK_RAW, IPPROTO_UDP, no IP_HDRINCL) lets the kernel
write the IPv4 header, but the UDP header is ours, and the kernel does not fill in its
checksum. We compute it over the pseudo-header, so the source address must be the one
the kernel will put in the IPv4 header (a routing lookup finds it).

IPv6: the checksum is mandatory (RFC 8200 8.1; Linux drops a zero one, and a wrong one,
silently: tests/punch/test_rawsock6.py measures both). Two ways work, and that test
proves each with real packets: :func:`build_udp6` computes it over the IPv6
pseudo-header, or the socket option IPV6_CHECKSUM (offset 6) makes the kernel write it
over whatever the field holds, with the source address it picks itself. The client
uses the option (:func:`udp_header`), so it needs no source-address lookup for IPv6.

Pure; no I/O.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["UdpError", "Datagram", "build_udp", "build_udp6", "checksum", "parse_ipv4_udp",
           "parse_udp", "udp_header"]

_UDP = struct.Struct("!HHHH")


class UdpError(ValueError):
    """A received packet that is not a well-formed IPv4/UDP datagram."""


@dataclass(frozen=True, slots=True)
class Datagram:
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    payload: bytes


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of DATA."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_udp(src_ip: str, dst_ip: str, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """UDP header + PAYLOAD, with the exact length and a correct checksum."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise UdpError(f"payload of {len(payload)} bytes does not fit in a UDP datagram")
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!xBH", 17, length)
    csum = checksum(pseudo + _UDP.pack(src_port, dst_port, length, 0) + payload)
    return _UDP.pack(src_port, dst_port, length, csum or 0xFFFF) + payload


def udp_header(src_port: int, dst_port: int, payload: bytes) -> bytes:
    """UDP header + PAYLOAD with a zero checksum, for a socket whose kernel fills it in
    (IPv6 with IPV6_CHECKSUM); the length is exact."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise UdpError(f"payload of {len(payload)} bytes does not fit in a UDP datagram")
    return _UDP.pack(src_port, dst_port, length, 0) + payload


def build_udp6(src_ip: str, dst_ip: str, src_port: int, dst_port: int, payload: bytes) -> bytes:
    """UDP header + PAYLOAD for IPv6, with the checksum over the IPv6 pseudo-header
    (RFC 8200 8.1: addresses, upper-layer length, next header 17)."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise UdpError(f"payload of {len(payload)} bytes does not fit in a UDP datagram")
    pseudo = (socket.inet_pton(socket.AF_INET6, src_ip) + socket.inet_pton(socket.AF_INET6, dst_ip)
              + struct.pack("!I3xB", length, 17))
    csum = checksum(pseudo + _UDP.pack(src_port, dst_port, length, 0) + payload)
    return _UDP.pack(src_port, dst_port, length, csum or 0xFFFF) + payload


def parse_udp(segment: bytes, src_ip: str, dst_ip: str = "") -> Datagram:
    """A UDP header and payload (what an AF_INET6 raw socket returns) into a Datagram;
    SRC_IP is the source recvfrom() reported."""
    if len(segment) < 8:
        raise UdpError(f"truncated UDP header ({len(segment)} bytes)")
    sport, dport, length, _ = _UDP.unpack_from(segment)
    if length < 8:
        raise UdpError(f"UDP length {length} is shorter than its header")
    if length > len(segment):
        raise UdpError(f"UDP length {length} exceeds the {len(segment)} bytes received")
    return Datagram(src_ip, sport, dst_ip, dport, bytes(segment[8:length]))


def parse_ipv4_udp(packet: bytes) -> Datagram:
    """Split a whole IPv4 packet (as a raw socket returns it) into addresses and payload."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise UdpError("not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8:
        raise UdpError(f"truncated packet ({len(packet)} bytes, header {ihl})")
    if packet[9] != 17:
        raise UdpError(f"IP protocol {packet[9]} is not UDP")
    sport, dport, length, _ = _UDP.unpack_from(packet, ihl)
    if length < 8:
        raise UdpError(f"UDP length {length} is shorter than its header")
    if ihl + length > len(packet):
        raise UdpError(f"UDP length {length} exceeds the {len(packet) - ihl} bytes received")
    return Datagram(socket.inet_ntoa(packet[12:16]), sport, socket.inet_ntoa(packet[16:20]),
                    dport, bytes(packet[ihl + 8:ihl + length]))
