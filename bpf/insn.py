"""Classic BPF instructions: the opcode fields, a frozen ``Insn``, readable builders,
and the kernel's ``struct sock_filter`` wire form.

An instruction is ``{u16 code; u8 jt; u8 jf; u32 k}`` in native byte order, 8 bytes
(linux/filter.h). ``code`` is the OR of a class and class-specific fields:

======  =====================================================================
class   fields
======  =====================================================================
LD      size (W/H/B) | mode (IMM/ABS/IND/MEM/LEN)          A <- ...
LDX     size | mode (IMM/MEM/LEN, or B|MSH)                X <- ...
ST/STX  none; ``k`` is the scratch slot M[k]               M[k] <- A / X
ALU     op (ADD SUB MUL DIV OR AND LSH RSH NEG MOD XOR) | src (K/X)
JMP     op (JA JEQ JGT JGE JSET) | src (K/X); ``jt``/``jf`` (or ``k`` for JA)
        are forward offsets counted from the next instruction
RET     rval (K/A; X exists in libpcap but Linux refuses it)
MISC    TAX (X <- A) or TXA (A <- X)
======  =====================================================================

A program is simply ``tuple[Insn, ...]`` (:data:`Program`); :func:`encode` and
:func:`decode` convert it to and from the array ``SO_ATTACH_FILTER`` takes.
Builders take signed or unsigned ``k`` (``ld_abs_w(SKF_NET_OFF + 8)`` works) and
store it as the kernel does, as an unsigned 32-bit value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import BpfEncodingError

__all__ = [
    "BPF_MAXINSNS",
    "BPF_MEMWORDS",
    "INSN_SIZE",
    "SKF_AD_OFF",
    "SKF_LL_OFF",
    "SKF_NET_OFF",
    "Alu",
    "Class",
    "Insn",
    "Jmp",
    "Misc",
    "Mode",
    "Program",
    "Rval",
    "Size",
    "Src",
    "add_k",
    "add_x",
    "and_k",
    "and_x",
    "decode",
    "div_k",
    "div_x",
    "encode",
    "from_tuples",
    "ja",
    "jeq",
    "jeq_x",
    "jge",
    "jge_x",
    "jgt",
    "jgt_x",
    "jset",
    "jset_x",
    "ld_abs_b",
    "ld_abs_h",
    "ld_abs_w",
    "ld_imm",
    "ld_ind_b",
    "ld_ind_h",
    "ld_ind_w",
    "ld_len",
    "ld_mem",
    "ldx_imm",
    "ldx_len",
    "ldx_mem",
    "ldx_msh",
    "lsh_k",
    "lsh_x",
    "mod_k",
    "mod_x",
    "mul_k",
    "mul_x",
    "neg",
    "or_k",
    "or_x",
    "ret_a",
    "ret_k",
    "rsh_k",
    "rsh_x",
    "st",
    "stx",
    "sub_k",
    "sub_x",
    "tax",
    "txa",
    "xor_k",
    "xor_x",
]

BPF_MAXINSNS = 4096
"""Most instructions a classic program may have (linux/bpf_common.h)."""
BPF_MEMWORDS = 16
"""Number of scratch memory slots M[0]..M[15]."""
INSN_SIZE = 8
"""sizeof(struct sock_filter)."""

SKF_AD_OFF = -0x1000
"""Loads at ``SKF_AD_OFF + n`` are ancillary data (protocol, ifindex, ...)."""
SKF_NET_OFF = -0x100000
"""Loads at ``SKF_NET_OFF + n`` read byte ``n`` of the network header, wherever the
socket's data starts (on an AF_INET6 raw socket: before it)."""
SKF_LL_OFF = -0x200000
"""Loads at ``SKF_LL_OFF + n`` read byte ``n`` of the link-layer header."""


class Class(IntEnum):
    LD = 0x00
    LDX = 0x01
    ST = 0x02
    STX = 0x03
    ALU = 0x04
    JMP = 0x05
    RET = 0x06
    MISC = 0x07


class Size(IntEnum):
    W = 0x00
    H = 0x08
    B = 0x10


class Mode(IntEnum):
    IMM = 0x00
    ABS = 0x20
    IND = 0x40
    MEM = 0x60
    LEN = 0x80
    MSH = 0xA0


class Alu(IntEnum):
    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0


class Jmp(IntEnum):
    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40


class Src(IntEnum):
    K = 0x00
    X = 0x08


class Rval(IntEnum):
    K = 0x00
    X = 0x08
    A = 0x10


class Misc(IntEnum):
    TAX = 0x00
    TXA = 0x80


_WIRE = struct.Struct("=HBBI")
assert _WIRE.size == INSN_SIZE


@dataclass(frozen=True, slots=True)
class Insn:
    """One ``struct sock_filter``: opcode, jump-if-true/false offsets, constant."""

    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    def __post_init__(self) -> None:
        for name, value, top in (("code", self.code, 0xFFFF), ("jt", self.jt, 0xFF),
                                 ("jf", self.jf, 0xFF), ("k", self.k, 0xFFFFFFFF)):
            if not isinstance(value, int) or not 0 <= value <= top:
                raise BpfEncodingError(f"{name}={value!r} is out of range 0..{top:#x}")

    @property
    def cls(self) -> int:
        return self.code & 0x07

    @property
    def size(self) -> int:
        return self.code & 0x18

    @property
    def mode(self) -> int:
        return self.code & 0xE0

    @property
    def op(self) -> int:
        return self.code & 0xF0

    @property
    def src(self) -> int:
        return self.code & 0x08

    @property
    def rval(self) -> int:
        return self.code & 0x18

    @property
    def k_signed(self) -> int:
        """``k`` read as a signed 32-bit value (how negative offsets are written)."""
        return self.k - (1 << 32) if self.k & 0x80000000 else self.k

    def to_bytes(self) -> bytes:
        return _WIRE.pack(self.code, self.jt, self.jf, self.k)

    @classmethod
    def from_bytes(cls, data: bytes) -> Insn:
        if len(data) != INSN_SIZE:
            raise BpfEncodingError(f"a sock_filter is {INSN_SIZE} bytes, got {len(data)}")
        return cls(*_WIRE.unpack(data))


Program = tuple[Insn, ...]
"""A classic BPF program: instructions in order, index 0 first."""


def encode(program: Iterable[Insn]) -> bytes:
    """The ``struct sock_filter[]`` array for SO_ATTACH_FILTER (native byte order)."""
    return b"".join(insn.to_bytes() for insn in program)


def decode(data: bytes) -> Program:
    """Split a ``struct sock_filter[]`` array into instructions."""
    if len(data) % INSN_SIZE:
        raise BpfEncodingError(
            f"{len(data)} bytes is not a whole number of {INSN_SIZE}-byte instructions")
    return tuple(Insn(*fields) for fields in _WIRE.iter_unpack(data))


def from_tuples(rows: Sequence[tuple[int, int, int, int]]) -> Program:
    """Instructions from ``(code, jt, jf, k)`` rows, as ``tcpdump -dd`` prints them."""
    return tuple(Insn(*row) for row in rows)


def _u32(k: int) -> int:
    if not -(1 << 31) <= k <= 0xFFFFFFFF:
        raise BpfEncodingError(f"k={k} does not fit in 32 bits")
    return k & 0xFFFFFFFF


# --- loads into A ------------------------------------------------------------------

def ld_abs_w(k: int) -> Insn:
    """A <- 32-bit big-endian word at packet offset k."""
    return Insn(Class.LD | Size.W | Mode.ABS, k=_u32(k))


def ld_abs_h(k: int) -> Insn:
    """A <- 16-bit big-endian half-word at packet offset k."""
    return Insn(Class.LD | Size.H | Mode.ABS, k=_u32(k))


def ld_abs_b(k: int) -> Insn:
    """A <- byte at packet offset k."""
    return Insn(Class.LD | Size.B | Mode.ABS, k=_u32(k))


def ld_ind_w(k: int) -> Insn:
    """A <- word at packet offset X + k."""
    return Insn(Class.LD | Size.W | Mode.IND, k=_u32(k))


def ld_ind_h(k: int) -> Insn:
    """A <- half-word at packet offset X + k."""
    return Insn(Class.LD | Size.H | Mode.IND, k=_u32(k))


def ld_ind_b(k: int) -> Insn:
    """A <- byte at packet offset X + k."""
    return Insn(Class.LD | Size.B | Mode.IND, k=_u32(k))


def ld_imm(k: int) -> Insn:
    """A <- k."""
    return Insn(Class.LD | Size.W | Mode.IMM, k=_u32(k))


def ld_len() -> Insn:
    """A <- packet length."""
    return Insn(Class.LD | Size.W | Mode.LEN)


def ld_mem(k: int) -> Insn:
    """A <- M[k]."""
    return Insn(Class.LD | Size.W | Mode.MEM, k=_u32(k))


# --- loads into X ------------------------------------------------------------------

def ldx_imm(k: int) -> Insn:
    """X <- k."""
    return Insn(Class.LDX | Size.W | Mode.IMM, k=_u32(k))


def ldx_len() -> Insn:
    """X <- packet length."""
    return Insn(Class.LDX | Size.W | Mode.LEN)


def ldx_mem(k: int) -> Insn:
    """X <- M[k]."""
    return Insn(Class.LDX | Size.W | Mode.MEM, k=_u32(k))


def ldx_msh(k: int) -> Insn:
    """X <- 4 * (byte at k & 0xf): the IPv4 header length when k points at it."""
    return Insn(Class.LDX | Size.B | Mode.MSH, k=_u32(k))


# --- stores ------------------------------------------------------------------------

def st(k: int) -> Insn:
    """M[k] <- A."""
    return Insn(Class.ST, k=_u32(k))


def stx(k: int) -> Insn:
    """M[k] <- X."""
    return Insn(Class.STX, k=_u32(k))


# --- arithmetic on A ---------------------------------------------------------------

def _alu_k(op: Alu, k: int) -> Insn:
    return Insn(Class.ALU | op | Src.K, k=_u32(k))


def _alu_x(op: Alu) -> Insn:
    return Insn(Class.ALU | op | Src.X)


def add_k(k: int) -> Insn:
    return _alu_k(Alu.ADD, k)


def sub_k(k: int) -> Insn:
    return _alu_k(Alu.SUB, k)


def mul_k(k: int) -> Insn:
    return _alu_k(Alu.MUL, k)


def div_k(k: int) -> Insn:
    return _alu_k(Alu.DIV, k)


def mod_k(k: int) -> Insn:
    return _alu_k(Alu.MOD, k)


def and_k(k: int) -> Insn:
    return _alu_k(Alu.AND, k)


def or_k(k: int) -> Insn:
    return _alu_k(Alu.OR, k)


def xor_k(k: int) -> Insn:
    return _alu_k(Alu.XOR, k)


def lsh_k(k: int) -> Insn:
    return _alu_k(Alu.LSH, k)


def rsh_k(k: int) -> Insn:
    return _alu_k(Alu.RSH, k)


def add_x() -> Insn:
    return _alu_x(Alu.ADD)


def sub_x() -> Insn:
    return _alu_x(Alu.SUB)


def mul_x() -> Insn:
    return _alu_x(Alu.MUL)


def div_x() -> Insn:
    return _alu_x(Alu.DIV)


def mod_x() -> Insn:
    return _alu_x(Alu.MOD)


def and_x() -> Insn:
    return _alu_x(Alu.AND)


def or_x() -> Insn:
    return _alu_x(Alu.OR)


def xor_x() -> Insn:
    return _alu_x(Alu.XOR)


def lsh_x() -> Insn:
    return _alu_x(Alu.LSH)


def rsh_x() -> Insn:
    return _alu_x(Alu.RSH)


def neg() -> Insn:
    """A <- -A (mod 2**32)."""
    return Insn(Class.ALU | Alu.NEG)


# --- jumps (offsets count from the next instruction) -------------------------------

def ja(k: int) -> Insn:
    """Skip k instructions unconditionally."""
    return Insn(Class.JMP | Jmp.JA, k=_u32(k))


def jeq(k: int, jt: int, jf: int) -> Insn:
    """If A == k skip jt, else skip jf."""
    return Insn(Class.JMP | Jmp.JEQ | Src.K, jt, jf, _u32(k))


def jgt(k: int, jt: int, jf: int) -> Insn:
    """If A > k (unsigned) skip jt, else skip jf."""
    return Insn(Class.JMP | Jmp.JGT | Src.K, jt, jf, _u32(k))


def jge(k: int, jt: int, jf: int) -> Insn:
    """If A >= k (unsigned) skip jt, else skip jf."""
    return Insn(Class.JMP | Jmp.JGE | Src.K, jt, jf, _u32(k))


def jset(k: int, jt: int, jf: int) -> Insn:
    """If A & k != 0 skip jt, else skip jf."""
    return Insn(Class.JMP | Jmp.JSET | Src.K, jt, jf, _u32(k))


def jeq_x(jt: int, jf: int) -> Insn:
    return Insn(Class.JMP | Jmp.JEQ | Src.X, jt, jf)


def jgt_x(jt: int, jf: int) -> Insn:
    return Insn(Class.JMP | Jmp.JGT | Src.X, jt, jf)


def jge_x(jt: int, jf: int) -> Insn:
    return Insn(Class.JMP | Jmp.JGE | Src.X, jt, jf)


def jset_x(jt: int, jf: int) -> Insn:
    return Insn(Class.JMP | Jmp.JSET | Src.X, jt, jf)


# --- returns and register moves ----------------------------------------------------

def ret_k(k: int) -> Insn:
    """Accept min(k, packet length) bytes; 0 drops the packet."""
    return Insn(Class.RET | Rval.K, k=_u32(k))


def ret_a() -> Insn:
    """Accept min(A, packet length) bytes; 0 drops the packet."""
    return Insn(Class.RET | Rval.A)


def tax() -> Insn:
    """X <- A."""
    return Insn(Class.MISC | Misc.TAX)


def txa() -> Insn:
    """A <- X."""
    return Insn(Class.MISC | Misc.TXA)
