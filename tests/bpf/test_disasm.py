"""The disassembler prints what tcpdump -d prints."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bpf import Insn, disassemble, format_c, format_decimal, format_insn
from bpf import insn as I
from bpf.insn import from_tuples

# Each line as libpcap 1.10's bpf_image prints it (jumps separate jt/jf by a TAB).
GOLDEN_LINES = [
    (I.ld_abs_h(12), "(000) ldh      [12]"),
    (I.ld_abs_w(I.SKF_NET_OFF + 8), "(000) ld       [-1048568]"),
    (I.ld_ind_b(14), "(000) ldb      [x + 14]"),
    (I.ld_imm(255), "(000) ld       #0xff"),
    (I.ldx_imm(0), "(000) ldx      #0x0"),
    (I.ld_len(), "(000) ld       #pktlen"),
    (I.ldx_len(), "(000) ldx      #pktlen"),
    (I.ld_mem(3), "(000) ld       M[3]"),
    (I.ldx_mem(15), "(000) ldx      M[15]"),
    (I.ldx_msh(14), "(000) ldxb     4*([14]&0xf)"),
    (I.st(1), "(000) st       M[1]"),
    (I.stx(2), "(000) stx      M[2]"),
    (I.add_k(264), "(000) add      #264"),
    (I.sub_k(0xFFFFFFFF), "(000) sub      #-1"),
    (I.and_k(0xF0), "(000) and      #0xf0"),
    (I.or_k(7), "(000) or       #0x7"),
    (I.xor_k(5), "(000) xor      #0x5"),
    (I.lsh_k(2), "(000) lsh      #2"),
    (I.mod_k(3), "(000) mod      #3"),
    (I.sub_x(), "(000) sub      x"),
    (I.neg(), "(000) neg      "),
    (I.tax(), "(000) tax      "),
    (I.txa(), "(000) txa      "),
    (I.ret_k(262144), "(000) ret      #262144"),
    (I.ret_a(), "(000) ret      "),
    (Insn(0x0E), "(000) ret      x"),
    (I.ja(3), "(000) ja       4"),
    (I.jeq(0x800, 0, 10), "(000) jeq      #0x800           jt 1\tjf 11"),
    (I.jset(0x1FFF, 5, 0), "(000) jset     #0x1fff          jt 6\tjf 1"),
    (I.jgt_x(1, 2), "(000) jgt      x                jt 2\tjf 3"),
    (I.jeq(0xFFFFFFFF, 0, 0), "(000) jeq      #0xffffffff      jt 1\tjf 1"),
    (Insn(0xFF), "(000) unimp    0xff"),
    (Insn(0x08), "(000) unimp    0x8"),
    (Insn(0x115), "(000) unimp    0x115"),
]


@pytest.mark.parametrize("insn,line", GOLDEN_LINES, ids=[line[6:].split()[0] + str(i)
                                                          for i, (_, line) in
                                                          enumerate(GOLDEN_LINES)])
def test_format_insn(insn: Insn, line: str) -> None:
    assert format_insn(insn, 0) == line


def test_index_and_jump_targets_are_absolute() -> None:
    assert format_insn(I.ja(2), 7) == "(007) ja       10"
    assert format_insn(I.jeq(1, 3, 4), 12) == "(012) jeq      #0x1             jt 16\tjf 17"


PROGRAM = from_tuples([(0x28, 0, 0, 12), (0x15, 0, 1, 0x800), (0x6, 0, 0, 0x40000),
                       (0x6, 0, 0, 0)])


def test_whole_program_formats() -> None:
    assert disassemble(PROGRAM) == (
        "(000) ldh      [12]\n"
        "(001) jeq      #0x800           jt 2\tjf 3\n"
        "(002) ret      #262144\n"
        "(003) ret      #0\n")
    assert format_c(PROGRAM) == (
        "{ 0x28, 0, 0, 0x0000000c },\n{ 0x15, 0, 1, 0x00000800 },\n"
        "{ 0x6, 0, 0, 0x00040000 },\n{ 0x6, 0, 0, 0x00000000 },\n")
    assert format_decimal(PROGRAM) == "4\n40 0 0 12\n21 0 1 2048\n6 0 0 262144\n6 0 0 0\n"


TCPDUMP_EXPRESSIONS = [
    "udp and src host 1.2.3.4 and src port 49918",
    "ip[0] + ip[1] > 5", "ip[0] - ip[1] * 3 / 2 = len", "ip[0] % 3 = 1",
    "ip[0] << 2 = ip[1] >> 1", "ip[0] ^ 5 = ip[1] | 7", "len >= 100", "len < 100",
    "ip[ip[0]] = 2", "ether[0] & ether[1] != 0", "ip[0:4] = 0xffffffff",
    "tcp[tcpflags] & tcp-syn != 0", "ip6 and udp port 53", "vlan and ip",
    "icmp[icmptype] = icmp-echo", "ip[ip[0]:2] = 0 and ip[ip[1]:4] > 7",
    "ether[0:4] > ether[4:4]", "ip[0] & 0xf0 = 0x40 and ip[8] >= 64",
    "ip6 and src net 2001:db8::/32", "not arp and not (udp port 67)",
]


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
@pytest.mark.parametrize("expr", TCPDUMP_EXPRESSIONS)
def test_agrees_with_tcpdump(expr: str) -> None:
    """tcpdump -dd gives the program, tcpdump -d its text: ours must be identical."""
    def tcpdump(flag: str) -> str:
        r = subprocess.run(["tcpdump", flag, "-y", "EN10MB", expr], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    dd = tcpdump("-dd")
    rows = [tuple(int(v, 0) for v in re.findall(r"0x[0-9a-f]+|\d+", line))
            for line in dd.splitlines()]
    program = from_tuples(rows)  # type: ignore[arg-type]
    assert format_c(program) == dd
    assert disassemble(program) == tcpdump("-d")
    assert format_decimal(program) == tcpdump("-ddd")
