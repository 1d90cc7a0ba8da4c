"""Classic BPF disassembly in the format of ``tcpdump -d`` (libpcap's bpf_image), so a
program built here can be read, and diffed against what tcpdump prints.

Each line is ``(NNN) op       operand`` with the opcode padded to 8 columns;
conditional jumps add ``jt T<TAB>jf F`` with absolute targets. Constants appear as
libpcap prints them: decimal (signed 32-bit) for offsets, ``ret`` and arithmetic,
hex for comparisons and bit masks. Also the C array of ``tcpdump -dd`` and the
decimal listing of ``tcpdump -ddd`` (what ``tc``/``iptables -m bpf`` take).
"""

from __future__ import annotations

from collections.abc import Sequence

from .insn import Alu, Class, Insn, Jmp, Misc, Mode, Rval, Size, Src

__all__ = ["disassemble", "format_c", "format_decimal", "format_insn"]


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


_SIZE_OP = {Size.W: "ld", Size.H: "ldh", Size.B: "ldb"}

_ALU_NAME = {Alu.ADD: "add", Alu.SUB: "sub", Alu.MUL: "mul", Alu.DIV: "div",
             Alu.MOD: "mod", Alu.AND: "and", Alu.OR: "or", Alu.XOR: "xor",
             Alu.LSH: "lsh", Alu.RSH: "rsh"}
# libpcap shows bit-pattern constants in hex, counts and amounts in decimal.
_ALU_HEX = {Alu.AND, Alu.OR, Alu.XOR}

_JMP_NAME = {Jmp.JEQ: "jeq", Jmp.JGT: "jgt", Jmp.JGE: "jge", Jmp.JSET: "jset"}


def _op_operand(insn: Insn, n: int) -> tuple[str, str] | None:
    code, k = insn.code, insn.k
    cls = insn.cls
    if cls == Class.RET:
        return {Class.RET | Rval.K: ("ret", f"#{_s32(k)}"), Class.RET | Rval.A: ("ret", ""),
                Class.RET | Rval.X: ("ret", "x")}.get(code)
    if cls == Class.LD:
        mode, size = insn.mode, insn.size
        if code & ~0xFF or size not in _SIZE_OP:
            return None
        if mode == Mode.ABS:
            return _SIZE_OP[Size(size)], f"[{_s32(k)}]"
        if mode == Mode.IND:
            return _SIZE_OP[Size(size)], f"[x + {_s32(k)}]"
        if code == Class.LD | Size.W | Mode.LEN:
            return "ld", "#pktlen"
        if code == Class.LD | Size.W | Mode.IMM:
            return "ld", f"#{k:#x}"
        if code == Class.LD | Size.W | Mode.MEM:
            return "ld", f"M[{_s32(k)}]"
        return None
    if cls == Class.LDX:
        if code == Class.LDX | Size.W | Mode.IMM:
            return "ldx", f"#{k:#x}"
        if code == Class.LDX | Size.W | Mode.MEM:
            return "ldx", f"M[{_s32(k)}]"
        if code == Class.LDX | Size.W | Mode.LEN:
            return "ldx", "#pktlen"
        if code == Class.LDX | Size.B | Mode.MSH:
            return "ldxb", f"4*([{_s32(k)}]&0xf)"
        return None
    if code == Class.ST:
        return "st", f"M[{_s32(k)}]"
    if code == Class.STX:
        return "stx", f"M[{_s32(k)}]"
    if cls == Class.ALU:
        if code & ~0xFF or code & 0x07 != Class.ALU:
            return None
        if code == Class.ALU | Alu.NEG:
            return "neg", ""
        try:
            op = Alu(insn.op)
        except ValueError:
            return None
        if op == Alu.NEG:
            return None
        name = _ALU_NAME[op]
        if insn.src == Src.X:
            return name, "x"
        return name, f"#{k:#x}" if op in _ALU_HEX else f"#{_s32(k)}"
    if cls == Class.JMP:
        if code & ~0xFF:
            return None
        if code == Class.JMP | Jmp.JA:
            return "ja", f"{_s32(n + 1 + k)}"
        try:
            jop = Jmp(insn.op)
        except ValueError:
            return None
        if jop == Jmp.JA:
            return None
        return _JMP_NAME[jop], "x" if insn.src == Src.X else f"#{k:#x}"
    if cls == Class.MISC:
        if code == Class.MISC | Misc.TAX:
            return "tax", ""
        if code == Class.MISC | Misc.TXA:
            return "txa", ""
    return None


def format_insn(insn: Insn, n: int) -> str:
    """One instruction at index ``n``, exactly as ``tcpdump -d`` prints it."""
    pair = _op_operand(insn, n)
    if pair is None:
        op, operand = "unimp", f"{insn.code:#x}"
    else:
        op, operand = pair
    if pair is not None and insn.cls == Class.JMP and insn.code != Class.JMP | Jmp.JA:
        return f"({n:03d}) {op:<8} {operand:<16} jt {n + 1 + insn.jt}\tjf {n + 1 + insn.jf}"
    return f"({n:03d}) {op:<8} {operand}"


def disassemble(program: Sequence[Insn]) -> str:
    """The whole program, one line per instruction, newline-terminated."""
    return "".join(format_insn(insn, n) + "\n" for n, insn in enumerate(program))


def format_c(program: Sequence[Insn]) -> str:
    """The C initialiser ``tcpdump -dd`` prints, one ``{ code, jt, jf, k },`` a line."""
    return "".join(f"{{ {i.code:#x}, {i.jt}, {i.jf}, 0x{i.k:08x} }},\n" for i in program)


def format_decimal(program: Sequence[Insn]) -> str:
    """``tcpdump -ddd``: the count, then ``code jt jf k`` in decimal, one a line."""
    return f"{len(program)}\n" + "".join(f"{i.code} {i.jt} {i.jf} {i.k}\n" for i in program)
