"""Attach, read back and detach a classic socket filter; drain what bypassed it.

A thin I/O shell over ``setsockopt``/``getsockopt`` through cffi in ABI mode (no
compiler needed): Python's own ``socket.setsockopt`` cannot pass a ``struct
sock_fprog``, whose second field is a pointer.

Order of operations for a raw socket that must see only some packets::

    sock = socket.socket(AF_INET, SOCK_RAW, IPPROTO_UDP)
    attach_filter(sock, ipv4_reply_filter(...))
    drain(sock)          # what queued before the filter existed never met it
    ... send the request, then read replies ...

Anything that arrives between socket() and attach_filter() is queued unfiltered;
:func:`drain` discards the queue. Call it before sending anything whose answer you
want, since it also discards packets that already passed the new filter.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from .errors import BpfAttachError
from .insn import Insn, Program, decode, encode
from .validate import validate

__all__ = [
    "SO_ATTACH_FILTER",
    "SO_DETACH_FILTER",
    "SO_GET_FILTER",
    "SO_LOCK_FILTER",
    "attach_filter",
    "detach_filter",
    "drain",
    "get_filter",
    "lock_filter",
]

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_GET_FILTER = SO_ATTACH_FILTER
SO_LOCK_FILTER = 44
SOL_SOCKET = socket.SOL_SOCKET

_CDEF = """
    struct sock_filter {
        uint16_t code;
        uint8_t  jt;
        uint8_t  jf;
        uint32_t k;
    };
    struct sock_fprog {
        unsigned short len;
        struct sock_filter *filter;
    };
    int setsockopt(int sockfd, int level, int optname, const void *optval,
                   uint32_t optlen);
    int getsockopt(int sockfd, int level, int optname, void *optval, uint32_t *optlen);
    ssize_t recv(int sockfd, void *buf, size_t len, int flags);
"""
_ffi: Any = None
_libc: Any = None


def _api() -> tuple[Any, Any]:
    """(ffi, libc), set up on first use."""
    lib = _lib()
    return _ffi, lib


def _lib() -> Any:
    """The C library through cffi, set up on first use: parsing the declarations costs
    ~25 ms, which a client that must send its first request fast pays only when it
    attaches the filter."""
    global _ffi, _libc
    if _libc is None:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef(_CDEF)
        _libc = ffi.dlopen(None)
        _ffi = ffi
    return _libc


_HINTS = {
    errno_mod.EPERM: "the socket's filter is locked (SO_LOCK_FILTER); it cannot change",
    errno_mod.EINVAL: "the kernel's checker refused the program",
    errno_mod.ENOMEM: "the program exceeds the socket's option memory (net.core.optmem_max)",
    errno_mod.ENOENT: "no filter is attached",
    errno_mod.EBADF: "not an open file descriptor",
    errno_mod.ENOTSOCK: "not a socket",
}


def _fail(what: str, fd: int) -> BpfAttachError:
    err = _ffi.errno
    hint = _HINTS.get(err)
    msg = f"{what} on fd {fd} failed: {os.strerror(err)}" + (f" ({hint})" if hint else "")
    return BpfAttachError(err, msg)


def _fd(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def attach_filter(sock: socket.socket | int, program: Sequence[Insn], lock: bool = False, *,
                  check: bool = True) -> None:
    """Validate ``program`` and attach it to ``sock`` (replacing any previous filter).

    With ``lock``, also set SO_LOCK_FILTER: the filter can then be neither replaced
    nor removed for the socket's lifetime (a guard against a later mistake).
    Raises :class:`~bpf.errors.BpfValidationError` before touching the socket, or
    :class:`~bpf.errors.BpfAttachError` (an ``OSError``) with the kernel's errno.
    ``check=False`` skips our validation and lets the kernel judge (for tests).
    """
    if check:
        validate(program)
    fd = _fd(sock)
    ffi, lib = _api()
    raw = encode(program)
    insns = ffi.new("struct sock_filter[]", len(program))
    ffi.memmove(insns, raw, len(raw))
    fprog = ffi.new("struct sock_fprog *", {"len": len(program), "filter": insns})
    if lib.setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, fprog,
                         ffi.sizeof("struct sock_fprog")) != 0:
        raise _fail("SO_ATTACH_FILTER", fd)
    log.debug("attached a %d-instruction filter to fd %d", len(program), fd)
    if lock:
        lock_filter(sock)


def lock_filter(sock: socket.socket | int) -> None:
    """SO_LOCK_FILTER: forbid replacing or detaching the socket's filter from now on."""
    fd = _fd(sock)
    ffi, lib = _api()
    one = ffi.new("int *", 1)
    if lib.setsockopt(fd, SOL_SOCKET, SO_LOCK_FILTER, one, ffi.sizeof("int")) != 0:
        raise _fail("SO_LOCK_FILTER", fd)


def detach_filter(sock: socket.socket | int) -> None:
    """Remove the socket's filter (ENOENT if there is none, EPERM if locked)."""
    fd = _fd(sock)
    ffi, lib = _api()
    zero = ffi.new("int *", 0)
    if lib.setsockopt(fd, SOL_SOCKET, SO_DETACH_FILTER, zero, ffi.sizeof("int")) != 0:
        raise _fail("SO_DETACH_FILTER", fd)
    log.debug("detached the filter of fd %d", fd)


def get_filter(sock: socket.socket | int) -> Program:
    """The classic program attached to ``sock`` as the kernel holds it (``()`` if none).

    SO_GET_FILTER counts its length in instructions, not bytes: a first call with
    length 0 asks how many there are.
    """
    fd = _fd(sock)
    ffi, lib = _api()
    optlen = ffi.new("uint32_t *", 0)
    if lib.getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, ffi.NULL, optlen) != 0:
        raise _fail("SO_GET_FILTER", fd)
    count = optlen[0]
    if count == 0:
        return ()
    buf = ffi.new("struct sock_filter[]", count)
    optlen[0] = count
    if lib.getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, buf, optlen) != 0:
        raise _fail("SO_GET_FILTER", fd)
    return decode(bytes(ffi.buffer(buf, optlen[0] * ffi.sizeof("struct sock_filter"))))


def drain(sock: socket.socket | int) -> int:
    """Discard every datagram already queued on ``sock``; how many there were.

    Never blocks, whatever the socket's blocking mode or timeout (Python's own
    recv() waits for the timeout before trying, even with MSG_DONTWAIT, so this
    calls recv(2) directly).
    """
    fd = _fd(sock)
    ffi, lib = _api()
    buf = ffi.new("char[1]")
    count = 0
    while True:
        if lib.recv(fd, buf, 1, socket.MSG_DONTWAIT) >= 0:
            count += 1
            continue
        err = ffi.errno
        if err == errno_mod.EINTR:
            continue
        if err in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
            break
        raise _fail("recv", fd)
    if count:
        log.debug("drained %d datagram(s) queued before the filter", count)
    return count
