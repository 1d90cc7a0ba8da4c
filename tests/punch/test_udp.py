import random
import socket
import struct

import pytest

from punch.udp import (
    Datagram, UdpError, build_udp, build_udp6, checksum, parse_ipv4_udp, parse_udp, udp_header,
)


def ipv4(src: str, dst: str, l4: bytes, proto: int = 17, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(l4), 1, 0, 64,
                       proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) + options + l4


def test_checksum_rfc1071_example():
    # RFC 1071 section 3 example: 0001 f203 f4f5 f6f7 sums to ddf2, checksum 220d
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_build_udp_vector_matches_scapy():
    scapy = pytest.importorskip("scapy.layers.inet")
    payload = bytes(range(64))
    ours = build_udp("192.168.1.2", "198.51.100.10", 51820, 49918, payload)
    pkt = scapy.IP(src="192.168.1.2", dst="198.51.100.10") / scapy.UDP(sport=51820, dport=49918) / payload
    assert ours == bytes(pkt[scapy.UDP])


def test_checksum_verifies_to_zero_over_pseudo_header():
    rng = random.Random(3)
    for _ in range(200):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        src, dst = "10.%d.0.1" % rng.randrange(256), "172.16.%d.9" % rng.randrange(256)
        seg = build_udp(src, dst, rng.randrange(1, 65536), rng.randrange(1, 65536), payload)
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!xBH", 17, len(seg))
        assert checksum(pseudo + seg) == 0
        assert struct.unpack("!H", seg[4:6])[0] == 8 + len(payload)


def test_parse_reply_with_and_without_ip_options():
    seg = build_udp("198.51.100.10", "192.168.1.2", 49918, 51820, b"\x01\x02\x03\x04\x05\x06")
    want = Datagram("198.51.100.10", 49918, "192.168.1.2", 51820, b"\x01\x02\x03\x04\x05\x06")
    assert parse_ipv4_udp(ipv4("198.51.100.10", "192.168.1.2", seg)) == want
    assert parse_ipv4_udp(ipv4("198.51.100.10", "192.168.1.2", seg, options=b"\x01" * 8)) == want


@pytest.mark.parametrize("packet,msg", [
    (b"", "not an IPv4 packet"),
    (b"\x60" + bytes(40), "not an IPv4 packet"),
    (ipv4("1.1.1.1", "2.2.2.2", b"\0" * 8, proto=6), "IP protocol 6 is not UDP"),
    (ipv4("1.1.1.1", "2.2.2.2", b"\0" * 4), "truncated packet"),
    (ipv4("1.1.1.1", "2.2.2.2", struct.pack("!HHHH", 1, 2, 3, 0)), "UDP length 3"),
])
def test_parse_rejects_garbage(packet, msg):
    with pytest.raises(UdpError, match=msg):
        parse_ipv4_udp(packet)


def test_parse_never_raises_anything_else_on_random_input():
    rng = random.Random(9)
    base = ipv4("1.1.1.1", "2.2.2.2", build_udp("1.1.1.1", "2.2.2.2", 1, 2, b"abcdef"))
    for _ in range(5000):
        pkt = bytearray(base[: rng.randrange(len(base) + 1)])
        for _ in range(rng.randrange(4)):
            if pkt:
                pkt[rng.randrange(len(pkt))] = rng.randrange(256)
        try:
            parse_ipv4_udp(bytes(pkt))
        except UdpError:
            pass


def test_oversized_payload_is_refused():
    with pytest.raises(UdpError, match="does not fit"):
        build_udp("1.1.1.1", "2.2.2.2", 1, 2, bytes(65530))


def test_parse_rejects_a_reply_cut_short():
    """The filter keeps a bounded number of bytes; a longer datagram arrives cut short
    and must not be taken for a shorter, valid reply."""
    seg = build_udp("198.51.100.10", "192.168.1.2", 49918, 51820, bytes(300))
    with pytest.raises(UdpError, match="UDP length 308 exceeds the 264 bytes received"):
        parse_ipv4_udp(ipv4("198.51.100.10", "192.168.1.2", seg)[:20 + 8 + 256])


def test_build_udp6_vector_matches_scapy():
    inet6 = pytest.importorskip("scapy.layers.inet6")
    udp = pytest.importorskip("scapy.layers.inet").UDP
    payload = bytes(range(116))
    ours = build_udp6("2001:db8::2", "2001:db8:1::a", 51820, 49918, payload)
    pkt = inet6.IPv6(src="2001:db8::2", dst="2001:db8:1::a") / udp(sport=51820, dport=49918) / payload
    assert ours == bytes(inet6.IPv6(bytes(pkt))[udp])


def test_build_udp6_checksum_verifies_to_zero_and_is_never_zero():
    rng = random.Random(6)
    for _ in range(200):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        src, dst = f"fd00::{rng.randrange(1, 65536):x}", f"2001:db8::{rng.randrange(1, 65536):x}"
        seg = build_udp6(src, dst, rng.randrange(1, 65536), rng.randrange(1, 65536), payload)
        pseudo = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                  + struct.pack("!I3xB", len(seg), 17))
        assert checksum(pseudo + seg) == 0 and seg[6:8] != b"\0\0"


def test_udp_header_leaves_the_checksum_to_the_kernel():
    assert udp_header(51820, 49918, b"abc") == struct.pack("!HHHH", 51820, 49918, 11, 0) + b"abc"


def test_parse_udp_segment():
    seg = build_udp6("2001:db8::1", "2001:db8::2", 49918, 51820, b"reply")
    assert parse_udp(seg, "2001:db8::1") == Datagram("2001:db8::1", 49918, "", 51820, b"reply")
    assert parse_udp(seg + b"pad", "2001:db8::1").payload == b"reply"


@pytest.mark.parametrize("segment,msg", [
    (b"\0" * 7, "truncated UDP header"),
    (struct.pack("!HHHH", 1, 2, 7, 0), "UDP length 7 is shorter"),
    (struct.pack("!HHHH", 1, 2, 300, 0) + bytes(256), "UDP length 300 exceeds the 264 bytes"),
])
def test_parse_udp_rejects_garbage(segment, msg):
    with pytest.raises(UdpError, match=msg):
        parse_udp(segment, "::1")
