"""A classic BPF interpreter with the semantics of a Linux socket filter.

:func:`run` returns how many bytes of ``packet`` the socket would keep: 0 means the
packet is dropped. The semantics follow what the kernel runs after converting the
program (net/core/filter.c), not libpcap's ``bpf_filter``; the two differ on shifts:

- A and X start at 0; arithmetic is on unsigned 32 bits and wraps.
- A load that does not fit in the packet ends the program with 0 (drop); so does
  ``div x``/``mod x`` with X = 0.
- ``lsh x``/``rsh x`` shift by ``X & 31`` (the kernel masks the amount; libpcap gives 0).
- An absolute or indirect offset is a signed 32-bit value. At ``SKF_NET_OFF + n``
  (-0x100000 + n) it reads byte n of the network header. Where the socket's data
  begins after that header (an AF_INET6 raw socket's data starts at the transport
  header), pass the bytes from the network header up to the data as ``net_prefix``;
  those are readable through ``SKF_NET_OFF`` only. At ``SKF_LL_OFF + n``
  (-0x200000 + n) it reads byte n of the link-layer header, given as ``ll_header``
  (without one: :class:`BpfUnsupportedError`). Reads run up to the packet's end,
  whichever base they start from; every other offset drops the packet.
- Ancillary loads (``ld [SKF_AD_OFF + n]``: protocol, ifindex, ...) are not
  modelled: :class:`BpfUnsupportedError`. Only absolute loads are ancillary; an
  indirect load or ``ldxb 4*([k]&0xf)`` that lands there simply drops, as in the
  kernel.
- The result is ``min(returned value, len(packet))``: a filter cannot grow a packet.

One difference is deliberate: in the kernel, reads relative to ``SKF_NET_OFF`` or
``SKF_LL_OFF`` reach only the linear part of the socket buffer, while plain offsets
also reach paged data. The interpreter treats every packet as linear. Headers are
always linear, so filters that read only headers that way (like ours) are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BpfUnsupportedError
from .insn import (
    BPF_MEMWORDS,
    SKF_AD_OFF,
    SKF_LL_OFF,
    SKF_NET_OFF,
    Alu,
    Class,
    Insn,
    Jmp,
    Misc,
    Mode,
    Rval,
    Size,
    Src,
)
from .validate import validate

__all__ = ["run"]

_M32 = 0xFFFFFFFF
_ANC_BASE = SKF_AD_OFF & _M32
_WIDTH = {Size.W: 4, Size.H: 2, Size.B: 1}


class _Drop(Exception):
    """A load fell outside the packet, or a division by zero: the program returns 0."""


def _s32(v: int) -> int:
    v &= _M32
    return v - (1 << 32) if v & 0x80000000 else v


def _load(packet: bytes, net_prefix: bytes, ll_header: bytes | None, offset: int,
          width: int) -> int:
    """Big-endian ``width`` bytes at signed ``offset``, with the kernel's rules."""
    if offset >= 0:
        buf, at = packet, offset
    elif offset >= SKF_NET_OFF:
        buf, at = net_prefix + packet, offset - SKF_NET_OFF
    elif offset >= SKF_LL_OFF:
        if ll_header is None:
            raise BpfUnsupportedError(
                f"link-layer load at SKF_LL_OFF+{offset - SKF_LL_OFF}: no ll_header given")
        buf, at = ll_header + net_prefix + packet, offset - SKF_LL_OFF
    else:
        raise _Drop
    if at + width > len(buf):
        raise _Drop
    return int.from_bytes(buf[at:at + width], "big")


def run(program: Sequence[Insn], packet: bytes, *, net_prefix: bytes = b"",
        ll_header: bytes | None = None, check: bool = True) -> int:
    """Run ``program`` on ``packet``; the number of bytes the socket keeps (0: drop).

    ``packet`` is what the filter sees at offset 0 (and what recv() would return);
    ``net_prefix`` the bytes from the network header up to it, ``ll_header`` the
    link-layer header in front of the network header (see module doc).
    The program is validated first unless ``check`` is false; an invalid program
    raises :class:`~bpf.errors.BpfValidationError`.
    """
    if check:
        validate(program)
    try:
        result = _execute(program, packet, net_prefix, ll_header)
    except _Drop:
        return 0
    return min(result, len(packet))


def _execute(program: Sequence[Insn], packet: bytes, net_prefix: bytes,
             ll_header: bytes | None) -> int:
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    pc = 0
    while True:
        insn = program[pc]
        pc += 1
        code, k = insn.code, insn.k
        cls = code & 0x07
        if cls == Class.LD:
            mode = code & 0xE0
            if mode == Mode.ABS:
                if k >= _ANC_BASE:
                    raise BpfUnsupportedError(f"ancillary load at SKF_AD_OFF+{k - _ANC_BASE}")
                a = _load(packet, net_prefix, ll_header, _s32(k), _WIDTH[Size(code & 0x18)])
            elif mode == Mode.IND:
                a = _load(packet, net_prefix, ll_header, _s32(x + k),
                          _WIDTH[Size(code & 0x18)])
            elif mode == Mode.LEN:
                a = len(packet)
            elif mode == Mode.IMM:
                a = k
            else:  # MEM
                a = mem[k]
        elif cls == Class.LDX:
            mode = code & 0xE0
            if mode == Mode.MSH:
                x = (_load(packet, net_prefix, ll_header, _s32(k), 1) & 0xF) << 2
            elif mode == Mode.LEN:
                x = len(packet)
            elif mode == Mode.IMM:
                x = k
            else:  # MEM
                x = mem[k]
        elif cls == Class.ST:
            mem[k] = a
        elif cls == Class.STX:
            mem[k] = x
        elif cls == Class.ALU:
            a = _alu(code, a, x if code & Src.X else k)
        elif cls == Class.JMP:
            op = code & 0xF0
            if op == Jmp.JA:
                pc += k
                continue
            b = x if code & Src.X else k
            if op == Jmp.JEQ:
                taken = a == b
            elif op == Jmp.JGT:
                taken = a > b
            elif op == Jmp.JGE:
                taken = a >= b
            else:  # JSET
                taken = bool(a & b)
            pc += insn.jt if taken else insn.jf
        elif cls == Class.RET:
            return a if code & 0x18 == Rval.A else k
        else:  # MISC
            if code & 0xF8 == Misc.TXA:
                a = x
            else:
                x = a


def _alu(code: int, a: int, b: int) -> int:
    op = code & 0xF0
    if op == Alu.ADD:
        return (a + b) & _M32
    if op == Alu.SUB:
        return (a - b) & _M32
    if op == Alu.MUL:
        return (a * b) & _M32
    if op == Alu.DIV:
        if b == 0:
            raise _Drop
        return a // b
    if op == Alu.MOD:
        if b == 0:
            raise _Drop
        return a % b
    if op == Alu.AND:
        return a & b
    if op == Alu.OR:
        return a | b
    if op == Alu.XOR:
        return a ^ b
    if op == Alu.LSH:
        return (a << (b & 31)) & _M32
    if op == Alu.RSH:
        return a >> (b & 31)
    return (-a) & _M32  # NEG
