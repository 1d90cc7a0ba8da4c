"""UDP over IPv4 for the raw socket: build our own UDP header, parse received packets.

The raw socket (AF_INET, SOCK_RAW, IPPROTO_UDP, no IP_HDRINCL) lets the kernel write the
IPv4 header, but the UDP header is ours, and the kernel does not fill in its checksum.
We compute it over the pseudo-header, so the source address must be the one the kernel
will put in the IPv4 header (the raw socket is bound to it). Pure; no I/O.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["UdpError", "Datagram", "build_udp", "parse_ipv4_udp", "checksum"]

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
