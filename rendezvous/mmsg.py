"""Batch datagram I/O for IPv4 UDP sockets: recvmmsg(2)/sendmmsg(2) through cffi.

cffi runs in ABI mode (``dlopen`` of the C library; nothing is compiled at install).
One ``Batch`` owns fixed buffers for up to ``size`` datagrams: their payloads, their
``sockaddr_in`` source addresses and, optionally, an ``IP_PKTINFO`` control message each
so that a reply can leave from the address the request was sent to.

Speed: cffi attribute access costs ~0.1-0.2 µs per field, which made per-datagram
bookkeeping cost more than the protocol work. The kernel's ``struct mmsghdr`` arrays
are therefore read and written through plain ``memoryview``s of 32- and 64-bit words
at offsets cffi computed once, and only the headers the last call used are reset.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["MMSG_AVAILABLE", "Batch"]

_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
int recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags, void *timeout);
int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags);
"""

MSG_DONTWAIT = 0x40
SOCKADDR_IN_LEN = 16
# struct cmsghdr (len: size_t, level: int, type: int) + struct in_pktinfo (3 x 4 bytes)
CMSG_HDR_LEN = 16
PKTINFO_LEN = 12
CMSG_SPACE = CMSG_HDR_LEN + 16  # CMSG_SPACE(12) on 64-bit Linux
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

try:
    import cffi

    _ffi = cffi.FFI()
    _ffi.cdef(_CDEF)
    _libc: Any = _ffi.dlopen(None)
    _libc.recvmmsg  # noqa: B018  (resolve now: fail here, not on the hot path)
    _libc.sendmmsg  # noqa: B018
    MMSG_AVAILABLE = True
except (ImportError, OSError, AttributeError):  # pragma: no cover - platform dependent
    MMSG_AVAILABLE = False


def _word(field: str, size: int) -> int:
    """Index of struct mmsghdr's FIELD in a view of SIZE-byte words."""
    if field == "msg_len":
        off = _ffi.offsetof("struct mmsghdr", "msg_len")
    else:
        off = _ffi.offsetof("struct mmsghdr", "msg_hdr") + _ffi.offsetof("struct msghdr", field)
    assert off % size == 0, (field, off)
    return off // size


Handler = Callable[[bytes, bytes, float], "bytes | None"]


class Batch:
    """Buffers for ``size`` datagrams of at most ``bufsize`` bytes each."""

    def __init__(self, size: int = 64, bufsize: int = 2048, pktinfo: bool = False) -> None:
        if not MMSG_AVAILABLE:
            raise OSError("recvmmsg/sendmmsg are not available on this platform")
        ffi = _ffi
        self.size, self.bufsize, self.pktinfo = size, bufsize, pktinfo
        self.data = bytearray(size * bufsize)
        self.names = bytearray(size * SOCKADDR_IN_LEN)
        self.ctrl = bytearray(size * CMSG_SPACE) if pktinfo else bytearray(0)
        self.out = bytearray(size * bufsize)
        self.rvec = ffi.new("struct mmsghdr[]", size)
        self.svec = ffi.new("struct mmsghdr[]", size)
        riov = ffi.new("struct iovec[]", size)
        siov = ffi.new("struct iovec[]", size)
        dptr, nptr, optr = (ffi.from_buffer(b) for b in (self.data, self.names, self.out))
        cptr = ffi.from_buffer(self.ctrl) if pktinfo else ffi.NULL
        self._keep = (riov, siov, dptr, nptr, optr, cptr)
        for i in range(size):
            riov[i].iov_base = dptr + i * bufsize
            riov[i].iov_len = bufsize
            siov[i].iov_base = optr + i * bufsize
            r = self.rvec[i].msg_hdr
            r.msg_name = nptr + i * SOCKADDR_IN_LEN
            r.msg_namelen = SOCKADDR_IN_LEN
            r.msg_iov = riov + i
            r.msg_iovlen = 1
            if pktinfo:
                r.msg_control = cptr + i * CMSG_SPACE
                r.msg_controllen = CMSG_SPACE
            s = self.svec[i].msg_hdr
            s.msg_iov = siov + i
            s.msg_iovlen = 1
            s.msg_namelen = SOCKADDR_IN_LEN
        stride = ffi.sizeof("struct mmsghdr")
        assert stride % 8 == 0
        self._stride4, self._stride8 = stride // 4, stride // 8
        self._r4 = memoryview(ffi.buffer(self.rvec)).cast("I")
        self._s8 = memoryview(ffi.buffer(self.svec)).cast("Q")
        self._siov8 = memoryview(ffi.buffer(siov)).cast("Q")
        self._namelen4, self._msglen4 = _word("msg_namelen", 4), _word("msg_len", 4)
        self._flags4 = _word("msg_flags", 4)
        self._controllen4 = _word("msg_controllen", 4)
        self._s_name8 = _word("msg_name", 8)
        self._s_control8 = _word("msg_control", 8)
        self._s_controllen8 = _word("msg_controllen", 8)
        self._iov_len8 = ffi.offsetof("struct iovec", "iov_len") // 8
        self._iov_stride8 = ffi.sizeof("struct iovec") // 8
        self._name_addr = int(ffi.cast("uintptr_t", nptr))
        self._ctrl_addr = int(ffi.cast("uintptr_t", cptr)) if pktinfo else 0
        self._used = size

    def recv(self, fd: int) -> int:
        """Receive up to ``size`` datagrams without blocking; return how many (0: none)."""
        r4, st = self._r4, self._stride4
        nl, cl = self._namelen4, self._controllen4
        for i in range(self._used):  # the kernel rewrote these in the headers it filled
            r4[i * st + nl] = SOCKADDR_IN_LEN
            if self.pktinfo:
                r4[i * st + cl] = CMSG_SPACE
        n: int = _libc.recvmmsg(fd, self.rvec, self.size, MSG_DONTWAIT, _ffi.NULL)
        if n < 0:
            self._used = 0
            err = _ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        self._used = n
        return n

    def exchange(self, fd: int, handle: Handler, now: float) -> tuple[int, int, int]:
        """Receive a batch, pass each datagram to HANDLE(data, source, now), and send its
        replies back, each to its request's source and from its request's destination
        address. Returns (received, sent, failed)."""
        n = self.recv(fd)
        if n == 0:
            return 0, 0, 0
        r4, st4, ml, fl = self._r4, self._stride4, self._msglen4, self._flags4
        s8, st8, sname, = self._s8, self._stride8, self._s_name8
        siov8, ilen, ist = self._siov8, self._iov_len8, self._iov_stride8
        data, names, out, bufsize = self.data, self.names, self.out, self.bufsize
        name_addr, pktinfo = self._name_addr, self.pktinfo
        trunc = int(socket.MSG_TRUNC)  # an IntFlag: & on it costs microseconds
        j = 0
        for i in range(n):
            base = i * st4
            length = r4[base + ml]
            if r4[base + fl] & trunc:
                length = bufsize + 1  # longer than any buffer: never a valid request
                payload = bytes(bufsize + 1)
            else:
                off = i * bufsize
                payload = bytes(data[off:off + length])
            noff = i * SOCKADDR_IN_LEN
            reply = handle(payload, bytes(names[noff + 4:noff + 8]) + names[noff + 2:noff + 4], now)
            if reply is None:
                continue
            ooff = j * bufsize
            out[ooff:ooff + len(reply)] = reply
            siov8[j * ist + ilen] = len(reply)
            s8[j * st8 + sname] = name_addr + noff
            if pktinfo:
                self._reply_pktinfo(i, j)
            j += 1
        sent, failed = self._send(fd, j)
        return n, sent, failed

    def _reply_pktinfo(self, i: int, j: int) -> None:
        """Reuse request I's IP_PKTINFO for reply J: any interface (ifindex 0), and the
        request's destination address (ipi_addr) as the source (ipi_spec_dst)."""
        s8, base = self._s8, j * self._stride8
        if self._r4[i * self._stride4 + self._controllen4] < CMSG_HDR_LEN + PKTINFO_LEN:
            s8[base + self._s_control8] = 0
            s8[base + self._s_controllen8] = 0
            return
        c = i * CMSG_SPACE + CMSG_HDR_LEN
        ctrl = self.ctrl
        ctrl[c:c + 8] = bytes(4) + ctrl[c + 8:c + 12]
        s8[base + self._s_control8] = self._ctrl_addr + i * CMSG_SPACE
        s8[base + self._s_controllen8] = CMSG_SPACE

    def _send(self, fd: int, total: int) -> tuple[int, int]:
        """Send the first TOTAL prepared replies; (sent, failed). Never raises for a full
        buffer or an unreachable destination: the datagram is skipped and counted."""
        done = sent = failed = 0
        while done < total:
            k = _libc.sendmmsg(fd, self.svec + done, total - done, MSG_DONTWAIT)
            if k > 0:
                sent += k
                done += k
                continue
            if _ffi.errno == errno.EINTR:
                continue
            failed += 1
            done += 1
        return sent, failed
