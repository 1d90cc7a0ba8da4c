"""The UAPI codec, fed in-memory text: no sockets here."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from punch.wg import Device, InvalidArgument, Peer, ProtocolError, UapiError, WgError
from punch.wg.uapi import (
    ReplyParser,
    encode_get,
    encode_set_peer,
    format_endpoint,
    parse_endpoint,
    parse_get_reply,
    parse_set_reply,
    reply_complete,
)
from punch.wg.x25519 import public_from_private
from tests.punch.wg.wgdump import device_from_wg_dump

DATA = Path(__file__).parent / "data"
K1, K2 = bytes(range(32)), bytes(range(32, 64))
PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")


def reply(*lines: str, errno: int = 0) -> str:
    return "".join(f"{line}\n" for line in (*lines, f"errno={errno}")) + "\n"


def test_recorded_wireguard_go_dump_matches_wg() -> None:
    text = (DATA / "uapi_get_wireguard_go.txt").read_text()
    dev = parse_get_reply("wg9", text)
    assert dev == device_from_wg_dump("wg9", (DATA / "uapi_get_wireguard_go.wgdump").read_text())
    assert dev.fwmark == 0x42 and dev.listen_port == 51820
    assert [p.endpoint for p in dev.peers] == [("192.0.2.1", 1234), ("2001:db8::1", 51821), None]
    # fed as bytes, as lines, and one line at a time: same result
    assert parse_get_reply("wg9", text.encode()) == dev
    assert parse_get_reply("wg9", text.splitlines(keepends=True)) == dev
    parser = ReplyParser("wg9")
    done = [parser.feed_line(line) for line in text[:-1].split("\n")]
    assert done == [False] * (len(done) - 1) + [True]
    assert parser.device() == dev


def test_single_peer_with_handshake_and_derived_public_key() -> None:
    dev = parse_get_reply("wg0", reply(
        f"private_key={PRIV.hex()}", "listen_port=51820",
        f"public_key={K1.hex()}", "endpoint=203.0.113.9:4500",
        "last_handshake_time_sec=1700000000", "last_handshake_time_nsec=500000000",
        "rx_bytes=1234", "tx_bytes=5678", "persistent_keepalive_interval=25",
        "allowed_ip=10.0.0.0/24", "allowed_ip=0.0.0.0/0"))
    assert dev == Device("wg0", public_from_private(PRIV), PRIV, 51820, 0, (
        Peer(K1, ("203.0.113.9", 4500), 1700000000.5, 1234, 5678, 25,
             ("10.0.0.0/24", "0.0.0.0/0")),))
    assert dev.peer(K1) is dev.peers[0] and dev.peer(K2) is None
    assert "PRIV" not in repr(dev) and PRIV.hex() not in repr(dev) and str(PRIV) not in repr(dev)


def test_multi_peer_ipv6_no_handshake_no_private_key() -> None:
    dev = parse_get_reply("wg0", reply(
        "listen_port=0", f"public_key={K1.hex()}", "endpoint=[2001:db8::1]:51820",
        "last_handshake_time_sec=0", "last_handshake_time_nsec=0",
        f"public_key={K2.hex()}", "allowed_ip=fd00::/8", "future_key=whatever"))
    assert dev.public_key is None and dev.private_key is None
    assert dev.peers == (Peer(K1, ("2001:db8::1", 51820)), Peer(K2, allowed_ips=("fd00::/8",)))


def test_empty_device() -> None:
    assert parse_get_reply("wg0", reply()) == Device("wg0")


@pytest.mark.parametrize("errno", [-22, 22, -1])
def test_errno_replies(errno: int) -> None:
    with pytest.raises(UapiError, match=r"wg7: UAPI get failed: errno=.*Invalid argument"
                       if abs(errno) == 22 else r"wg7: UAPI get failed") as e:
        parse_get_reply("wg7", reply(errno=errno))
    assert e.value.errno == abs(errno) and e.value.operation == "get" and e.value.ifname == "wg7"
    with pytest.raises(UapiError, match="UAPI set failed") as e:
        parse_set_reply("wg7", reply(errno=errno))
    assert e.value.operation == "set"
    parse_set_reply("wg7", "errno=0\n\n")


@pytest.mark.parametrize("text, message", [
    ("garbage\nerrno=0\n\n", "malformed line 'garbage'"),
    ("=1\nerrno=0\n\n", "malformed line"),
    ("endpoint=1.2.3.4:5\nerrno=0\n\n", "peer field 'endpoint' before any public_key"),
    (f"public_key={K1.hex()[:-2]}\nerrno=0\n\n", "public_key: not a 32-byte hex key"),
    (f"public_key={K1.hex()[:-2]}zz\nerrno=0\n\n", "public_key: not a 32-byte hex key"),
    ("listen_port=65536\nerrno=0\n\n", "listen_port: not an unsigned integer"),
    ("listen_port=-1\nerrno=0\n\n", "listen_port"),
    (f"public_key={K1.hex()}\nrx_bytes=x\nerrno=0\n\n", "rx_bytes: not an unsigned"),
    (f"public_key={K1.hex()}\nendpoint=2001:db8::1:5\nerrno=0\n\n", "without brackets"),
    (f"public_key={K1.hex()}\nendpoint=host:5\nerrno=0\n\n", "bad endpoint 'host:5'"),
    (f"public_key={K1.hex()}\nendpoint=1.2.3.4:99999\nerrno=0\n\n", "bad endpoint"),
    (f"public_key={K1.hex()}\nallowed_ip=10.0.0.0/33\nerrno=0\n\n", "allowed_ip: not a CIDR"),
    ("errno=zero\n\n", "errno: not an integer"),
    ("errno=0\n", "incomplete"),
    ("listen_port=1\n\n", "ended without errno"),
    ("errno=0\nlisten_port=1\n\n", "data after errno"),
    ("errno=0\n\nerrno=0\n\n", "data after the end"),
    ("errno=0\n\nx", "does not end with a newline"),
])
def test_garbage_is_a_protocol_error(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as e:
        parse_get_reply("wg3", text)
    assert isinstance(e.value, WgError)


def test_non_ascii_reply() -> None:
    with pytest.raises(ProtocolError, match="not ASCII"):
        parse_get_reply("wg0", "listen_port=1\u00e9\nerrno=0\n\n".encode())


def test_mutated_replies_parse_or_raise_our_error() -> None:
    base = (DATA / "uapi_get_wireguard_go.txt").read_bytes()
    rng = random.Random(7748)
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[i] = rng.choice(b"0123456789abcdef=:[]\n/x-")
            elif op < 0.7:
                del data[i]
            else:
                data[i:i] = bytes([rng.randrange(256)])
        try:
            dev = parse_get_reply("wgm", bytes(data))
        except WgError:
            continue
        assert isinstance(dev, Device)


def test_reply_complete() -> None:
    assert reply_complete(b"errno=0\n\n")
    assert not reply_complete(b"errno=0\n")
    assert not reply_complete(b"listen_port=1\n")


def test_encode_get() -> None:
    assert encode_get() == b"get=1\n\n"


def test_encode_set_peer() -> None:
    assert encode_set_peer(K1, endpoint=("192.0.2.1", 51820), keepalive=25) == (
        f"set=1\npublic_key={K1.hex()}\nupdate_only=true\nendpoint=192.0.2.1:51820\n"
        "persistent_keepalive_interval=25\n\n").encode()
    assert encode_set_peer(K1, endpoint=("2001:DB8::1", 1)) == (
        f"set=1\npublic_key={K1.hex()}\nupdate_only=true\nendpoint=[2001:db8::1]:1\n\n"
    ).encode()
    assert encode_set_peer(K2, keepalive=0) == (
        f"set=1\npublic_key={K2.hex()}\nupdate_only=true\npersistent_keepalive_interval=0\n\n"
    ).encode()
    assert encode_set_peer(K2) == f"set=1\npublic_key={K2.hex()}\nupdate_only=true\n\n".encode()


@pytest.mark.parametrize("kwargs, message", [
    ({"public_key": b"short"}, "public key must be 32 raw bytes"),
    ({"public_key": K1.hex()}, "public key must be 32 raw bytes"),
    ({"public_key": K1, "endpoint": ("example.com", 1)}, "not an IP address"),
    ({"public_key": K1, "endpoint": ("1.2.3.4", 0)}, "port must be 1..65535"),
    ({"public_key": K1, "endpoint": ("1.2.3.4", 65536)}, "port must be"),
    ({"public_key": K1, "endpoint": ("1.2.3.4",)}, "endpoint must be"),
    ({"public_key": K1, "endpoint": ("fe80::1%eth0", 5)}, "scoped"),
    ({"public_key": K1, "keepalive": -1}, "keepalive must be 0..65535"),
    ({"public_key": K1, "keepalive": 65536}, "keepalive"),
    ({"public_key": K1, "keepalive": True}, "keepalive"),
])
def test_encode_set_peer_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as e:
        encode_set_peer(**kwargs)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("endpoint, text", [
    (("192.0.2.1", 51820), "192.0.2.1:51820"),
    (("2001:db8::1", 51820), "[2001:db8::1]:51820"),
    (("fd00::1", 9), "[fd00::1]:9"),
])
def test_endpoint_round_trip(endpoint: tuple[str, int], text: str) -> None:
    assert format_endpoint(endpoint) == text
    assert parse_endpoint(text) == endpoint


def test_round_trip_through_set_and_get() -> None:
    """What encode_set_peer writes, a get reply carrying the same lines parses back."""
    lines = encode_set_peer(K1, endpoint=("2001:db8::7", 4), keepalive=9).decode().split("\n")
    body = [line for line in lines[1:] if line and line != "update_only=true"]
    dev = parse_get_reply("wg0", reply(*body))
    assert dev.peers == (Peer(K1, ("2001:db8::7", 4), keepalive=9),)
