"""The shared store's pure parts: URLs, key names, value codecs, classic commands."""

from __future__ import annotations

import pytest

from rendezvous.store import (
    Keys,
    Notice,
    SharedRegistration,
    StoreError,
    StoreURL,
    classic_commands,
    classic_results,
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


def test_classic_commands_and_results():
    cmds = classic_commands(Keys(), [(A, EP4)], [B, A], 180000)
    assert cmds == [[b"SET", b"wgpunch:c:" + A, EP4, b"PX", 180000],
                    [b"MGET", b"wgpunch:c:" + B, b"wgpunch:c:" + A]]
    assert classic_results(["OK", [None, EP4]], 2) == [None, EP4]
    assert classic_results(["OK"], 0) == []
    with pytest.raises(StoreError):
        classic_results(["OK", [b"short"]], 1)  # not a 6-byte endpoint
    with pytest.raises(StoreError):
        classic_results(["OK", [EP4]], 2)
    with pytest.raises(StoreError):
        classic_results([ValueError("READONLY"), [EP4]], 1)  # a refused SET


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
