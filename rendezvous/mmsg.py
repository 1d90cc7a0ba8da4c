"""Batch datagram I/O for IPv4 UDP sockets: recvmmsg(2)/sendmmsg(2) through cffi.

cffi runs in ABI mode (``dlopen`` of the C library; nothing is compiled at install).
One ``Batch`` owns fixed buffers for up to ``size`` datagrams: their payloads, their
``sockaddr_in`` source addresses and, optionally, an ``IP_PKTINFO`` control message each
so that a reply can leave from the address the request was sent to. The buffers are laid
out so that a batch of 64-byte requests can be handed to a bulk handler
(:class:`rendezvous.batch.ClassicBatch`) as two contiguous byte ranges, and its replies
sent back with fixed send headers: see :class:`Batch`.

Speed: cffi attribute access costs ~0.1-0.2 µs per field, which made per-datagram
bookkeeping cost more than the protocol work. The kernel's ``struct mmsghdr`` arrays
are therefore read and written through plain ``memoryview``s of 32- and 64-bit words
at offsets cffi computed once, and only the headers the last call used are reset.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["MMSG_AVAILABLE", "Batch", "BulkHandler", "Handler"]

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

# How long one batch's replies may wait for room in a full send buffer before the rest
# of them are dropped (and counted). Replies queued behind a slow link stay charged to
# the socket until they leave; waiting briefly lets a burst through, waiting longer would
# only stall the requests behind it.
SEND_WAIT = 0.05

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20  # as a recv flag: msg_len is the datagram's real length, not what fit
_RECV_FLAGS = MSG_DONTWAIT | MSG_TRUNC
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


class PackedReplies(Protocol):
    """What a bulk handler returns (see :class:`rendezvous.batch.PackedReplies`)."""

    @property
    def records(self) -> bytes: ...

    @property
    def lengths(self) -> list[int] | None: ...


BulkHandler = Callable[[memoryview, bytearray, float], "PackedReplies | None"]

HEAD = 64  # the first HEAD bytes of every datagram land back to back in Batch.head
MIN_PIECE = 8  # shorter runs of 64-byte datagrams are not worth a bulk call


class SendWait:
    """Waits for room in a full send buffer, at most SEND_WAIT seconds in all: one per
    batch of replies (or per read call of the plain path)."""

    def __init__(self) -> None:
        self.deadline = 0.0

    def wait(self, fd: int) -> bool:
        """Wait until FD's send buffer has room again; False once the time is used up."""
        now = time.monotonic()
        self.deadline = self.deadline or now + SEND_WAIT
        if now >= self.deadline:
            return False
        p = select.poll()
        p.register(fd, select.POLLOUT)
        return bool(p.poll((self.deadline - now) * 1000))


def _unpack_replies(res: PackedReplies) -> list[bytes]:
    records, n = res.records, len(res.records) // 8
    lengths = res.lengths or [6] * n
    return [records[8 * i + 2:8 * i + 2 + length] for i, length in enumerate(lengths)]


class Batch:
    """Buffers for ``size`` datagrams of at most ``bufsize`` bytes each.

    Layout, so that a whole batch can be read and answered with a few slice operations:
    the first 64 bytes of datagram i land at ``head[64 * i:]`` (iovec 0) and the rest,
    if any, at ``tail[(bufsize - 64) * i:]`` (iovec 1); its ``sockaddr_in`` source at
    ``names[16 * i:]``. recvmmsg runs with MSG_TRUNC, so ``msg_len`` is the datagram's
    real length even when it did not fit. Two sets of send headers: ``fvec`` answers
    datagram i with header i (to ``names[16 * i:]``, 6 or 0 bytes from
    ``packed[8 * i + 2:]``) and never changes but for its lengths; ``svec`` is filled one
    reply at a time for any other batch.
    """

    def __init__(self, size: int = 64, bufsize: int = 2048, pktinfo: bool = False) -> None:
        if not MMSG_AVAILABLE:
            raise OSError("recvmmsg/sendmmsg are not available on this platform")
        if bufsize <= HEAD:
            raise ValueError(f"bufsize must be more than {HEAD}, got {bufsize}")
        ffi = _ffi
        self.size, self.bufsize, self.pktinfo = size, bufsize, pktinfo
        self.tailsize = tailsize = bufsize - HEAD
        self.head = bytearray(size * HEAD)
        self.tail = bytearray(size * tailsize)
        self.names = bytearray(size * SOCKADDR_IN_LEN)
        self.ctrl = bytearray(size * CMSG_SPACE) if pktinfo else bytearray(0)
        self.out = bytearray(size * bufsize)
        self.packed = bytearray(size * 8)
        self.rvec = ffi.new("struct mmsghdr[]", size)
        self.svec = ffi.new("struct mmsghdr[]", size)
        self.fvec = ffi.new("struct mmsghdr[]", size)
        riov = ffi.new("struct iovec[]", 2 * size)
        siov = ffi.new("struct iovec[]", size)
        fiov = ffi.new("struct iovec[]", size)
        hptr, tptr, nptr, optr, pptr = (ffi.from_buffer(b) for b in (
            self.head, self.tail, self.names, self.out, self.packed))
        cptr = ffi.from_buffer(self.ctrl) if pktinfo else ffi.NULL
        self._keep = (riov, siov, fiov, hptr, tptr, nptr, optr, pptr, cptr)
        for i in range(size):
            riov[2 * i].iov_base = hptr + i * HEAD
            riov[2 * i].iov_len = HEAD
            riov[2 * i + 1].iov_base = tptr + i * tailsize
            riov[2 * i + 1].iov_len = tailsize
            siov[i].iov_base = optr + i * bufsize
            fiov[i].iov_base = pptr + i * 8 + 2
            fiov[i].iov_len = 6
            r = self.rvec[i].msg_hdr
            r.msg_name = nptr + i * SOCKADDR_IN_LEN
            r.msg_namelen = SOCKADDR_IN_LEN
            r.msg_iov = riov + 2 * i
            r.msg_iovlen = 2
            s = self.svec[i].msg_hdr
            s.msg_iov = siov + i
            s.msg_iovlen = 1
            s.msg_namelen = SOCKADDR_IN_LEN
            f = self.fvec[i].msg_hdr
            f.msg_name = nptr + i * SOCKADDR_IN_LEN
            f.msg_namelen = SOCKADDR_IN_LEN
            f.msg_iov = fiov + i
            f.msg_iovlen = 1
            if pktinfo:
                r.msg_control = f.msg_control = cptr + i * CMSG_SPACE
                r.msg_controllen = f.msg_controllen = CMSG_SPACE
        stride = ffi.sizeof("struct mmsghdr")
        assert stride % 8 == 0
        self._stride4, self._stride8 = stride // 4, stride // 8
        self._r4 = memoryview(ffi.buffer(self.rvec)).cast("I")
        self._s8 = memoryview(ffi.buffer(self.svec)).cast("Q")
        self._siov8 = memoryview(ffi.buffer(siov)).cast("Q")
        self._fiov8 = memoryview(ffi.buffer(fiov)).cast("Q")
        self._c4 = memoryview(self.ctrl).cast("I")
        self._headv = memoryview(self.head)
        self._namelen4, self._msglen4 = _word("msg_namelen", 4), _word("msg_len", 4)
        self._controllen4 = _word("msg_controllen", 4)
        self._s_name8 = _word("msg_name", 8)
        self._s_control8 = _word("msg_control", 8)
        self._s_controllen8 = _word("msg_controllen", 8)
        self._iov_len8 = ffi.offsetof("struct iovec", "iov_len") // 8
        self._iov_stride8 = ffi.sizeof("struct iovec") // 8
        assert self._iov_stride8 == 2 and self._iov_len8 == 1
        self._name_addr = int(ffi.cast("uintptr_t", nptr))
        self._ctrl_addr = int(ffi.cast("uintptr_t", cptr)) if pktinfo else 0
        self._namelens = array("I", [SOCKADDR_IN_LEN] * size)
        self._ctrllens = array("I", [CMSG_SPACE] * size)
        self._sixes = array("Q", [6] * size)
        self._zeros = array("I", [0] * size)
        self._fast_sixes = size  # fvec's first iov lengths known to be 6
        self._used = size

    def recv(self, fd: int) -> int:
        """Receive up to ``size`` datagrams without blocking; return how many (0: none)."""
        r4, st, used = self._r4, self._stride4, self._used
        if used:  # the kernel rewrote these in the headers it filled
            r4[self._namelen4:used * st:st] = self._namelens[:used]
            if self.pktinfo:
                r4[self._controllen4:used * st:st] = self._ctrllens[:used]
        n: int = _libc.recvmmsg(fd, self.rvec, self.size, _RECV_FLAGS, _ffi.NULL)
        if n < 0:
            self._used = 0
            err = _ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        self._used = n
        return n

    def datagram(self, i: int, length: int) -> bytes:
        """Datagram I of the last batch; one byte longer than the buffer if truncated."""
        off = i * HEAD
        if length <= HEAD:
            return bytes(self.head[off:off + length])
        toff = i * self.tailsize
        if length <= self.bufsize:
            return bytes(self.head[off:off + HEAD]) + self.tail[toff:toff + length - HEAD]
        return bytes(self.head[off:off + HEAD]) + self.tail[toff:toff + self.tailsize] + b"\0"

    def sources(self, n: int) -> bytearray:
        """The packed sources (4-byte IPv4 + 2-byte port) of datagrams 0..N-1, back to
        back, taken from their sockaddr_in (port at bytes 2-3, address at 4-7)."""
        names, end = self.names, n * SOCKADDR_IN_LEN
        src = bytearray(6 * n)
        for j, k in enumerate((4, 5, 6, 7, 2, 3)):
            src[j::6] = names[k:end:SOCKADDR_IN_LEN]
        return src

    def exchange(self, fd: int, handle: Handler, now: float,
                 bulk: BulkHandler | None = None) -> tuple[int, int, int]:
        """Receive a batch and answer it: if every datagram is 64 bytes long, first ask
        BULK(heads, sources, now) for all the replies at once; else (or if it returns
        None) pass each datagram to HANDLE(data, source, now). Replies go back to each
        request's source, from its destination address. Returns (received, sent, failed)."""
        n = self.recv(fd)
        if n == 0:
            return 0, 0, 0
        st = self._stride4
        lengths = self._r4[self._msglen4:n * st:st].tolist()
        if bulk is not None and lengths.count(HEAD) == n and (
                not self.pktinfo or self._pktinfo_ok(n)):
            res = bulk(self._headv[:n * HEAD], self.sources(n), now)
            if res is not None:
                self.packed[:8 * n] = res.records
                fiov8 = self._fiov8
                if res.lengths is None:
                    if self._fast_sixes < n:
                        fiov8[1:2 * n:2] = self._sixes[:n]
                        self._fast_sixes = n
                else:
                    fiov8[1:2 * n:2] = array("Q", res.lengths)
                    self._fast_sixes = 0
                if self.pktinfo:  # reply from the request's destination: spec_dst = addr
                    c4, end = self._c4, n * (CMSG_SPACE // 4)
                    c4[4:end:8] = self._zeros[:n]  # any interface
                    c4[5:end:8] = c4[6:end:8]
                sent, failed = self._send(fd, n, self.fvec)
                return n, sent, failed
        return (n, *self._exchange_each(fd, n, lengths, handle, bulk, now))

    def _pktinfo_ok(self, n: int) -> bool:
        st = self._stride4
        return self._r4[self._controllen4:n * st:st].tolist().count(CMSG_SPACE) == n

    def _exchange_each(self, fd: int, n: int, lengths: list[int], handle: Handler,
                       bulk: BulkHandler | None, now: float) -> tuple[int, int]:
        """Answer a batch that is not all 64-byte requests, or that BULK declined: runs of
        at least MIN_PIECE 64-byte datagrams still go to BULK (halved on a decline, so one
        odd request does not cost the whole batch its bulk path), everything else to
        HANDLE one datagram at a time, all in arrival order."""
        replies: list[bytes | None] = []
        sources = self.sources(n) if bulk is not None else bytearray()
        i = 0
        while i < n:
            j = i
            if bulk is not None:
                while j < n and lengths[j] == HEAD:
                    j += 1
            if j - i >= MIN_PIECE and bulk is not None:
                self._pieces(i, j, sources, handle, bulk, now, replies)
                i = j
                continue
            for k in range(i, max(j, i + 1)):
                replies.append(handle(self.datagram(k, lengths[k]), self._source(k), now))
            i = max(j, i + 1)
        return self._send_replies(fd, replies)

    def _pieces(self, lo: int, hi: int, sources: bytearray, handle: Handler,
                bulk: BulkHandler, now: float, replies: list[bytes | None]) -> None:
        """Datagrams lo..hi-1, all 64 bytes: in bulk, else as two halves, else one by one."""
        res = bulk(self._headv[lo * HEAD:hi * HEAD], sources[6 * lo:6 * hi], now)
        if res is not None:
            replies.extend(_unpack_replies(res))
        elif hi - lo >= 2 * MIN_PIECE:
            mid = (lo + hi) // 2
            self._pieces(lo, mid, sources, handle, bulk, now, replies)
            self._pieces(mid, hi, sources, handle, bulk, now, replies)
        else:
            for k in range(lo, hi):
                replies.append(handle(self.datagram(k, HEAD), self._source(k), now))

    def _source(self, i: int) -> bytes:
        """The packed source of datagram I (4-byte IPv4 + 2-byte port)."""
        noff = i * SOCKADDR_IN_LEN
        return bytes(self.names[noff + 4:noff + 8]) + self.names[noff + 2:noff + 4]

    def _send_replies(self, fd: int, replies: list[bytes | None]) -> tuple[int, int]:
        """Send reply i (unless None) to datagram i's source, compacted into svec."""
        s8, st8, sname, = self._s8, self._stride8, self._s_name8
        siov8, ilen, ist = self._siov8, self._iov_len8, self._iov_stride8
        out, bufsize = self.out, self.bufsize
        name_addr, pktinfo = self._name_addr, self.pktinfo
        j = 0
        for i, reply in enumerate(replies):
            if reply is None:
                continue
            ooff = j * bufsize
            out[ooff:ooff + len(reply)] = reply
            siov8[j * ist + ilen] = len(reply)
            s8[j * st8 + sname] = name_addr + i * SOCKADDR_IN_LEN
            if pktinfo:
                self._reply_pktinfo(i, j)
            j += 1
        return self._send(fd, j, self.svec)

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

    def _send(self, fd: int, total: int, vec: Any) -> tuple[int, int]:
        """Send the first TOTAL prepared messages of VEC; (sent, failed). Never raises: a
        datagram the kernel refuses (an unreachable destination, ...) is skipped and
        counted; a full send buffer is waited for, at most SEND_WAIT seconds in all, and
        what still does not fit is counted too."""
        done = sent = failed = 0
        room: SendWait | None = None
        while done < total:
            k = _libc.sendmmsg(fd, vec + done, total - done, MSG_DONTWAIT)
            if k > 0:
                sent += k
                done += k
                continue
            err = _ffi.errno
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                room = room or SendWait()
                if room.wait(fd):
                    continue
                failed += total - done
                break
            failed += 1
            done += 1
        return sent, failed
