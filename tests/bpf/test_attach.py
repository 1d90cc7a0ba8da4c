"""attach/detach/lock/get through cffi, errors with errno, and drain()."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from bpf import (
    BpfAttachError,
    BpfValidationError,
    attach_filter,
    detach_filter,
    drain,
    get_filter,
    ipv4_reply_filter,
    lock_filter,
)
from bpf import insn as I

PROG = ipv4_reply_filter("192.0.2.1", 49918, 51820)


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


def test_attach_read_back_replace_detach(udp: socket.socket) -> None:
    assert get_filter(udp) == ()
    attach_filter(udp, PROG)
    assert get_filter(udp) == PROG
    other = (I.ret_k(0),)
    attach_filter(udp.fileno(), other)          # a bare fd works too
    assert get_filter(udp) == other
    detach_filter(udp)
    assert get_filter(udp) == ()


def test_detach_without_filter(udp: socket.socket) -> None:
    with pytest.raises(BpfAttachError) as e:
        detach_filter(udp)
    assert e.value.errno == errno.ENOENT
    assert isinstance(e.value, OSError)
    assert str(e.value) == (f"[Errno {errno.ENOENT}] SO_DETACH_FILTER on fd {udp.fileno()} "
                            "failed: No such file or directory (no filter is attached)")


def test_lock(udp: socket.socket) -> None:
    attach_filter(udp, PROG, lock=True)
    with pytest.raises(BpfAttachError) as e:
        attach_filter(udp, (I.ret_k(0xFFFF),))
    assert e.value.errno == errno.EPERM and "locked" in str(e.value)
    with pytest.raises(BpfAttachError) as e:
        detach_filter(udp)
    assert e.value.errno == errno.EPERM
    assert get_filter(udp) == PROG


def test_lock_separately(udp: socket.socket) -> None:
    lock_filter(udp)
    with pytest.raises(BpfAttachError, match=r"SO_ATTACH_FILTER .* locked"):
        attach_filter(udp, PROG)


def test_validation_happens_before_the_socket_is_touched(udp: socket.socket) -> None:
    with pytest.raises(BpfValidationError, match="instruction 0: ld M\\[0\\] reads M\\[0\\]"):
        attach_filter(udp, (I.ld_mem(0), I.ret_a()))
    assert get_filter(udp) == ()


def test_not_a_socket() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(BpfAttachError) as e:
            attach_filter(r, PROG)
        assert e.value.errno == errno.ENOTSOCK and "not a socket" in str(e.value)
    finally:
        os.close(r)
        os.close(w)


def test_closed_fd() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = s.fileno()
    s.close()
    with pytest.raises(BpfAttachError) as e:
        get_filter(fd)
    assert e.value.errno == errno.EBADF


def test_drain_counts_and_never_blocks() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        assert drain(b) == 0
        for i in range(5):
            a.send(b"x" * i)
        b.settimeout(None)               # blocking socket: drain must still return
        assert drain(b) == 5
        assert drain(b) == 0
        a.send(b"after")
        assert b.recv(10) == b"after"


@pytest.mark.root
def test_packets_queued_before_attaching_bypass_the_filter() -> None:
    """Why drain() exists: the filter applies at enqueue time."""
    from tests.bpf import packets as P
    from tests.bpf.rawlab import RawLab, until

    lab = RawLab((P.SERVER4, P.CLIENT4), (P.SERVER6, P.CLIENT6))
    try:
        with lab.sockets(socket.AF_INET, None) as (plain,):
            with lab.sockets(socket.AF_INET, None) as (late,):
                stray = bytes(P._ip(src=P.OTHER4) / P._udp(1, 2) / P.Raw(b"stray"))
                reply = bytes(P._ip() / P._udp() / P.Raw(P.CLASSIC_REPLY))
                lab.send(stray)
                assert [d for d, _ in until(plain, lambda d: d == stray)] == []
                attach_filter(late, ipv4_reply_filter(P.SERVER4, P.SERVER_PORT, P.WG_PORT))
                assert drain(late) == 1                      # the stray got in unfiltered
                lab.send(stray)
                lab.send(reply)
                assert [d for d, _ in until(plain, lambda d: d == reply)] == [stray]
                late.settimeout(10)
                assert late.recv(65535) == reply             # the second stray was filtered
                assert drain(late) == 0
    finally:
        lab.close()


def test_drain_ignores_the_socket_timeout() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.settimeout(30)                 # Python's recv would wait 30 s before trying
        a.send(b"one")
        assert drain(b) == 1
        assert drain(b) == 0
        assert b.gettimeout() == 30


def test_drain_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(BpfAttachError) as e:
            drain(r)
        assert e.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
