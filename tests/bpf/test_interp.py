"""Interpreter unit cases, and agreement with the kernel on random programs."""

from __future__ import annotations

import random
import secrets
import socket
from collections.abc import Iterator

import pytest

from bpf import BpfUnsupportedError, BpfValidationError, Insn, is_valid, run
from bpf import insn as I
from bpf.validate import ALLOWED_CODES

PKT = bytes(range(1, 41))  # 40 bytes: 0x01 0x02 ... 0x28


def ret_a_after(*insns: Insn) -> tuple[Insn, ...]:
    return (*insns, I.ret_a())


@pytest.mark.parametrize("program,packet,expected", [
    # loads and bounds
    (ret_a_after(I.ld_abs_b(0)), PKT, 1),
    (ret_a_after(I.ld_abs_h(0)), PKT + bytes(300), 0x0102),
    (ret_a_after(I.ld_abs_w(36), I.and_k(0xFF)), PKT, 40),             # last word fits
    (ret_a_after(I.ld_abs_w(37)), PKT, 0),                             # one byte short
    (ret_a_after(I.ld_abs_h(39)), PKT, 0),
    (ret_a_after(I.ld_abs_b(40)), PKT, 0),
    (ret_a_after(I.ld_abs_b(0)), b"", 0),
    (ret_a_after(I.ldx_imm(4), I.ld_ind_b(3)), PKT, 8),
    (ret_a_after(I.ldx_imm(38), I.ld_ind_h(1)), PKT, 0),
    (ret_a_after(I.ldx_imm(0xFFFFFFFF), I.ld_ind_b(1)), PKT, 1),       # X + k wraps to 0
    (ret_a_after(I.ldx_msh(0)), b"\x4f", 0),                           # X only; A stays 0
    (ret_a_after(I.ldx_msh(0), I.txa()), b"\x4f", 1),                 # capped at length
    (ret_a_after(I.ldx_msh(0), I.txa()), b"\x4f" + bytes(60), 60),
    (ret_a_after(I.ldx_msh(0), I.txa()), b"\x45" + bytes(30), 20),
    (ret_a_after(I.ldx_msh(5), I.txa()), PKT, 24),                     # 0x06 & 0xf = 6
    (ret_a_after(I.ldx_msh(40), I.txa()), PKT, 0),
    (ret_a_after(I.ldx_imm(0xFFFFF000), I.ld_ind_b(0)), PKT, 0),       # IND never ancillary
    (ret_a_after(I.ld_len()), PKT, 40),
    (ret_a_after(I.ldx_len(), I.txa()), PKT[:7], 7),
    (ret_a_after(I.ld_imm(0xFFFFFFFF)), PKT, 40),                      # capped at length
    # returns
    ((I.ret_k(1000),), PKT, 40),
    ((I.ret_k(3),), PKT, 3),
    ((I.ret_k(0),), PKT, 0),
    ((I.ret_a(),), PKT, 0),                                            # A starts at 0
    # arithmetic (32-bit, wrapping)
    (ret_a_after(I.ld_imm(0xFFFFFFFF), I.add_k(3)), PKT, 2),
    (ret_a_after(I.ld_imm(1), I.sub_k(2), I.rsh_k(28)), PKT, 15),
    (ret_a_after(I.ld_imm(0x10000), I.mul_k(0x10001), I.and_k(0x3F)), PKT, 0),
    (ret_a_after(I.ld_imm(0x80000001), I.mul_k(2)), PKT, 2),
    (ret_a_after(I.ld_imm(39), I.div_k(2)), PKT, 19),
    (ret_a_after(I.ld_imm(39), I.mod_k(7)), PKT, 4),
    (ret_a_after(I.ld_imm(0xF0), I.or_k(0x0F), I.xor_k(0xF0), I.and_k(0x1C)), PKT, 0x0C),
    (ret_a_after(I.ld_imm(5), I.neg(), I.add_k(9)), PKT, 4),
    (ret_a_after(I.ld_imm(1), I.lsh_k(31), I.rsh_k(26)), PKT, 32),
    (ret_a_after(I.ldx_imm(33), I.ld_imm(3), I.lsh_x()), PKT, 6),      # shift by X & 31
    (ret_a_after(I.ldx_imm(34), I.ld_imm(32), I.rsh_x()), PKT, 8),
    (ret_a_after(I.ldx_imm(0), I.ld_imm(7), I.div_x()), PKT, 0),       # X = 0: drop
    (ret_a_after(I.ldx_imm(0), I.ld_imm(7), I.mod_x()), PKT, 0),
    (ret_a_after(I.ldx_imm(3), I.ld_imm(7), I.mod_x()), PKT, 1),
    (ret_a_after(I.ldx_imm(5), I.ld_imm(2), I.sub_x(), I.add_x(), I.add_x()), PKT, 7),
    # scratch memory and moves
    (ret_a_after(I.ld_imm(9), I.st(15), I.ld_imm(1), I.ldx_mem(15), I.txa()), PKT, 9),
    (ret_a_after(I.ldx_imm(11), I.stx(0), I.ld_mem(0)), PKT, 11),
    (ret_a_after(I.ld_imm(12), I.tax(), I.ld_imm(0), I.txa()), PKT, 12),
    # jumps: unsigned comparisons, jset, ja
    ((I.ld_imm(0xFFFFFFFF), I.jgt(1, 0, 1), I.ret_k(1), I.ret_k(2)), PKT, 1),
    ((I.ld_imm(5), I.jge(5, 0, 1), I.ret_k(1), I.ret_k(2)), PKT, 1),
    ((I.ld_imm(5), I.jgt(5, 0, 1), I.ret_k(1), I.ret_k(2)), PKT, 2),
    ((I.ld_imm(6), I.jset(1, 0, 1), I.ret_k(1), I.ret_k(2)), PKT, 2),
    ((I.ld_imm(6), I.ldx_imm(6), I.jeq_x(1, 0), I.ret_k(1), I.ret_k(2)), PKT, 2),
    ((I.ld_imm(6), I.ldx_imm(7), I.jgt_x(1, 0), I.ret_k(1), I.ret_k(2)), PKT, 1),
    ((I.ja(1), I.ret_k(1), I.ret_k(2)), PKT, 2),
])
def test_run(program: tuple[Insn, ...], packet: bytes, expected: int) -> None:
    assert run(program, packet) == expected


def test_net_offset_reads_the_prefix_then_the_data() -> None:
    prefix = bytes(range(100, 140))  # 40 bytes, like an IPv6 header
    big = PKT * 4                   # so that returned values are not capped

    def at(k: int, net_prefix: bytes = b"") -> int:
        return run(ret_a_after(I.ld_abs_b(k)), big, net_prefix=net_prefix)

    assert at(I.SKF_NET_OFF + 8, net_prefix=prefix) == 108
    assert at(I.SKF_NET_OFF + 39, net_prefix=prefix) == 139
    assert at(I.SKF_NET_OFF + 40, net_prefix=prefix) == 1       # the data's first byte
    assert at(I.SKF_NET_OFF + 3) == 4                            # AF_INET raw: no prefix
    # Up to the tail and no further.
    end = len(prefix) + len(big)
    assert run((I.ld_abs_w(I.SKF_NET_OFF + end - 4), I.ret_k(9)), big, net_prefix=prefix) == 9
    assert run((I.ld_abs_w(I.SKF_NET_OFF + end - 3), I.ret_k(9)), big, net_prefix=prefix) == 0
    # Indirect loads reach it too when X + k lands there.
    prog = ret_a_after(I.ldx_imm(I.SKF_NET_OFF & 0xFFFFFFFF), I.ld_ind_b(2))
    assert run(prog, big, net_prefix=prefix) == 102


def test_link_layer_offset_reads_the_given_header() -> None:
    eth = bytes(range(200, 214))
    prog = ret_a_after(I.ld_abs_b(I.SKF_LL_OFF + 13))
    assert run(prog, PKT * 8, ll_header=eth) == 213
    prog = ret_a_after(I.ld_abs_b(I.SKF_LL_OFF + 14))
    assert run(prog, PKT * 8, ll_header=eth) == 1
    with pytest.raises(BpfUnsupportedError, match="no ll_header given"):
        run(prog, PKT)


def test_other_negative_offsets_drop() -> None:
    # between SKF_NET_OFF's reach and 0 (IND, so not ancillary): past the tail
    assert run((I.ldx_imm(0xFFFFE000), I.ld_ind_b(0), I.ret_k(1)), PKT) == 0
    # below SKF_LL_OFF: nothing there
    assert run((I.ld_abs_b(-0x300000), I.ret_k(1)), PKT) == 0


def test_ancillary_loads_are_not_modelled() -> None:
    with pytest.raises(BpfUnsupportedError, match="ancillary load at SKF_AD_OFF\\+0"):
        run(ret_a_after(I.ld_abs_h(I.SKF_AD_OFF)), PKT)


def test_invalid_program_is_refused_unless_unchecked() -> None:
    prog = (I.ld_imm(1), I.div_k(0), I.ret_a())
    with pytest.raises(BpfValidationError, match="instruction 1"):
        run(prog, PKT)
    prog2 = (I.ld_imm(1),)  # falls off the end: refused
    with pytest.raises(BpfValidationError):
        run(prog2, PKT)


# --- random valid programs on a real raw socket -----------------------------------------

def _random_valid_program(rng: random.Random) -> tuple[Insn, ...]:
    codes = sorted(ALLOWED_CODES)
    while True:
        n = rng.randint(2, 14)
        body = []
        for _ in range(n):
            k = rng.choice([rng.randrange(0, 48), rng.randrange(0, 16), rng.randrange(0, 32),
                            rng.getrandbits(32), (I.SKF_NET_OFF + rng.randrange(0, 48))
                            & 0xFFFFFFFF, rng.choice([1, 2, 4, 0x1FFF, 0xF0, 0xFFFF])])
            body.append(Insn(rng.choice(codes), rng.randrange(0, n), rng.randrange(0, n), k))
        body[-1] = rng.choice([I.ret_k(rng.choice([0, 1, 20, 33, 0xFFFF])), I.ret_a()])
        prog = tuple(body)
        if is_valid(prog) and not any(
                i.cls == 0 and i.mode == 0x20 and i.k >= (I.SKF_AD_OFF & 0xFFFFFFFF)
                for i in prog):
            return prog


@pytest.fixture(scope="module")
def lab() -> Iterator[object]:
    from tests.bpf import packets as P
    from tests.bpf.rawlab import RawLab

    lab = RawLab((P.SERVER4, P.CLIENT4), (P.SERVER6, P.CLIENT6))
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.root
@pytest.mark.fuzz
def test_random_programs_agree_with_kernel(lab: object) -> None:
    """Each random program is guarded by a prologue that accepts the sentinel (IP id
    0x5E5E), so every socket can be read up to it."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    from tests.bpf import packets as P
    from tests.bpf.rawlab import RawLab, until

    assert isinstance(lab, RawLab)
    rng = random.Random(77)
    compared = accepted = 0
    for _batch in range(12):
        bodies = [_random_valid_program(rng) for _ in range(25)]
        programs = [(I.ld_abs_h(4), I.jeq(0x5E5E, len(b), 0), *b, I.ret_k(0xFFFF))
                    for b in bodies]
        packets = [bytes(IP(src=P.SERVER4, dst=P.CLIENT4, id=rng.getrandbits(15),
                            tos=rng.getrandbits(8), ttl=rng.randint(1, 255))
                         / UDP(sport=rng.getrandbits(16), dport=rng.getrandbits(16))
                         / Raw(secrets.token_bytes(rng.randint(0, 40))))
                   for _ in range(15)]
        sentinel = bytes(IP(src=P.SERVER4, dst=P.CLIENT4, id=0x5E5E) / UDP() / Raw(b"end"))
        with lab.sockets(socket.AF_INET, None, *programs) as socks:
            with lab.pinned():
                for pkt in packets:
                    lab.send(pkt)
                lab.send(sentinel)

            def is_sentinel(d: bytes) -> bool:
                return d[4:6] == b"\x5e\x5e"

            seen = [d for d, _ in until(socks[0], is_sentinel)]
            assert seen == packets
            eth = lab.cli_mac + lab.srv_mac + b"\x08\x00"
            for prog, sock in zip(programs, socks[1:], strict=True):
                want = [p[:n] for p in seen if (n := run(prog, p, ll_header=eth))]
                got = [d for d, _ in until(sock, is_sentinel)]
                assert got == want, prog
                compared += len(seen)
                accepted += len(want)
    assert 0 < accepted < compared
