"""rendezvous.v2.wire: vectors both ways, round trips, and every field's error."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest

from rendezvous.v2.wire import (
    ENDPOINT_LEN,
    HEADER_LEN,
    NONE_BYTES,
    NOTIFY_PLAIN_MIN,
    REPLY_PLAIN_MIN,
    REQUEST_LEN,
    REQUEST_PLAIN_LEN,
    Endpoint,
    MsgType,
    NotifyBody,
    ReplyBody,
    RequestBody,
    Status,
    WireError,
    endpoint_bytes,
    endpoint_or_none,
    header,
    looks_like_v2,
    notify_len,
    parse_header,
    reply_len,
)
from tests.rendezvous.v2 import make_vectors, vectors

Body = type[RequestBody] | type[ReplyBody] | type[NotifyBody]
BODY: dict[int, Body] = {1: RequestBody, 2: ReplyBody, 3: NotifyBody}
KEY_A = bytes(range(32))
V4 = Endpoint("203.0.113.9", 40000)
V6 = Endpoint("2001:db8::7", 51820)


# ---------------------------------------------------------------- vectors


def test_stored_vectors_match_the_generator() -> None:
    assert vectors.PATH.read_text() == make_vectors.render()


@pytest.mark.parametrize("m", vectors.messages(), ids=lambda m: m["name"])
def test_vector_plaintext_decodes_to_its_fields(m: dict) -> None:
    plain = bytes.fromhex(m["plaintext"])
    assert BODY[m["type"]].from_bytes(plain) == vectors.body(m)


@pytest.mark.parametrize("m", vectors.messages(canonical=True), ids=lambda m: m["name"])
def test_vector_fields_encode_to_its_plaintext(m: dict) -> None:
    assert vectors.body(m).to_bytes() == bytes.fromhex(m["plaintext"])


@pytest.mark.parametrize("m", vectors.messages(), ids=lambda m: m["name"])
def test_vector_header_and_length(m: dict) -> None:
    datagram = bytes.fromhex(m["datagram"])
    assert parse_header(datagram) == m["type"]
    assert datagram[:HEADER_LEN] == header(MsgType(m["type"]))
    assert looks_like_v2(datagram)
    assert len(datagram) == m["length"]
    if m["canonical"]:
        count = len(m["fields"].get("endpoints", ()))
        expected = {1: REQUEST_LEN, 2: reply_len(count), 3: notify_len(count)}[m["type"]]
        assert len(datagram) == expected


def test_vectors_cover_every_type_and_status() -> None:
    assert {m["type"] for m in vectors.messages()} == {1, 2, 3}
    assert {m["fields"]["status"] for m in vectors.messages(t=2)} == {0, 1, 2}
    assert {len(m["fields"]["endpoints"]) for m in vectors.messages(t=2)} == {0, 1, 2}
    assert {len(m["fields"]["endpoints"]) for m in vectors.messages(t=3)} == {1, 2}


# ---------------------------------------------------------------- header


def test_header_bytes() -> None:
    assert header(MsgType.REQUEST) == b"wgp\x02\x01\x00\x00\x00"
    assert header(MsgType.REPLY) == b"wgp\x02\x02\x00\x00\x00"
    assert header(MsgType.NOTIFY) == b"wgp\x02\x03\x00\x00\x00"
    assert header(MsgType.RELAY) == b"wgp\x02\x04\x00\x00\x00"
    assert header(MsgType.BIND) == b"wgp\x02\x05\x00\x00\x00"
    with pytest.raises(WireError, match="type 6"):
        header(6)  # type: ignore[arg-type]


@pytest.mark.parametrize("t", list(MsgType))
def test_parse_header_accepts_each_type(t: MsgType) -> None:
    assert parse_header(header(t)) is t
    assert parse_header(header(t) + b"anything after") is t
    assert parse_header(memoryview(header(t))) is t


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "datagram of 0 bytes is shorter than the 8-byte header"),
        (b"wgp\x02\x01\x00\x00", "datagram of 7 bytes is shorter"),
        (b"wgq\x02\x01\x00\x00\x00", "magic 776771 is not 776770"),
        (b"WGP\x02\x01\x00\x00\x00", "magic 574750 is not 776770"),
        (b"wgp\x01\x01\x00\x00\x00", "version 1 is not 2"),
        (b"wgp\x03\x01\x00\x00\x00", "version 3 is not 2"),
        (b"wgp\x02\x00\x00\x00\x00", r"type 0 is not a known message type \(1..5\)"),
        (b"wgp\x02\x06\x00\x00\x00", "type 6 is not"),
        (b"wgp\x02\xff\x00\x00\x00", "type 255 is not"),
        (b"wgp\x02\x01\x01\x00\x00", "reserved header bytes 010000 are not zero"),
        (b"wgp\x02\x01\x00\x80\x00", "reserved header bytes 008000 are not zero"),
        (b"wgp\x02\x01\x00\x00\xff", "reserved header bytes 0000ff are not zero"),
    ],
)
def test_parse_header_errors(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse_header(data + bytes(100) if len(data) == HEADER_LEN else data)


def test_looks_like_v2() -> None:
    good = header(MsgType.REQUEST) + bytes(REQUEST_LEN - HEADER_LEN)
    assert looks_like_v2(good)
    assert looks_like_v2(good[:65])
    assert not looks_like_v2(good[:64])  # 64 bytes is always classic
    assert not looks_like_v2(b"wgp\x01" + good[4:])
    assert not looks_like_v2(b"xgp\x02" + good[4:])
    assert not looks_like_v2(b"")
    assert looks_like_v2(b"wgp\x02" + bytes(61))  # cheap: type and reserved not checked here


# ---------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "given, ip, family, text",
    [
        ("1.2.3.4", "1.2.3.4", 4, "1.2.3.4:5"),
        ("::ffff:1.2.3.4", "1.2.3.4", 4, "1.2.3.4:5"),
        ("::FFFF:102:304", "1.2.3.4", 4, "1.2.3.4:5"),
        ("2001:DB8:0:0::1", "2001:db8::1", 6, "[2001:db8::1]:5"),
        ("::1", "::1", 6, "[::1]:5"),
        ("::", "::", 6, "[::]:5"),
        ("0.0.0.0", "0.0.0.0", 4, "0.0.0.0:5"),
    ],
)
def test_endpoint_normalises(given: str, ip: str, family: int, text: str) -> None:
    ep = Endpoint(given, 5)
    assert ep.ip == ip and ep.family == family and str(ep) == text
    assert ep == Endpoint(ip, 5) and hash(ep) == hash(Endpoint(ip, 5))
    assert Endpoint.parse(text) == ep
    assert Endpoint.from_bytes(ep.to_bytes()) == ep
    assert Endpoint.from_source(ep.source_bytes()) == ep


def test_endpoint_bytes_layout() -> None:
    assert Endpoint("1.2.3.4", 0x1234).to_bytes() == bytes(10) + b"\xff\xff\x01\x02\x03\x04\x12\x34"
    assert Endpoint("1.2.3.4", 0x1234).source_bytes() == b"\x01\x02\x03\x04\x12\x34"
    v6 = Endpoint("2001:db8::1", 51820)
    assert v6.to_bytes() == bytes.fromhex("20010db8000000000000000000000001") + struct.pack(
        "!H", 51820
    )
    assert v6.source_bytes() == v6.to_bytes()
    assert len(v6.to_bytes()) == ENDPOINT_LEN


def test_endpoint_from_source_mapped_is_ipv4() -> None:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d: that is IPv4 here.
    ep = Endpoint.from_source(bytes(10) + b"\xff\xff\x0a\x00\x00\x01\x00\x35")
    assert ep == Endpoint("10.0.0.1", 53) and ep.family == 4
    assert ep.source_bytes() == b"\x0a\x00\x00\x01\x00\x35"


def test_endpoint_none_helpers() -> None:
    assert NONE_BYTES == bytes(18)
    assert endpoint_or_none(NONE_BYTES) is None
    assert endpoint_bytes(None) == NONE_BYTES
    assert Endpoint.from_bytes(NONE_BYTES) == Endpoint("::", 0)
    assert (
        Endpoint("::", 0).is_none
        and not Endpoint("::", 1).is_none
        and not Endpoint("0.0.0.0", 0).is_none
    )
    assert endpoint_or_none(V6.to_bytes()) == V6
    assert endpoint_bytes(V4) == V4.to_bytes()
    with pytest.raises(WireError, match="endpoint must be 18 bytes, got 17"):
        endpoint_or_none(bytes(17))


@pytest.mark.parametrize(
    "ep, usable",
    [
        (V4, True),
        (V6, True),
        (Endpoint("::", 0), False),
        (Endpoint("::", 1), False),
        (Endpoint("0.0.0.0", 1), False),
        (Endpoint("1.2.3.4", 0), False),
        (Endpoint("::1", 1), True),
    ],
)
def test_endpoint_usable(ep: Endpoint, usable: bool) -> None:
    assert ep.usable is usable


def test_from_source_is_memoised_and_accepts_memoryview() -> None:
    packed = b"\x0a\x00\x00\x02\x01\xbb"
    assert Endpoint.from_source(packed) is Endpoint.from_source(memoryview(packed))
    assert Endpoint.from_source(bytearray(packed)) == Endpoint("10.0.0.2", 443)


def test_endpoint_random_bytes_round_trip() -> None:
    rng = random.Random(6)
    for _ in range(2000):
        raw = rng.randbytes(ENDPOINT_LEN)
        if rng.random() < 0.3:
            raw = bytes(10) + b"\xff\xff" + raw[12:]
        ep = Endpoint.from_bytes(raw)
        assert ep.to_bytes() == raw
        assert Endpoint(ep.ip, ep.port) == ep
        assert Endpoint.parse(str(ep)) == ep
        assert Endpoint.from_source(ep.source_bytes()) == ep


@pytest.mark.parametrize(
    "ip, port, message",
    [
        ("1.2.3", 1, r"endpoint ip '1.2.3' is not an IPv4 or IPv6 address"),
        ("1.2.3.256", 1, "endpoint ip '1.2.3.256' is not"),
        ("fe80::1%eth0", 1, r"endpoint ip 'fe80::1%eth0' is not"),
        ("example.com", 1, "is not an IPv4 or IPv6 address"),
        ("", 1, "endpoint ip '' is not"),
        ("1.2.3.4\0", 1, "is not an IPv4 or IPv6 address"),
        (b"1.2.3.4", 1, r"endpoint ip b'1.2.3.4' is not a string"),
        ("1.2.3.4", -1, r"endpoint port -1 is not an integer in 0..65535"),
        ("1.2.3.4", 65536, "endpoint port 65536 is not"),
        ("1.2.3.4", True, "endpoint port True is not"),
        ("1.2.3.4", "80", "endpoint port '80' is not"),
    ],
)
def test_endpoint_errors(ip: object, port: object, message: str) -> None:
    with pytest.raises(WireError, match=message):
        Endpoint(ip, port)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 5, 7, 16, 17, 19])
def test_endpoint_wrong_sizes(size: int) -> None:
    with pytest.raises(WireError, match=f"endpoint must be 18 bytes, got {size}"):
        Endpoint.from_bytes(bytes(size))
    if size not in (6, 18):
        with pytest.raises(WireError, match=f"packed source must be 6 or 18 bytes, got {size}"):
            Endpoint.from_source(bytes(size))


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4", "1.2.3.4:", "1.2.3.4:x", "::1:5", "[::1]5", "[::1]:", "1.2.3.4:-1", "[1.2.3.4]:5", "1.2.3.4:٣"],
)
def test_endpoint_parse_errors(text: str) -> None:
    with pytest.raises(WireError, match="is not ip:port or"):
        Endpoint.parse(text)


def test_endpoint_parse_port_range() -> None:
    with pytest.raises(WireError, match="endpoint port 65536"):
        Endpoint.parse("1.2.3.4:65536")


def test_endpoint_is_frozen() -> None:
    with pytest.raises(AttributeError):
        V4.port = 1  # type: ignore[misc]
    moved = dataclasses.replace(V4, port=1)
    assert moved == Endpoint(V4.ip, 1) and moved.to_bytes()[-2:] == b"\x00\x01"
    with pytest.raises(WireError, match="endpoint port 70000"):
        dataclasses.replace(V4, port=70000)


# ---------------------------------------------------------------- request body


def test_request_round_trip_and_layout() -> None:
    body = RequestBody(
        timestamp=0x0102030405060708, request_id=0x0A0B0C0D, peer=KEY_A, nat=7, flags=0
    )
    raw = body.to_bytes()
    assert len(raw) == REQUEST_PLAIN_LEN
    assert raw == bytes.fromhex("01020304050607080a0b0c0d00070000") + KEY_A
    assert RequestBody.from_bytes(raw) == body
    assert RequestBody.from_bytes(memoryview(raw)) == body
    assert RequestBody.from_bytes(raw + b"newer fields") == body


def test_request_ignores_reserved_bytes() -> None:
    raw = bytearray(RequestBody(1, 2, KEY_A).to_bytes())
    raw[14:16] = b"\xff\xff"
    assert RequestBody.from_bytes(bytes(raw)) == RequestBody(1, 2, KEY_A)


def test_request_extremes() -> None:
    body = RequestBody(2**64 - 1, 2**32 - 1, bytearray(KEY_A), 255, 255)  # type: ignore[arg-type]
    assert type(body.peer) is bytes
    assert RequestBody.from_bytes(body.to_bytes()) == body


@pytest.mark.parametrize("size", [0, 1, 16, 47])
def test_request_too_short(size: int) -> None:
    with pytest.raises(WireError, match=f"request plaintext of {size} bytes is shorter than 48"):
        RequestBody.from_bytes(bytes(size))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(timestamp=-1), r"timestamp -1 is not an integer in 0..18446744073709551615"),
        (dict(timestamp=2**64), "timestamp 18446744073709551616 is not"),
        (dict(timestamp=1.5), "timestamp 1.5 is not"),
        (dict(request_id=0), r"request_id 0 is not allowed \(must be non-zero\)"),
        (dict(request_id=2**32), r"request_id 4294967296 is not an integer in 0..4294967295"),
        (dict(peer=bytes(31)), "peer must be 32 bytes, got 31"),
        (dict(peer=bytes(33)), "peer must be 32 bytes, got 33"),
        (dict(peer="a" * 32), "peer must be 32 bytes, got str"),
        (dict(nat=256), r"nat 256 is not an integer in 0..255"),
        (dict(nat=-1), "nat -1 is not"),
        (dict(flags=256), "flags 256 is not"),
    ],
)
def test_request_field_errors(kwargs: dict, message: str) -> None:
    fields = dict(timestamp=1, request_id=1, peer=KEY_A, nat=0, flags=0) | kwargs
    with pytest.raises(WireError, match=message):
        RequestBody(**fields)


def test_request_zero_id_on_the_wire() -> None:
    raw = bytearray(RequestBody(1, 1, KEY_A).to_bytes())
    raw[8:12] = bytes(4)
    with pytest.raises(WireError, match="request_id 0"):
        RequestBody.from_bytes(bytes(raw))


# ---------------------------------------------------------------- reply body


@pytest.mark.parametrize("endpoints", [(), (V6,), (V6, V4), (V4,), (V4, V6)])
@pytest.mark.parametrize("observed", [None, V4, V6])
def test_reply_round_trip(endpoints: tuple, observed: Endpoint | None) -> None:
    body = ReplyBody(0xFFFFFFFF, Status.FOUND, 2**64 - 1, observed, endpoints, 255)
    raw = body.to_bytes()
    assert len(raw) == REPLY_PLAIN_MIN + ENDPOINT_LEN * len(endpoints)
    assert reply_len(len(endpoints)) == len(raw) + 36 <= REQUEST_LEN
    assert ReplyBody.from_bytes(raw) == body
    assert ReplyBody.from_bytes(raw + bytes(7)) == body


def test_reply_layout() -> None:
    raw = ReplyBody(0x01020304, Status.STALE, 0x1122334455667788, V4, (V6,), 9).to_bytes()
    assert raw[:16] == bytes.fromhex("01020304020901001122334455667788")
    assert raw[16:34] == V4.to_bytes() and raw[34:] == V6.to_bytes()


def test_reply_coerces_status_and_list() -> None:
    body = ReplyBody(1, 1, 0, None, [V6])  # type: ignore[arg-type]
    assert body.status is Status.PENDING and body.endpoints == (V6,)


def test_reply_ignores_reserved_byte_and_trailing() -> None:
    raw = bytearray(ReplyBody(1, Status.PENDING, 5, V4).to_bytes())
    raw[7] = 0xEE
    assert ReplyBody.from_bytes(bytes(raw) + b"x") == ReplyBody(1, Status.PENDING, 5, V4)


@pytest.mark.parametrize("size", [0, 16, 33])
def test_reply_too_short(size: int) -> None:
    with pytest.raises(WireError, match=f"reply plaintext of {size} bytes is shorter than 34"):
        ReplyBody.from_bytes(bytes(size))


def test_reply_wire_errors() -> None:
    good = bytearray(ReplyBody(1, Status.FOUND, 5, V4, (V6, V4)).to_bytes())
    bad = bytearray(good)
    bad[6] = 3
    with pytest.raises(WireError, match="reply endpoint count 3 is more than 2"):
        ReplyBody.from_bytes(bytes(bad) + V4.to_bytes())
    bad[6] = 255
    with pytest.raises(WireError, match="reply endpoint count 255"):
        ReplyBody.from_bytes(bytes(bad))
    with pytest.raises(
        WireError, match=r"reply plaintext of 69 bytes is too short for 2 endpoints \(70\)"
    ):
        ReplyBody.from_bytes(bytes(good[:-1]))
    with pytest.raises(WireError, match="too short for 1 endpoints"):
        ReplyBody.from_bytes(bytes(good[:6]) + b"\x01" + bytes(good[7:34]))
    bad = bytearray(good)
    bad[4] = 3
    with pytest.raises(WireError, match=r"status 3 is not a known status \(0..2\)"):
        ReplyBody.from_bytes(bytes(bad))
    bad = bytearray(good)
    bad[34:52] = NONE_BYTES
    with pytest.raises(WireError, match=r"endpoints\[0\] \[::\]:0 is not a usable peer endpoint"):
        ReplyBody.from_bytes(bytes(bad))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(request_id=-1), "request_id -1 is not"),
        (dict(request_id=2**32), "request_id 4294967296 is not"),
        (dict(status=3), "status 3 is not a known status"),
        (dict(status="found"), "status 'found' is not a known status"),
        (dict(status=True), "status True is not a known status"),
        (dict(server_time=2**64), "server_time 18446744073709551616 is not"),
        (dict(observed="1.2.3.4:5"), "observed '1.2.3.4:5' is not an Endpoint or None"),
        (dict(endpoints=(V6, V4, V4)), r"endpoints count 3 is not in 0..2"),
        (dict(endpoints=V4), "endpoints must be a tuple of Endpoint, got Endpoint"),
        (dict(endpoints=("1.2.3.4:5",)), r"endpoints\[0\] '1.2.3.4:5' is not an Endpoint"),
        (
            dict(endpoints=(V4, Endpoint("1.2.3.4", 0))),
            r"endpoints\[1\] 1.2.3.4:0 is not a usable peer endpoint",
        ),
        (dict(endpoints=(Endpoint("0.0.0.0", 5),)), r"endpoints\[0\] 0.0.0.0:5 is not a usable"),
        (dict(endpoints=(Endpoint("::", 5),)), r"endpoints\[0\] \[::\]:5 is not a usable"),
        (dict(peer_nat=256), "peer_nat 256 is not"),
    ],
)
def test_reply_field_errors(kwargs: dict, message: str) -> None:
    fields = (
        dict(
            request_id=1, status=Status.FOUND, server_time=0, observed=V4, endpoints=(), peer_nat=0
        )
        | kwargs
    )
    with pytest.raises(WireError, match=message):
        ReplyBody(**fields)


# ---------------------------------------------------------------- notify body


@pytest.mark.parametrize("endpoints", [(V4,), (V6,), (V6, V4)])
def test_notify_round_trip(endpoints: tuple) -> None:
    body = NotifyBody(2**64 - 1, KEY_A, endpoints, 200)
    raw = body.to_bytes()
    assert len(raw) == NOTIFY_PLAIN_MIN + ENDPOINT_LEN * len(endpoints)
    assert notify_len(len(endpoints)) == len(raw) + 36 <= REQUEST_LEN
    assert NotifyBody.from_bytes(raw) == body
    assert NotifyBody.from_bytes(raw + bytes(50)) == body


def test_notify_layout() -> None:
    raw = NotifyBody(0x1122334455667788, KEY_A, (V6, V4), 4).to_bytes()
    assert raw[:44] == bytes.fromhex("1122334455667788") + KEY_A + bytes.fromhex("04020000")
    assert raw[44:] == V6.to_bytes() + V4.to_bytes()


def test_notify_wire_errors() -> None:
    good = NotifyBody(1, KEY_A, (V6, V4)).to_bytes()
    with pytest.raises(WireError, match="notify plaintext of 43 bytes is shorter than 44"):
        NotifyBody.from_bytes(good[:43])
    for count in (0, 3, 255):
        with pytest.raises(WireError, match=f"notify endpoint count {count} is not in 1..2"):
            NotifyBody.from_bytes(good[:41] + bytes((count,)) + good[42:] + V4.to_bytes())
    with pytest.raises(
        WireError, match=r"notify plaintext of 79 bytes is too short for 2 endpoints \(80\)"
    ):
        NotifyBody.from_bytes(good[:-1])
    with pytest.raises(WireError, match=r"endpoints\[1\] \[::\]:0 is not a usable"):
        NotifyBody.from_bytes(good[:62] + NONE_BYTES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(server_time=-1), "server_time -1 is not"),
        (dict(peer=bytes(31)), "peer must be 32 bytes, got 31"),
        (dict(endpoints=()), r"endpoints count 0 is not in 1..2"),
        (dict(endpoints=(V6, V4, V6)), r"endpoints count 3 is not in 1..2"),
        (dict(endpoints=(None,)), r"endpoints\[0\] None is not an Endpoint"),
        (dict(peer_nat=-1), "peer_nat -1 is not"),
    ],
)
def test_notify_field_errors(kwargs: dict, message: str) -> None:
    fields = dict(server_time=1, peer=KEY_A, endpoints=(V4,), peer_nat=0) | kwargs
    with pytest.raises(WireError, match=message):
        NotifyBody(**fields)


# ---------------------------------------------------------------- random plaintexts


@pytest.mark.parametrize("cls", [RequestBody, ReplyBody, NotifyBody])
def test_random_plaintexts_parse_or_raise_wire_error(cls: Body) -> None:
    rng = random.Random(61)
    seed = {
        RequestBody: RequestBody(1, 1, KEY_A).to_bytes(),
        ReplyBody: ReplyBody(1, Status.FOUND, 1, V4, (V6, V4)).to_bytes(),
        NotifyBody: NotifyBody(1, KEY_A, (V6, V4)).to_bytes(),
    }[cls]
    parsed = 0
    for i in range(5000):
        if i % 2:
            data = rng.randbytes(rng.randrange(0, 120))
        else:
            buf = bytearray(seed)
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf[: rng.randrange(len(buf) + 1)]) if rng.random() < 0.3 else bytes(buf)
        try:
            body = cls.from_bytes(data)
        except WireError:
            continue
        parsed += 1
        assert cls.from_bytes(body.to_bytes()) == body
    assert parsed > 500  # the mutations must reach the successful path too


def test_protocol_doc_shows_the_stored_vectors() -> None:
    """docs/PROTOCOL.md's "Test vectors" section is make_vectors.render_doc() of the JSON."""
    doc = (vectors.PATH.parents[2] / "docs" / "PROTOCOL.md").read_text()
    start = doc.index("## Test vectors\n") + len("## Test vectors\n\n")
    end = doc.find("\n## ", start)
    section = doc[start:] if end < 0 else doc[start : end + 1]
    assert section == make_vectors.render_doc(vectors.load())
