"""RESP2 codec: commands encode exactly; replies parse whole, byte by byte and in pieces."""

from __future__ import annotations

import random

import pytest

from rendezvous.resp import Parser, ProtocolError, ReplyError, encode, encode_many

STREAM = (b"+OK\r\n-ERR wrong type\r\n:42\r\n:-1\r\n$5\r\nhe\r\no\r\n$0\r\n\r\n$-1\r\n"
          b"*3\r\n$1\r\na\r\n$-1\r\n*2\r\n:1\r\n+x\r\n*-1\r\n*0\r\n")
VALUES = ["OK", ReplyError("ERR wrong type"), 42, -1, b"he\r\no", b"", None,
          [b"a", None, [1, "x"]], None, []]


def test_encode_is_resp_arrays_of_bulk_strings():
    assert encode([b"SET", "k", 5]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    assert encode([b"GET", b"\x00\r\n"]) == b"*2\r\n$3\r\nGET\r\n$3\r\n\x00\r\n\r\n"
    assert encode_many([["PING"], ["PING"]]) == b"*1\r\n$4\r\nPING\r\n" * 2
    with pytest.raises(ValueError):
        encode([])
    with pytest.raises(TypeError):
        encode(["SET", 1.5])
    with pytest.raises(TypeError):
        encode(["SET", True])


def test_whole_stream_parses_in_order():
    p = Parser()
    p.feed(STREAM)
    assert list(p.replies()) == VALUES and p.buffered == 0


def test_byte_by_byte_and_random_pieces_give_the_same_replies():
    p = Parser()
    got = []
    for i in range(len(STREAM)):
        p.feed(STREAM[i:i + 1])
        got += list(p.replies())
    assert got == VALUES
    rnd = random.Random(7)
    for _ in range(50):
        p, got, i = Parser(), [], 0
        while i < len(STREAM):
            j = i + rnd.randint(1, 9)
            p.feed(STREAM[i:j])
            got += list(p.replies())
            i = j
        assert got == VALUES


def test_an_incomplete_reply_waits_for_more():
    p = Parser()
    p.feed(b"$10\r\nabc")
    assert list(p.replies()) == [] and p.buffered == 8
    p.feed(b"defghij\r\n")
    assert list(p.replies()) == [b"abcdefghij"]


@pytest.mark.parametrize("bad", [b"?x\r\n", b":abc\r\n", b"$-5\r\n", b"$3\r\nabcXY",
                                 b"*-7\r\n", b"+" + b"x" * 70000])
def test_garbage_is_a_protocol_error(bad):
    p = Parser()
    p.feed(bad)
    with pytest.raises(ProtocolError):
        list(p.replies())
