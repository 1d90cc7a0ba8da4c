"""Instruction model: builders give the kernel's opcodes; encode/decode round trips."""

from __future__ import annotations

import random
import struct
import sys

import pytest

from bpf import BpfEncodingError, Insn, decode, encode
from bpf import insn as I

# (builder call, code) pairs; the codes are those of linux/filter.h and tcpdump -dd.
OPCODES = [
    (I.ld_abs_w(12), 0x20), (I.ld_abs_h(12), 0x28), (I.ld_abs_b(23), 0x30),
    (I.ld_ind_w(0), 0x40), (I.ld_ind_h(14), 0x48), (I.ld_ind_b(14), 0x50),
    (I.ld_imm(7), 0x00), (I.ld_len(), 0x80), (I.ld_mem(1), 0x60),
    (I.ldx_imm(7), 0x01), (I.ldx_len(), 0x81), (I.ldx_mem(1), 0x61), (I.ldx_msh(14), 0xB1),
    (I.st(1), 0x02), (I.stx(1), 0x03),
    (I.add_k(1), 0x04), (I.sub_k(1), 0x14), (I.mul_k(1), 0x24), (I.div_k(1), 0x34),
    (I.or_k(1), 0x44), (I.and_k(1), 0x54), (I.lsh_k(1), 0x64), (I.rsh_k(1), 0x74),
    (I.neg(), 0x84), (I.mod_k(1), 0x94), (I.xor_k(1), 0xA4),
    (I.add_x(), 0x0C), (I.sub_x(), 0x1C), (I.mul_x(), 0x2C), (I.div_x(), 0x3C),
    (I.or_x(), 0x4C), (I.and_x(), 0x5C), (I.lsh_x(), 0x6C), (I.rsh_x(), 0x7C),
    (I.mod_x(), 0x9C), (I.xor_x(), 0xAC),
    (I.ja(1), 0x05), (I.jeq(1, 0, 0), 0x15), (I.jgt(1, 0, 0), 0x25), (I.jge(1, 0, 0), 0x35),
    (I.jset(1, 0, 0), 0x45), (I.jeq_x(0, 0), 0x1D), (I.jgt_x(0, 0), 0x2D),
    (I.jge_x(0, 0), 0x3D), (I.jset_x(0, 0), 0x4D),
    (I.ret_k(1), 0x06), (I.ret_a(), 0x16), (I.tax(), 0x07), (I.txa(), 0x87),
]


@pytest.mark.parametrize("insn,code", OPCODES, ids=[f"{c:#04x}" for _, c in OPCODES])
def test_builder_opcode(insn: Insn, code: int) -> None:
    assert insn.code == code


def test_negative_offsets_are_stored_as_u32() -> None:
    insn = I.ld_abs_w(I.SKF_NET_OFF + 8)
    assert insn.k == 0xFFF00008
    assert insn.k_signed == -0x100000 + 8


def test_wire_form_is_native_sock_filter() -> None:
    insn = I.jeq(0x800, 2, 5)
    assert insn.to_bytes() == struct.pack("=HBBI", 0x15, 2, 5, 0x800)
    little = sys.byteorder == "little"
    assert insn.to_bytes() == (bytes.fromhex("15000205" "00080000") if little
                               else bytes.fromhex("00150205" "00000800"))


@pytest.mark.parametrize("fields", [(0x10000, 0, 0, 0), (0, 256, 0, 0), (0, 0, -1, 0),
                                    (0, 0, 0, 1 << 32), (0, 0, 0, -1)])
def test_fields_out_of_range(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(BpfEncodingError, match="out of range"):
        Insn(*fields)


def test_builder_k_out_of_range() -> None:
    with pytest.raises(BpfEncodingError, match="32 bits"):
        I.ld_imm(1 << 32)
    with pytest.raises(BpfEncodingError, match="32 bits"):
        I.ld_abs_b(-(1 << 31) - 1)


def test_decode_rejects_partial_instruction() -> None:
    with pytest.raises(BpfEncodingError, match="13 bytes is not a whole number"):
        decode(bytes(13))
    with pytest.raises(BpfEncodingError, match="8 bytes, got 7"):
        Insn.from_bytes(bytes(7))


def test_round_trip_random() -> None:
    rng = random.Random(1)
    for _ in range(200):
        prog = tuple(Insn(rng.getrandbits(16), rng.getrandbits(8), rng.getrandbits(8),
                          rng.getrandbits(32)) for _ in range(rng.randint(0, 20)))
        raw = encode(prog)
        assert len(raw) == 8 * len(prog)
        assert decode(raw) == prog
        assert encode(decode(raw)) == raw


def test_from_tuples_matches_tcpdump_dd_rows() -> None:
    rows = [(0x28, 0, 0, 0x0000000C), (0x15, 0, 1, 0x00000800), (0x6, 0, 0, 0x00040000),
            (0x6, 0, 0, 0)]
    assert I.from_tuples(rows) == (I.ld_abs_h(12), I.jeq(0x800, 0, 1), I.ret_k(0x40000),
                                   I.ret_k(0))
