"""The reply filters: pinned disassembly (tcpdump pads operand-less opcodes, so
some lines end in spaces), the crafted battery through the
interpreter, and looks_like_* agreeing with the interpreter on thousands of
random and mutated packets."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from bpf import (
    DEFAULT_MAX_PAYLOAD,
    BpfEncodingError,
    disassemble,
    format_c,
    ipv4_reply_filter,
    ipv6_reply_filter,
    looks_like_ipv4_reply,
    looks_like_ipv6_reply,
    run,
    validate,
)
from tests.bpf import packets as P

GOLDEN_IPV4 = "".join(line + "\n" for line in (
    "(000) ldb      [0]",
    "(001) and      #0xf0",
    "(002) jeq      #0x40            jt 3\tjf 22",
    "(003) ldb      [9]",
    "(004) jeq      #0x11            jt 5\tjf 22",
    "(005) ld       [12]",
    "(006) jeq      #0xc6336407      jt 7\tjf 22",
    "(007) ldh      [6]",
    "(008) jset     #0x1fff          jt 22\tjf 9",
    "(009) ldxb     4*([0]&0xf)",
    "(010) txa      ",
    "(011) jge      #0x14            jt 12\tjf 22",
    "(012) ldh      [x + 0]",
    "(013) jeq      #0xc2fe          jt 14\tjf 22",
    "(014) ldh      [x + 2]",
    "(015) jeq      #0xca6c          jt 16\tjf 22",
    "(016) ld       #pktlen",
    "(017) sub      x",
    "(018) jge      #0x8             jt 19\tjf 22",
    "(019) txa      ",
    "(020) add      #264",
    "(021) ret      ",
    "(022) ret      #0",
))

GOLDEN_IPV6 = "".join(line + "\n" for line in (
    "(000) ld       [-1048568]",
    "(001) jeq      #0x20010db8      jt 2\tjf 15",
    "(002) ld       [-1048564]",
    "(003) jeq      #0x0             jt 4\tjf 15",
    "(004) ld       [-1048560]",
    "(005) jeq      #0x0             jt 6\tjf 15",
    "(006) ld       [-1048556]",
    "(007) jeq      #0x7             jt 8\tjf 15",
    "(008) ldh      [0]",
    "(009) jeq      #0xc2fe          jt 10\tjf 15",
    "(010) ldh      [2]",
    "(011) jeq      #0xca6c          jt 12\tjf 15",
    "(012) ld       #pktlen",
    "(013) jge      #0x8             jt 14\tjf 15",
    "(014) ret      #264",
    "(015) ret      #0",
))

GOLDEN_IPV4_C_HEAD = """\
{ 0x30, 0, 0, 0x00000000 },
{ 0x54, 0, 0, 0x000000f0 },
{ 0x15, 0, 19, 0x00000040 },
"""


def test_default_max_payload() -> None:
    assert DEFAULT_MAX_PAYLOAD == 256


def test_golden_ipv4() -> None:
    prog = ipv4_reply_filter("198.51.100.7", 49918, 51820)
    validate(prog)
    assert disassemble(prog) == GOLDEN_IPV4
    assert format_c(prog).startswith(GOLDEN_IPV4_C_HEAD)


def test_golden_ipv6() -> None:
    prog = ipv6_reply_filter("2001:db8::7", 49918, 51820)
    validate(prog)
    assert disassemble(prog) == GOLDEN_IPV6


def test_max_payload_sets_the_kept_length() -> None:
    assert "(020) add      #8\n" in disassemble(ipv4_reply_filter("192.0.2.1", 1, 2, 0))
    assert "(014) ret      #1008\n" in disassemble(ipv6_reply_filter("::1", 1, 2, 1000))
    assert ipv4_reply_filter(ipaddress.IPv4Address("192.0.2.1"), 1, 2) \
        == ipv4_reply_filter("192.0.2.1", 1, 2)


@pytest.mark.parametrize("call,message", [
    (lambda: ipv4_reply_filter("2001:db8::1", 1, 2), "not an IPv4 address"),
    (lambda: ipv4_reply_filter("192.0.2.300", 1, 2), "not an IPv4 address"),
    (lambda: ipv6_reply_filter("192.0.2.1", 1, 2), "not an IPv6 address"),
    (lambda: ipv4_reply_filter("192.0.2.1", 0, 2), "server_port=0 is not a UDP port"),
    (lambda: ipv4_reply_filter("192.0.2.1", 1, 65536), "wg_port=65536 is not a UDP port"),
    (lambda: ipv6_reply_filter("::1", 1, 2, -1), "max_payload=-1 is out of range"),
    (lambda: ipv4_reply_filter("192.0.2.1", 1, 2, 70000), "max_payload=70000"),
])
def test_bad_arguments(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BpfEncodingError, match=message):
        call()


# --- the crafted battery (the kernel test checks the same cases on a real socket) -----

@pytest.mark.parametrize("max_payload", [DEFAULT_MAX_PAYLOAD, 0, 6])
@pytest.mark.parametrize("case", P.ipv4_cases(), ids=lambda c: c.name)
def test_ipv4_battery(case: P.Case, max_payload: int) -> None:
    prog = ipv4_reply_filter(P.SERVER4, P.SERVER_PORT, P.WG_PORT, max_payload)
    got = run(prog, case.model)
    assert bool(got) == case.accept
    assert looks_like_ipv4_reply(case.model, P.SERVER4, P.SERVER_PORT, P.WG_PORT) == case.accept
    if got:
        ihl = (case.model[0] & 0xF) * 4
        assert got == min(len(case.model), ihl + 8 + max_payload)
        # What the socket hands the client still looks like a reply.
        assert looks_like_ipv4_reply(case.model[:got], P.SERVER4, P.SERVER_PORT, P.WG_PORT)


@pytest.mark.parametrize("max_payload", [DEFAULT_MAX_PAYLOAD, 0])
@pytest.mark.parametrize("case", P.ipv6_cases(), ids=lambda c: c.name)
def test_ipv6_battery(case: P.Case, max_payload: int) -> None:
    prog = ipv6_reply_filter(P.SERVER6, P.SERVER_PORT, P.WG_PORT, max_payload)
    prefix, udp, _ = P.split_ipv6(case.model)
    source = str(ipaddress.IPv6Address(case.model[8:24]))
    got = run(prog, udp, net_prefix=prefix)
    assert bool(got) == case.accept
    assert looks_like_ipv6_reply(udp, source, P.SERVER6, P.SERVER_PORT, P.WG_PORT) \
        == case.accept
    if got:
        assert got == min(len(udp), 8 + max_payload)


def test_ipv6_source_may_carry_a_scope() -> None:
    udp = struct.pack("!HHHH", 1, 2, 8, 0)
    assert looks_like_ipv6_reply(udp, "fe80::1%eth0", "fe80::1", 1, 2)
    assert not looks_like_ipv6_reply(udp, "fe80::2%eth0", "fe80::1", 1, 2)


# --- random and mutated packets: looks_like_* == interpreter ----------------------------

def _mutate_ipv4(rng: random.Random, base: bytes) -> bytes:
    pkt = bytearray(base)
    for _ in range(rng.randint(1, 3)):
        roll = rng.randrange(10)
        if roll == 0 and pkt:
            del pkt[rng.randrange(len(pkt) + 1):]                       # truncate
        elif roll == 1:
            pkt[0:1] = bytes([rng.choice([0x45, 0x46, 0x4F, 0x44, 0x40, 0x55, 0x65,
                                          rng.getrandbits(8)])])
        elif roll == 2 and len(pkt) > 9:
            pkt[9] = rng.choice([17, 6, 1, rng.getrandbits(8)])
        elif roll == 3 and len(pkt) >= 16:
            pkt[12:16] = rng.choice([ipaddress.IPv4Address(P.OTHER4).packed,
                                     ipaddress.IPv4Address(P.SERVER4).packed,
                                     rng.randbytes(4)])
        elif roll == 4 and len(pkt) >= 8:
            pkt[6:8] = struct.pack("!H", rng.choice([0, 0x4000, 0x2000, 0x2001, 1, 0x1FFF,
                                                     rng.getrandbits(16)]))
        elif roll == 5:
            x = (pkt[0] & 0xF) * 4 if pkt else 20
            ports = [P.SERVER_PORT, P.WG_PORT, rng.getrandbits(16)]
            field = struct.pack("!HH", rng.choice(ports), rng.choice(ports))
            pkt[x:x + 4] = field
        elif roll == 6:
            where = rng.randrange(len(pkt) + 1)
            pkt[where:where] = rng.randbytes(rng.choice([1, 4, 8, 20]))   # insert (options)
        elif roll == 7 and pkt:
            pkt[rng.randrange(len(pkt))] = rng.getrandbits(8)
        elif roll == 8:
            pkt = bytearray(rng.randbytes(rng.randint(0, 80)))
        else:
            pkt += rng.randbytes(rng.randint(0, 300))
    return bytes(pkt)


@pytest.mark.fuzz
def test_looks_like_ipv4_agrees_on_mutations() -> None:
    rng = random.Random(4)
    prog = ipv4_reply_filter(P.SERVER4, P.SERVER_PORT, P.WG_PORT)
    bases = [c.model for c in P.ipv4_cases()]
    verdicts = {True: 0, False: 0}
    for i in range(6000):
        pkt = _mutate_ipv4(rng, rng.choice(bases))
        got = run(prog, pkt, check=i == 0)
        ours = looks_like_ipv4_reply(pkt, P.SERVER4, P.SERVER_PORT, P.WG_PORT)
        assert ours == bool(got), pkt.hex()
        verdicts[ours] += 1
    assert verdicts[True] > 500 and verdicts[False] > 500, verdicts


@pytest.mark.fuzz
def test_looks_like_ipv6_agrees_on_mutations() -> None:
    rng = random.Random(6)
    prog = ipv6_reply_filter(P.SERVER6, P.SERVER_PORT, P.WG_PORT)
    sources = [P.SERVER6, P.OTHER6, "fd00:99::1:1", "::ffff:10.99.0.1", "fd00:99::"]
    verdicts = {True: 0, False: 0}
    for _ in range(4000):
        sport = P.SERVER_PORT if rng.random() < 0.7 else rng.choice([P.WG_PORT, 1])
        dport = P.WG_PORT if rng.random() < 0.7 else rng.choice([P.SERVER_PORT, 1])
        udp = struct.pack("!HH", sport, dport) + rng.randbytes(rng.choice([0, 1, 3, 4, 10, 100]))
        udp = udp[:rng.choice([len(udp)] * 5 + [0, 2, 3, 4, 7])]
        source = P.SERVER6 if rng.random() < 0.6 else rng.choice(sources)
        prefix = bytearray(bytes(P.IPv6(src=source, dst=P.CLIENT6, nh=17)))
        if rng.random() < 0.3:                       # extension headers in between
            prefix += bytes([17, 0]) + bytes(6)
            prefix[6] = 60
        got = run(prog, udp, net_prefix=bytes(prefix), check=False)
        ours = looks_like_ipv6_reply(udp, source, P.SERVER6, P.SERVER_PORT, P.WG_PORT)
        assert ours == bool(got), (udp.hex(), source)
        verdicts[ours] += 1
    assert verdicts[True] > 300 and verdicts[False] > 300, verdicts
