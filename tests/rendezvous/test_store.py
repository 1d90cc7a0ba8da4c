"""The shared store's pure parts: URLs, key names, value codecs, classic commands."""

from __future__ import annotations

import pytest

from rendezvous.resp import Parser, ReplyError
from rendezvous.store import (
    Keys,
    Notice,
    SharedRegistration,
    StoreError,
    StoreURL,
    CLASSIC_SHA,
    ScriptMissing,
    classic_payload,
    classic_values,
    decode_endpoints,
    encode_endpoints,
    parse_store_url,
    valid_server_id,
)

A, B = b"A" * 32, b"B" * 32
EP4 = bytes([192, 0, 2, 1, 0xC3, 0x50])
EP6 = bytes(range(16)) + b"\x01\x02"


@pytest.mark.parametrize("text, url", [
    ("redis://127.0.0.1", StoreURL("127.0.0.1", 6379, 0)),
    ("redis://10.0.0.5:7000/3", StoreURL("10.0.0.5", 7000, 3)),
    ("redis://[::1]:6380/1", StoreURL("::1", 6380, 1)),
    ("redis://:s%40cret@db.example:6379/0", StoreURL("db.example", 6379, 0, "s@cret")),
])
def test_urls(text, url):
    assert parse_store_url(text) == url
    assert "cret" not in str(parse_store_url(text))  # never the password in logs


@pytest.mark.parametrize("text", ["http://h", "redis://", "redis://h:99999", "redis://h/x",
                                  "redis://h/0?a=1", "h:6379"])
def test_bad_urls_name_the_value(text):
    with pytest.raises(StoreError, match="--store"):
        parse_store_url(text)


def test_key_names_are_prefixed_and_pairs_unordered():
    k = Keys("p:")
    assert k.classic(A) == b"p:c:" + A
    assert k.reg(A, 4) == b"p:r4:" + A and k.reg(A, 6) == b"p:r6:" + A
    assert k.ask(A, B) == b"p:a:" + A + B != k.ask(B, A)
    assert k.relay(A, B) == k.relay(B, A)
    assert k.channel("host:12") == b"p:n:host:12"


def test_classic_payload_is_one_evalsha_with_every_key_and_endpoint():
    p = Parser()
    p.feed(classic_payload(Keys("p:"), [A, B], EP4 + EP4[::-1], [B, A, A], 180000))
    (cmd,) = list(p.replies())  # a RESP command is an array of bulk strings, like a reply
    assert cmd == [b"EVALSHA", CLASSIC_SHA, b"5",
                   b"p:c:" + A, b"p:c:" + B, b"p:c:" + B, b"p:c:" + A, b"p:c:" + A,
                   b"180000", b"2", EP4, EP4[::-1]]
    p.feed(classic_payload(Keys(), [], b"", [], 1))
    assert list(p.replies()) == [[b"EVALSHA", CLASSIC_SHA, b"0", b"1", b"0"]]
    with pytest.raises(ValueError):
        classic_payload(Keys(), [A], b"short", [], 1)
    with pytest.raises(ValueError):
        classic_payload(Keys(), [A[:31]], EP4, [], 1)


def test_classic_values():
    assert classic_values(EP4 + bytes(6) + EP4, 3) == [EP4, None, EP4]
    assert classic_values(b"", 0) == []
    with pytest.raises(ScriptMissing):
        classic_values(ReplyError("NOSCRIPT No matching script."), 1)
    with pytest.raises(StoreError):
        classic_values(ReplyError("ERR something"), 1)
    with pytest.raises(StoreError):
        classic_values(EP4, 2)  # not 6 bytes per lookup
    with pytest.raises(StoreError):
        classic_values([EP4], 1)


def test_registration_round_trip_and_malformed():
    for r in (SharedRegistration(EP4, None, 2, "srv-1"),
              SharedRegistration(EP6, bytes(16), 0, "h:1-w0"),
              SharedRegistration(EP4, bytes([192, 0, 2, 9]), 255, "x")):
        assert SharedRegistration.decode(r.encode()) == r
    good = SharedRegistration(EP4, None, 1, "s").encode()
    for bad in (b"", good[:5], good[:-1], b"\x00\x07" + good[2:], good[:-1] + b" "):
        with pytest.raises(StoreError):
            SharedRegistration.decode(bad)


def test_endpoint_lists_and_notices():
    for eps in ((), (EP4,), (EP6,), (EP6, EP4)):
        assert decode_endpoints(encode_endpoints(eps)) == eps
    with pytest.raises(StoreError):
        decode_endpoints(b"x" * 7)
    n = Notice(EP6, b"datagram", bytes(16))
    assert Notice.decode(n.encode()) == n
    assert Notice.decode(Notice(EP4, b"d").encode()) == Notice(EP4, b"d", None)
    for bad in (b"", b"\x06", b"\x05\x00" + EP4 + b"d", b"\x06\x03" + EP4 + b"abc",
                Notice(EP4, b"").encode()):
        with pytest.raises(StoreError):
            Notice.decode(bad)


def test_server_ids():
    assert valid_server_id("host-1.example:1234@w0")
    assert not valid_server_id("") and not valid_server_id("a b") and not valid_server_id("x" * 65)
