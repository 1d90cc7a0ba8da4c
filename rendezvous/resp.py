"""RESP2, the Redis serialization protocol: commands out, replies in.

Pure: :func:`encode` turns commands into bytes and :class:`Parser` turns received bytes
into replies, incrementally (feed it whatever the socket returned; it yields each reply
once it is complete). No I/O here; :mod:`rendezvous.redisstore` owns the sockets.

A command is a sequence of bulk strings (bytes, str or int). Replies map to Python as:
simple string ``+OK`` -> ``str``; error ``-ERR ...`` -> :class:`ReplyError` (returned as
a value, not raised, so one bad command in a pipeline does not hide the others);
integer -> ``int``; bulk string -> ``bytes`` (``None`` for the null bulk ``$-1``);
array -> ``list`` (``None`` for ``*-1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["Parser", "ProtocolError", "ReplyError", "encode", "encode_many"]

Arg = bytes | str | int
Reply = str | int | bytes | list | None

_MAX_BULK = 512 << 20  # Redis's own limit for a bulk string
_MAX_ARRAY = 1 << 24


class ProtocolError(ValueError):
    """The byte stream is not RESP2 (the connection must be dropped)."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``); its text is the message."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplyError) and self.args == other.args

    def __hash__(self) -> int:
        return hash(self.args)


def _arg(a: Arg) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, int) and not isinstance(a, bool):
        return b"%d" % a
    raise TypeError(f"a RESP argument must be bytes, str or int, got {type(a).__name__}")


def encode(command: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    if not command:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(command)]
    for a in command:
        b = _arg(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def encode_many(commands: Iterable[Sequence[Arg]]) -> bytes:
    """A pipeline: the commands back to back."""
    return b"".join(map(encode, commands))


class Parser:
    """Incremental reply parser: ``feed(data)`` then iterate :meth:`replies`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos > 65536 and self._pos > len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a complete reply."""
        return len(self._buf) - self._pos

    def replies(self) -> Iterator[Reply | ReplyError]:
        """Every complete reply buffered so far, in order."""
        while True:
            parsed = self._parse(self._pos)
            if parsed is None:
                return
            value, self._pos = parsed
            yield value

    def _line(self, pos: int) -> tuple[bytes, int] | None:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > 65536:
                raise ProtocolError("a RESP line longer than 64 KiB")
            return None
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[Reply | ReplyError, int] | None:
        if pos >= len(self._buf):
            return None
        kind = self._buf[pos]
        got = self._line(pos + 1)
        if got is None:
            return None
        line, pos = got
        if kind == 0x2B:  # +
            return line.decode("utf-8", "replace"), pos
        if kind == 0x2D:  # -
            return ReplyError(line.decode("utf-8", "replace")), pos
        try:
            n = int(line)
        except ValueError:
            raise ProtocolError(f"bad RESP length or integer {line[:32]!r}") from None
        if kind == 0x3A:  # :
            return n, pos
        if kind == 0x24:  # $
            if n == -1:
                return None, pos
            if not 0 <= n <= _MAX_BULK:
                raise ProtocolError(f"bad RESP bulk length {n}")
            if len(self._buf) < pos + n + 2:
                return None
            if self._buf[pos + n:pos + n + 2] != b"\r\n":
                raise ProtocolError("a RESP bulk string without its CRLF")
            return bytes(self._buf[pos:pos + n]), pos + n + 2
        if kind == 0x2A:  # *
            if n == -1:
                return None, pos
            if not 0 <= n <= _MAX_ARRAY:
                raise ProtocolError(f"bad RESP array length {n}")
            items: list[Reply | ReplyError] = []
            for _ in range(n):
                got2 = self._parse(pos)
                if got2 is None:
                    return None
                item, pos = got2
                items.append(item)
            return items, pos
        raise ProtocolError(f"unknown RESP type byte {kind:#04x}")
