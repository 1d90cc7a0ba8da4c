"""The validator refuses what the kernel refuses, naming the instruction; and a real
socket agrees on every case and on thousands of random programs."""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterator

import pytest

from bpf import BpfAttachError, BpfValidationError, Insn, attach_filter, is_valid, validate
from bpf import insn as I
from bpf.validate import ALLOWED_CODES

RET0 = I.ret_k(0)

# name -> (program, index named in the error or None, message fragment)
REJECTED: dict[str, tuple[tuple[Insn, ...], int | None, str]] = {
    "empty": ((), None, "empty program"),
    "too-long": ((RET0,) * 4097, None, "4097 instructions is more than the kernel's limit"),
    "unknown-opcode": ((I.ld_imm(0), Insn(0xFF), RET0), 1, "unknown opcode 0x00ff"),
    "ld-h-imm": ((Insn(0x08), RET0), 0, "unknown opcode 0x0008"),
    "ret-x": ((I.ld_imm(1), I.tax(), Insn(0x0E)), 2, "unknown opcode 0x000e"),
    "neg-x": ((Insn(0x8C), RET0), 0, "unknown opcode 0x008c"),
    "code-over-255": ((Insn(0x115), RET0), 0, "unknown opcode 0x0115"),
    "div-by-zero": ((I.ld_imm(4), I.div_k(0), I.ret_a()), 1, "div #0: constant divisor of zero"),
    "mod-by-zero": ((I.mod_k(0), I.ret_a()), 0, "mod #0: constant divisor of zero"),
    "lsh-32": ((I.lsh_k(32), I.ret_a()), 0, "lsh #32: shift by 32 (must be < 32)"),
    "rsh-99": ((I.rsh_k(99), I.ret_a()), 0, "shift by 99"),
    "st-16": ((I.st(16), RET0), 0, "st M[16]: scratch slot 16"),
    "stx-99": ((I.stx(99), RET0), 0, "scratch slot 99"),
    "ld-mem-16": ((I.ld_mem(16), I.ret_a()), 0, "ld M[16]: scratch slot 16"),
    "ldx-mem-16": ((I.ldx_mem(16), I.ret_a()), 0, "scratch slot 16"),
    "ja-past-end": ((I.ja(1), RET0), 0, "ja +1 jumps to 2, past the last instruction 1"),
    "ja-huge": ((I.ja(0xFFFFFFFF), RET0), 0, "past the last instruction"),
    "jt-past-end": ((I.jeq(1, 2, 0), RET0, RET0), 0, "jt +2 jumps to 3"),
    "jf-past-end": ((I.ld_imm(1), I.jset(1, 0, 1), RET0), 1, "jf +1 jumps to 3"),
    "jump-to-end-x": ((I.jeq_x(0, 5), RET0), 0, "jf +5"),
    "unknown-ancillary": ((I.ld_abs_w(I.SKF_AD_OFF + 64), I.ret_a()), 0,
                          "unknown ancillary offset SKF_AD_OFF+64"),
    "misaligned-ancillary": ((I.ld_abs_b(I.SKF_AD_OFF + 2), I.ret_a()), 0, "SKF_AD_OFF+2"),
    "minus-one": ((I.ld_abs_h(-1), I.ret_a()), 0, "SKF_AD_OFF+4095"),
    "no-final-ret": ((I.ld_imm(1),), 0, "the last instruction must be 'ret #k' or 'ret a'"),
    # The jump check comes first, as in the kernel: a final jump always overshoots.
    "ends-in-jump": ((I.ld_imm(1), I.jeq(1, 0, 0)), 1, "jt +0 jumps to 2, past the last"),
    "ends-in-tax": ((RET0, I.tax()), 1, "last instruction must be"),
    "mem-never-written": ((I.ld_mem(3), I.ret_a()), 0,
                          "ld M[3] reads M[3] before it is written on some path"),
    "mem-written-on-one-path": ((I.ld_len(), I.jeq(0, 0, 1), I.st(0), I.ldx_mem(0),
                                 I.ret_a()), 3, "ldx M[0] reads M[0] before"),
    "mem-wrong-slot": ((I.st(1), I.ld_mem(2), I.ret_a()), 1, "reads M[2]"),
    "mem-skipped-by-ja": ((I.ja(1), I.st(0), I.ld_mem(0), I.ret_a()), 2, "reads M[0]"),
}

ACCEPTED: dict[str, tuple[Insn, ...]] = {
    "ret0": (RET0,),
    "ret-a": (I.ret_a(),),
    "max-length": (I.ld_imm(1),) * 4095 + (RET0,),
    "known-ancillary": (*(I.ld_abs_w(I.SKF_AD_OFF + n) for n in range(0, 64, 4)),
                        I.ret_a()),
    "net-offset": (I.ld_abs_w(I.SKF_NET_OFF + 8), I.ret_a()),
    "link-layer-offset": (I.ld_abs_b(I.SKF_LL_OFF + 12), I.ret_a()),
    "div-x-zero-allowed": (I.div_x(), I.ret_a()),
    "shift-31": (I.lsh_k(31), I.rsh_k(31), I.ret_a()),
    "mem-both-paths": (I.ld_len(), I.jeq(0, 0, 2), I.st(0), I.ja(1), I.st(0),
                       I.ld_mem(0), I.ret_a()),
    "mem-all-slots": tuple(I.st(n) for n in range(16)) + tuple(I.ld_mem(n) for n in range(16))
                     + (I.ret_a(),),
    "jump-to-last": (I.jeq(1, 1, 1), RET0, RET0),
    "ja-to-last": (I.ja(1), RET0, RET0),
    # The kernel's data flow lets a store before a 'ret' count for the instruction
    # after it; only real jumps into it can clear the slot.
    "store-through-ret": (I.st(0), RET0, I.ld_mem(0), I.ret_a()),
}

# And one the kernel refuses though no path reads unwritten memory: conservative.
REJECTED["kernel-conservative-after-ret"] = (
    (I.ld_len(), I.jeq(0, 2, 0), I.st(0), I.ret_a(), I.ld_mem(0), I.ret_a()), 4, "reads M[0]")


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected(name: str) -> None:
    program, index, fragment = REJECTED[name]
    with pytest.raises(BpfValidationError) as e:
        validate(program)
    assert e.value.index == index
    assert fragment in str(e.value)
    if index is not None:
        assert str(e.value).startswith(f"instruction {index}: ")
    assert not is_valid(program)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted(name: str) -> None:
    validate(ACCEPTED[name])
    assert is_valid(ACCEPTED[name])


def test_allowed_codes_count() -> None:
    assert len(ALLOWED_CODES) == 49


# --- the kernel as the oracle (SO_ATTACH_FILTER needs no privilege on a UDP socket) ---

@pytest.fixture
def udp_sock() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


def kernel_accepts(sock: socket.socket, program: tuple[Insn, ...]) -> bool:
    try:
        attach_filter(sock, program, check=False)
    except BpfAttachError as e:
        assert e.errno == errno.EINVAL, e
        return False
    return True


@pytest.mark.parametrize("name", list(REJECTED))
def test_kernel_rejects_too(udp_sock: socket.socket, name: str) -> None:
    program = REJECTED[name][0]
    assert not kernel_accepts(udp_sock, program)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_kernel_accepts_too(udp_sock: socket.socket, name: str) -> None:
    assert kernel_accepts(udp_sock, ACCEPTED[name])


def _random_program(rng: random.Random) -> tuple[Insn, ...]:
    codes = sorted(ALLOWED_CODES)
    n = rng.randint(1, 12)
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.05:
            code = rng.getrandbits(8)                 # mostly unknown
        else:
            code = rng.choice(codes)
        k = rng.choice([0, 1, 2, 15, 16, 31, 32, rng.getrandbits(5), rng.getrandbits(32),
                        (I.SKF_AD_OFF + rng.randrange(0, 72)) & 0xFFFFFFFF,
                        (I.SKF_NET_OFF + rng.randrange(0, 64)) & 0xFFFFFFFF])
        out.append(Insn(code, rng.randrange(0, n + 1), rng.randrange(0, n + 1), k))
    if rng.random() < 0.8:
        out[-1] = rng.choice([I.ret_k(rng.getrandbits(16)), I.ret_a()])
    return tuple(out)


@pytest.mark.fuzz
def test_random_programs_agree_with_kernel(udp_sock: socket.socket) -> None:
    rng = random.Random(20261122)
    outcomes = {True: 0, False: 0}
    for _ in range(5000):
        program = _random_program(rng)
        ours = is_valid(program)
        assert ours == kernel_accepts(udp_sock, program), program
        outcomes[ours] += 1
    # The generator must exercise both outcomes for the comparison to mean anything.
    assert outcomes[True] > 200 and outcomes[False] > 200, outcomes
