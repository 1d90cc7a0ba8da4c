"""The kernel's classic BPF checker, in Python: :func:`validate` rejects exactly the
programs ``SO_ATTACH_FILTER`` would refuse with EINVAL (net/core/filter.c,
``bpf_check_classic`` and ``check_load_and_stores``), and says which instruction.

The kernel refuses a program when

- it is empty or longer than 4096 instructions;
- an opcode is not one of the 49 Linux implements (``ret x`` and ``ldxb [k]`` exist
  in libpcap's vocabulary but not in the kernel's);
- ``div #0`` or ``mod #0`` (a constant divisor of zero), or ``lsh``/``rsh`` by a
  constant of 32 or more;
- a scratch slot index is 16 or more (``ld M[k]``, ``ldx M[k]``, ``st``, ``stx``);
- a jump lands at or past the end (jumps only go forward, so a program cannot loop);
- an absolute load uses an ancillary offset (``SKF_AD_OFF + n``) the kernel does
  not know;
- the last instruction is not ``ret #k`` or ``ret a`` (otherwise control could fall
  off the end);
- a scratch slot is read before it is written on some path. The kernel's data flow
  is conservative: a ``ret`` does not end the path that falls through it, so a
  program the kernel refuses for this reason may be refused here too even if the
  read is in fact unreachable. We mirror it rather than be smarter.

What the kernel checks later and this module cannot: the program's size against the
socket's ``net.core.optmem_max`` budget (ENOMEM), and a locked filter (EPERM).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BpfValidationError
from .insn import (
    BPF_MAXINSNS,
    BPF_MEMWORDS,
    SKF_AD_OFF,
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

__all__ = ["ALLOWED_CODES", "ANCILLARY_OFFSETS", "is_valid", "validate"]


def _codes() -> frozenset[int]:
    codes = {Class.ALU | Alu.NEG}
    for op in (Alu.ADD, Alu.SUB, Alu.MUL, Alu.DIV, Alu.MOD, Alu.AND, Alu.OR, Alu.XOR,
               Alu.LSH, Alu.RSH):
        codes |= {Class.ALU | op | Src.K, Class.ALU | op | Src.X}
    for size in (Size.W, Size.H, Size.B):
        codes |= {Class.LD | size | Mode.ABS, Class.LD | size | Mode.IND}
    codes |= {Class.LD | Size.W | Mode.LEN, Class.LD | Size.W | Mode.IMM,
              Class.LD | Size.W | Mode.MEM, Class.LDX | Size.W | Mode.LEN,
              Class.LDX | Size.B | Mode.MSH, Class.LDX | Size.W | Mode.IMM,
              Class.LDX | Size.W | Mode.MEM, Class.ST, Class.STX,
              Class.MISC | Misc.TAX, Class.MISC | Misc.TXA,
              Class.RET | Rval.K, Class.RET | Rval.A, Class.JMP | Jmp.JA}
    for jop in (Jmp.JEQ, Jmp.JGE, Jmp.JGT, Jmp.JSET):
        codes |= {Class.JMP | jop | Src.K, Class.JMP | jop | Src.X}
    return frozenset(int(c) for c in codes)


ALLOWED_CODES: frozenset[int] = _codes()
"""Every opcode Linux accepts in a classic socket filter."""

ANCILLARY_OFFSETS: frozenset[int] = frozenset(range(0, 64, 4))
"""Known ``SKF_AD_*`` values (SKF_AD_PROTOCOL=0 ... SKF_AD_VLAN_TPID=60); an absolute
load at ``SKF_AD_OFF + n`` for any other n is refused."""

_ANC_BASE = SKF_AD_OFF & 0xFFFFFFFF
_MEM_CODES = frozenset({Class.LD | Size.W | Mode.MEM, Class.LDX | Size.W | Mode.MEM,
                        Class.ST, Class.STX})
_LOAD_MEM = frozenset({Class.LD | Size.W | Mode.MEM, Class.LDX | Size.W | Mode.MEM})
_STORE = frozenset({Class.ST, Class.STX})


def _describe(insn: Insn) -> str:
    from .disasm import format_insn

    return " ".join(format_insn(insn, 0)[6:].split())


def validate(program: Sequence[Insn]) -> None:
    """Raise :class:`BpfValidationError` if the kernel would refuse ``program``."""
    flen = len(program)
    if flen == 0:
        raise BpfValidationError("empty program (the kernel needs 1..4096 instructions)")
    if flen > BPF_MAXINSNS:
        raise BpfValidationError(
            f"{flen} instructions is more than the kernel's limit of {BPF_MAXINSNS}")
    for pc, insn in enumerate(program):
        code, k = insn.code, insn.k
        if code not in ALLOWED_CODES:
            raise BpfValidationError(f"unknown opcode {code:#06x}", pc)
        if code in (Class.ALU | Alu.DIV | Src.K, Class.ALU | Alu.MOD | Src.K) and k == 0:
            raise BpfValidationError(f"{_describe(insn)}: constant divisor of zero", pc)
        elif code in (Class.ALU | Alu.LSH | Src.K, Class.ALU | Alu.RSH | Src.K) and k >= 32:
            raise BpfValidationError(f"{_describe(insn)}: shift by {k} (must be < 32)", pc)
        elif code in _MEM_CODES and k >= BPF_MEMWORDS:
            raise BpfValidationError(
                f"{_describe(insn)}: scratch slot {k} (only M[0]..M[{BPF_MEMWORDS - 1}])", pc)
        elif code == Class.JMP | Jmp.JA:
            if k >= flen - pc - 1:
                raise BpfValidationError(
                    f"ja +{k} jumps to {pc + 1 + k}, past the last instruction {flen - 1}", pc)
        elif insn.cls == Class.JMP:
            for name, off in (("jt", insn.jt), ("jf", insn.jf)):
                if pc + off + 1 >= flen:
                    raise BpfValidationError(
                        f"{name} +{off} jumps to {pc + 1 + off}, past the last "
                        f"instruction {flen - 1}", pc)
        elif insn.cls == Class.LD and insn.mode == Mode.ABS and k >= _ANC_BASE:
            if k - _ANC_BASE not in ANCILLARY_OFFSETS:
                raise BpfValidationError(
                    f"unknown ancillary offset SKF_AD_OFF+{k - _ANC_BASE}", pc)
    last = program[-1].code
    if last not in (Class.RET | Rval.K, Class.RET | Rval.A):
        raise BpfValidationError(
            "the last instruction must be 'ret #k' or 'ret a' (control would fall off "
            "the end)", flen - 1)
    _check_load_and_stores(program)


def _check_load_and_stores(program: Sequence[Insn]) -> None:
    """Every ``ld/ldx M[k]`` must follow a store to M[k] on every path to it."""
    everything = (1 << BPF_MEMWORDS) - 1
    masks = [everything] * len(program)
    memvalid = 0
    for pc, insn in enumerate(program):
        memvalid &= masks[pc]
        code = insn.code
        if code in _STORE:
            memvalid |= 1 << insn.k
        elif code in _LOAD_MEM:
            if not memvalid & (1 << insn.k):
                raise BpfValidationError(
                    f"{_describe(insn)} reads M[{insn.k}] before it is written on some path",
                    pc)
        elif code == Class.JMP | Jmp.JA:
            masks[pc + 1 + insn.k] &= memvalid
            memvalid = everything
        elif insn.cls == Class.JMP:
            masks[pc + 1 + insn.jt] &= memvalid
            masks[pc + 1 + insn.jf] &= memvalid
            memvalid = everything


def is_valid(program: Sequence[Insn]) -> bool:
    try:
        validate(program)
    except BpfValidationError:
        return False
    return True
