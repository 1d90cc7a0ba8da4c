import pytest

from rendezvous.classic import (REQUEST_LEN, ClassicError, Endpoint, Request, decode_reply,
                                encode_reply, format_endpoint, short_key)

A = bytes(range(32))
B = bytes(range(32, 64))


def test_request_vector():
    raw = bytes(range(64))
    req = Request.from_bytes(raw)
    assert req.my_key == A and req.their_key == B
    assert req.to_bytes() == raw
    assert len(raw) == REQUEST_LEN


@pytest.mark.parametrize("n", [0, 1, 32, 63, 65, 128])
def test_request_wrong_length(n):
    with pytest.raises(ClassicError, match=f"must be 64 bytes, got {n}"):
        Request.from_bytes(bytes(n))


def test_request_key_length_checked():
    with pytest.raises(ClassicError, match="their_key must be 32 bytes, got 31"):
        Request(A, B[:31])


def test_reply_vectors():
    # 203.0.113.7:51820 -> cb 00 71 07 ca 6c
    assert encode_reply(Endpoint("203.0.113.7", 51820)) == bytes.fromhex("cb007107ca6c")
    assert decode_reply(bytes.fromhex("cb007107ca6c")) == Endpoint("203.0.113.7", 51820)
    assert encode_reply(None) == b""
    assert decode_reply(b"") is None


@pytest.mark.parametrize("n", [1, 5, 7, 64])
def test_reply_wrong_length(n):
    with pytest.raises(ClassicError, match=f"got {n}"):
        decode_reply(bytes(n))


def test_endpoint_round_trip_edges():
    for ep in (Endpoint("0.0.0.0", 0), Endpoint("255.255.255.255", 65535), Endpoint("10.0.0.1", 1)):
        assert Endpoint.unpack(ep.packed()) == ep
        assert str(ep) == f"{ep.ip}:{ep.port}"


@pytest.mark.parametrize("ip,port", [("1.2.3", 1), ("::1", 1), ("1.2.3.4", 70000), ("1.2.3.4", -1)])
def test_endpoint_invalid(ip, port):
    with pytest.raises(ClassicError):
        Endpoint(ip, port)


def test_formatting_helpers():
    assert format_endpoint(bytes([198, 51, 100, 1]) + (40000).to_bytes(2, "big")) == "198.51.100.1:40000"
    assert short_key(bytes(32)) == "AAAAAAAA…"
