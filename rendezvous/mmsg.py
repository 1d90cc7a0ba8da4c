"""Batch datagram I/O for IPv4 UDP sockets: recvmmsg(2)/sendmmsg(2) through cffi.

cffi runs in ABI mode (``dlopen`` of the C library; nothing is compiled at install).
One ``Batch`` owns fixed buffers for up to ``size`` datagrams: their payloads, their
``sockaddr_in`` source addresses and, optionally, an ``IP_PKTINFO`` control message each
so that a reply can leave from the address the request was sent to.

The socket must be non-blocking. Replies are sent back to the sockaddr each request
came from, in place, so nothing is copied on the way out but the reply payload.
"""

from __future__ import annotations

import errno
import socket
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
        self._keep = [ffi.from_buffer(b) for b in (self.data, self.names, self.out)]
        dptr, nptr, optr = self._keep
        cptr = ffi.from_buffer(self.ctrl) if pktinfo else ffi.NULL
        self._keep.append(cptr)
        self.rvec = ffi.new("struct mmsghdr[]", size)
        self.riov = ffi.new("struct iovec[]", size)
        self.svec = ffi.new("struct mmsghdr[]", size)
        self.siov = ffi.new("struct iovec[]", size)
        for i in range(size):
            self.riov[i].iov_base = dptr + i * bufsize
            self.riov[i].iov_len = bufsize
            self.siov[i].iov_base = optr + i * bufsize
            h = self.rvec[i].msg_hdr
            h.msg_name = nptr + i * SOCKADDR_IN_LEN
            h.msg_iov = self.riov + i
            h.msg_iovlen = 1
            if pktinfo:
                h.msg_control = cptr + i * CMSG_SPACE
            s = self.svec[i].msg_hdr
            s.msg_iov = self.siov + i
            s.msg_iovlen = 1
        self._nptr, self._cptr = nptr, cptr
        self._pending = 0

    def recv(self, fd: int) -> int:
        """Receive up to ``size`` datagrams without blocking; return how many (0: none)."""
        rvec = self.rvec
        for i in range(self.size):
            h = rvec[i].msg_hdr
            h.msg_namelen = SOCKADDR_IN_LEN
            if self.pktinfo:
                h.msg_controllen = CMSG_SPACE
        n: int = _libc.recvmmsg(fd, rvec, self.size, MSG_DONTWAIT, _ffi.NULL)
        if n < 0:
            err = _ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        return n

    def length(self, i: int) -> int:
        """Bytes received in datagram I (the kernel's count, after any truncation)."""
        h = self.rvec[i]
        n: int = h.msg_len
        if h.msg_hdr.msg_flags & socket.MSG_TRUNC:
            return self.bufsize + 1  # longer than any buffer: never a valid request
        return n

    def payload(self, i: int, n: int) -> bytes:
        off = i * self.bufsize
        return bytes(self.data[off:off + n])

    def source(self, i: int) -> bytes:
        """The source as 4-byte IPv4 + 2-byte port, network order."""
        off = i * SOCKADDR_IN_LEN
        names = self.names
        return bytes(names[off + 4:off + 8] + names[off + 2:off + 4])

    def local_address(self, i: int) -> bytes | None:
        """The address datagram I was sent to (needs ``pktinfo``), 4 bytes, or None."""
        if not self.pktinfo or self.rvec[i].msg_hdr.msg_controllen < CMSG_HDR_LEN + PKTINFO_LEN:
            return None
        off = i * CMSG_SPACE + CMSG_HDR_LEN + 8  # in_pktinfo.ipi_addr
        return bytes(self.ctrl[off:off + 4])

    def queue_reply(self, i: int, reply: bytes) -> None:
        """Queue REPLY to the source of datagram I, from the address it was sent to."""
        j = self._pending
        off = j * self.bufsize
        self.out[off:off + len(reply)] = reply
        self.siov[j].iov_len = len(reply)
        s = self.svec[j].msg_hdr
        s.msg_name = self._nptr + i * SOCKADDR_IN_LEN
        s.msg_namelen = SOCKADDR_IN_LEN
        if self.pktinfo and self.rvec[i].msg_hdr.msg_controllen >= CMSG_HDR_LEN + PKTINFO_LEN:
            # Reuse the received IP_PKTINFO: any interface (ifindex 0), and the request's
            # destination address (ipi_addr) as the reply's source (ipi_spec_dst).
            c = i * CMSG_SPACE + CMSG_HDR_LEN
            ctrl = self.ctrl
            ctrl[c:c + 8] = bytes(4) + ctrl[c + 8:c + 12]
            s.msg_control = self._cptr + i * CMSG_SPACE
            s.msg_controllen = CMSG_SPACE
        else:
            s.msg_control = _ffi.NULL
            s.msg_controllen = 0
        self._pending = j + 1

    def flush(self, fd: int) -> tuple[int, int]:
        """Send the queued replies; return (sent, failed). Never raises for a full buffer."""
        total, sent, failed = self._pending, 0, 0
        self._pending = 0
        while sent + failed < total:
            n = _libc.sendmmsg(fd, self.svec + sent + failed, total - sent - failed, MSG_DONTWAIT)
            if n > 0:
                sent += n
                continue
            err = _ffi.errno
            if err == errno.EINTR:
                continue
            failed += 1  # skip the datagram that could not be sent (unreachable, full, ...)
        return sent, failed
