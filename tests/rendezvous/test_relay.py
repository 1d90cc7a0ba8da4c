"""The relay's pure decisions: the allocation table, binds, forwarding, limits and expiry
(rendezvous.relay), the bind datagram, and the v2 service offering a relay only to
authenticated, mutually consenting pairs (real cryptography on both sides)."""

from __future__ import annotations

import pytest

from rendezvous.relay import Relay, RelayConfig, RelayError, RelayTable, parse_ports
from rendezvous.service import Config, Service
from rendezvous.v2.crypto import AuthError, ClientCrypto, ServerCrypto
from rendezvous.v2.keys import generate_private_key
from rendezvous.v2.service import V2Config, V2Service
from rendezvous.v2.wire import (
    BIND_LEN,
    FLAG_RELAY,
    RELAY_LEN,
    REQUEST_LEN,
    BindBody,
    Endpoint,
    RelayBody,
    RequestBody,
    WireError,
)

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32
SA, SB, SX = b"\xc6\x33\x64\x07\x9c\x40", b"\xc0\x00\x02\x02\xa0\x00", b"\xcb\x00\x71\x01\x00\x09"
WALL = 1_700_000_000 * 10**9
SERVER_PRIV = generate_private_key()


def table(**kw) -> RelayTable:
    return RelayTable(RelayConfig(**{"ports": (49919,), **kw}))


def bound_pair(t: RelayTable, now: float = 0.0) -> int:
    alloc = t.allocate(A, B, now)
    assert alloc is not None
    assert t.bind(alloc.port, A, B, 1, SA, now)
    assert t.bind(alloc.port, B, A, 1, SB, now)
    return alloc.port


def test_parse_ports() -> None:
    assert parse_ports("49919") == (49919,)
    assert parse_ports("5000-5002") == (5000, 5001, 5002)
    for bad in ("0", "x", "5-4", "1-70000", "1000-9000", ""):
        with pytest.raises(RelayError, match="relay port"):
            parse_ports(bad)


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(RelayError, match="distinct"):
        RelayConfig(ports=(1, 1))
    with pytest.raises(RelayError, match="idle"):
        RelayConfig(ports=(1,), idle=0)
    with pytest.raises(RelayError, match="max pairs"):
        RelayConfig(ports=(1,), max_pairs=0)


def test_allocation_is_per_unordered_pair() -> None:
    t = table()
    a = t.allocate(A, B, 0)
    assert a is not None and t.allocate(B, A, 1) is a and len(t) == 1
    with pytest.raises(RelayError):
        t.allocate(A, A, 0)


def test_a_client_in_two_pairs_gets_two_ports_or_is_refused() -> None:
    t = table(ports=(5000, 5001))
    ab, ac = t.allocate(A, B, 0), t.allocate(A, C, 0)
    assert ab is not None and ac is not None and ab.port != ac.port
    one = table()
    assert one.allocate(A, B, 0) is not None
    assert one.allocate(A, C, 0) is None and one.refused["busy"] == 1
    assert one.allocate(b"D" * 32, C, 0) is not None  # a disjoint pair shares the port


def test_max_pairs() -> None:
    t = table(max_pairs=1)
    assert t.allocate(A, B, 0) is not None
    assert t.allocate(C, b"D" * 32, 1) is None and t.refused["full"] == 1
    assert t.allocate(C, b"D" * 32, 200) is not None  # the first one idled out


def test_forwarding_only_between_the_two_bound_sources() -> None:
    t = table()
    alloc = t.allocate(A, B, 0)
    assert alloc is not None
    port = alloc.port
    assert t.forward(port, SA, 10, 0) == "unbound"  # nobody bound yet
    assert t.bind(port, A, B, 1, SA, 0)
    assert t.forward(port, SA, 10, 0) == "peer_unbound"
    assert t.bind(port, B, A, 1, SB, 0)
    assert t.forward(port, SA, 10, 1) == SB
    assert t.forward(port, SB, 20, 1) == SA
    assert t.forward(port, SX, 10, 1) == "unbound"  # a third source: dropped, counted
    assert t.forward(port + 1, SA, 10, 1) == "unbound"  # another port
    assert t.drops["unbound"] == 3 and t.forwarded == 2 and t.forwarded_bytes == 30


def test_bind_checks_pair_port_timestamp_and_source() -> None:
    t = table(ports=(5000, 5001))
    alloc = t.allocate(A, B, 0)
    assert alloc is not None
    other = 5001 if alloc.port == 5000 else 5000
    assert not t.bind(other, A, B, 1, SA, 0) and t.drops["bind_no_pair"] == 1
    assert not t.bind(alloc.port, A, C, 1, SA, 0) and t.drops["bind_no_pair"] == 2
    assert t.bind(alloc.port, A, B, 5, SA, 0)
    assert not t.bind(alloc.port, A, B, 5, SX, 0) and t.drops["bind_stale"] == 1  # replay
    assert alloc.bound[alloc.side(A)] == SA
    # B cannot bind A's source (one source never speaks for both sides)
    assert not t.bind(alloc.port, B, A, 1, SA, 0) and t.drops["bad_bind"] == 1
    # A rebinding from a new source (its NAT rebound) moves its side; the old one is gone
    assert t.bind(alloc.port, A, B, 6, SX, 0)
    assert t.bind(alloc.port, B, A, 1, SB, 0)
    assert t.forward(alloc.port, SA, 1, 0) == "unbound"
    assert t.forward(alloc.port, SX, 1, 0) == SB


def test_packet_and_byte_limits() -> None:
    t = table(max_packets=3)
    port = bound_pair(t)
    assert [t.forward(port, SA, 1, 0) for _ in range(4)] == [SB, SB, SB, "over_limit"]
    t = table(max_bytes=100)
    port = bound_pair(t)
    assert t.forward(port, SA, 60, 0) == SB
    assert t.forward(port, SB, 41, 0) == "over_limit"
    assert t.forward(port, SB, 40, 0) == SA
    assert t.drops["over_limit"] == 1


def test_idle_expiry_frees_the_pair_and_its_sources() -> None:
    t = table(idle=10)
    port = bound_pair(t)
    assert t.forward(port, SA, 1, 9) == SB  # traffic keeps it alive
    assert t.forward(port, SA, 1, 18) == SB
    assert t.forward(port, SA, 1, 28.5) == "unbound"
    assert len(t) == 0 and t.expired == 1
    assert t.get(A, B, 29) is None
    port = bound_pair(t, 30)
    assert t.expire(39) == 0 and t.expire(40) == 1 and len(t) == 0
    assert t.forward(port, SB, 1, 40) == "unbound"


# -- the bind datagram and the Relay handler (real cryptography) ------------------------


def test_bind_datagram_round_trip_and_refusals() -> None:
    server = ServerCrypto(SERVER_PRIV)
    client = ClientCrypto(generate_private_key(), server.server_public)
    dgram = client.seal_bind(BindBody(WALL, B))
    assert len(dgram) == BIND_LEN == 108
    key, body = server.open_bind(dgram)
    assert key == client.client_public and body == BindBody(WALL, B)
    with pytest.raises(AuthError):
        server.open_bind(dgram[:-1] + bytes([dgram[-1] ^ 1]))
    with pytest.raises(WireError, match="shorter"):
        server.open_bind(dgram[:60])
    req = client.seal_request(RequestBody(WALL, 7, B))
    with pytest.raises(WireError, match="not a bind"):
        server.open_bind(req)
    with pytest.raises(WireError):  # a bind is never taken for a request
        server.open_request(dgram + bytes(8))


def test_a_bind_under_a_new_key_waits_for_the_services_new_key_budget() -> None:
    """The relay shares the v2 service's budget for keys not cached: with it spent, a
    bind from such a key is dropped before any X25519; a cached key still binds."""
    server = ServerCrypto(SERVER_PRIV)
    ca = ClientCrypto(generate_private_key(), server.server_public)
    cb = ClientCrypto(generate_private_key(), server.server_public)
    svc = V2Service(V2Config(new_key_rate=1.0, new_key_burst=1.0,
                             relay=RelayConfig(ports=(49919,))), server)
    relay = svc.relay
    assert relay is not None
    t = relay.table
    alloc = t.allocate(ca.client_public, cb.client_public, 0)
    assert alloc is not None
    p = alloc.port
    relay.handle(p, ca.seal_bind(BindBody(WALL, cb.client_public)), SA, 0)  # spends it
    misses = server.cache_misses
    relay.handle(p, cb.seal_bind(BindBody(WALL, ca.client_public)), SB, 0)
    assert (t.binds, t.drops["bind_new_key_limited"], server.cache_misses) == (1, 1, misses)
    relay.handle(p, ca.seal_bind(BindBody(WALL + 1, cb.client_public)), SA, 0)  # cached
    assert t.binds == 2
    relay.handle(p, cb.seal_bind(BindBody(WALL, ca.client_public)), SB, 1.0)  # refilled
    assert t.binds == 3 and relay.handle(p, b"\x04\0\0\0data", SA, 1.0) == SB


def test_relay_message_round_trip() -> None:
    server = ServerCrypto(SERVER_PRIV)
    client = ClientCrypto(generate_private_key(), server.server_public)
    body = RelayBody(WALL, 9, B, Endpoint("198.51.100.2", 49919))
    dgram = server.seal_relay(client.client_public, body)
    assert len(dgram) == RELAY_LEN == 102 <= REQUEST_LEN
    assert client.open(dgram) == body
    with pytest.raises(WireError, match="usable"):
        RelayBody(WALL, 0, B, Endpoint("0.0.0.0", 0))


def test_relay_handler_binds_then_forwards_and_never_forwards_a_bind() -> None:
    server = ServerCrypto(SERVER_PRIV)
    ca = ClientCrypto(generate_private_key(), server.server_public)
    cb = ClientCrypto(generate_private_key(), server.server_public)
    t = table()
    relay = Relay(t, server)
    alloc = t.allocate(ca.client_public, cb.client_public, 0)
    assert alloc is not None
    p = alloc.port
    assert relay.handle(p, ca.seal_bind(BindBody(WALL, cb.client_public)), SA, 0) is None
    assert relay.handle(p, cb.seal_bind(BindBody(WALL, ca.client_public)), SB, 0) is None
    assert t.binds == 2
    assert relay.handle(p, b"\x04\0\0\0wireguard data", SA, 1) == SB
    assert relay.handle(p, b"\x01\0\0\0handshake", SB, 1) == SA
    assert relay.handle(p, b"\x04\0\0\0from elsewhere", SX, 1) is None
    # a forged bind (from a key without an allocation, or tampered) binds nothing
    cx = ClientCrypto(generate_private_key(), server.server_public)
    assert relay.handle(p, cx.seal_bind(BindBody(WALL, cb.client_public)), SX, 2) is None
    forged = bytearray(ca.seal_bind(BindBody(WALL + 5, cb.client_public)))
    forged[-3] ^= 0xFF
    assert relay.handle(p, bytes(forged), SX, 2) is None
    assert t.drops["bind_no_pair"] == 1 and t.drops["bind_auth"] == 1
    assert relay.handle(p, b"\x04\0\0\0still", SA, 3) == SB


# -- the service: a relay only for authenticated, mutually consenting pairs ---------------


class _Peer:
    def __init__(self, server_public: bytes) -> None:
        self.crypto = ClientCrypto(generate_private_key(), server_public)
        self.pub = self.crypto.client_public
        self.ts, self.rid = WALL, 0

    def request(self, peer: bytes, flags: int = 0) -> bytes:
        self.ts += 1
        self.rid += 1
        return self.crypto.seal_request(RequestBody(self.ts, self.rid, peer, flags=flags))


def _service(relay: bool = True, addresses: tuple[bytes, ...] = (bytes([198, 51, 100, 2]),)):
    crypto = ServerCrypto(SERVER_PRIV)
    cfg = RelayConfig(ports=(49919,)) if relay else None
    return Service(Config(rate=0, relay=cfg, relay_addresses=addresses), crypto), crypto


def test_service_offers_a_relay_only_to_a_mutual_pair() -> None:
    svc, crypto = _service()
    a, b = _Peer(crypto.server_public), _Peer(crypto.server_public)
    v2 = svc.v2
    assert v2 is not None and v2.relay is not None
    # A alone asks for B with the relay flag: no consent yet, no allocation
    assert svc.handle(a.request(b.pub, FLAG_RELAY), SA, 0.0, wall_ns=WALL) is not None
    assert v2.counters["relay_no_consent"] == 1 and len(v2.relay.table) == 0
    svc.drain_notifications()
    # B asks for A (the pair is mutual), with the flag: both are told the relay
    assert svc.handle(b.request(a.pub, FLAG_RELAY), SB, 0.1, wall_ns=WALL) is not None
    relays = {}
    for n in svc.drain_notifications():
        try:
            body = (a if n.destination == SA else b).crypto.open(n.datagram)
        except AuthError:
            continue
        if isinstance(body, RelayBody):
            relays[n.destination] = body
            assert len(n.datagram) <= REQUEST_LEN
    assert set(relays) == {SA, SB}
    assert relays[SB].peer == a.pub and relays[SB].request_id == b.rid
    assert relays[SA].peer == b.pub and relays[SA].request_id == 0
    assert relays[SA].relay == relays[SB].relay == Endpoint("198.51.100.2", 49919)
    assert v2.counters["relay_offered"] == 1 and len(v2.relay.table) == 1


def test_service_relay_off_and_without_an_address() -> None:
    svc, crypto = _service(relay=False)
    a, b = _Peer(crypto.server_public), _Peer(crypto.server_public)
    svc.handle(a.request(b.pub), SA, 0.0, wall_ns=WALL)
    svc.handle(b.request(a.pub, FLAG_RELAY), SB, 0.1, wall_ns=WALL)
    assert svc.v2 is not None and svc.v2.counters["relay_off"] == 1
    svc, crypto = _service(addresses=())
    a, b = _Peer(crypto.server_public), _Peer(crypto.server_public)
    svc.handle(a.request(b.pub), SA, 0.0, wall_ns=WALL)
    svc.handle(b.request(a.pub, FLAG_RELAY), SB, 0.1, wall_ns=WALL)
    assert svc.v2 is not None and svc.v2.counters["relay_no_address"] == 1
    # the request's local address (when the shell knows it) is the relay's address
    svc.handle(b.request(a.pub, FLAG_RELAY), SB, 0.2, local=bytes([203, 0, 113, 9]),
               wall_ns=WALL)
    assert svc.v2.counters["relay_offered"] == 1


def test_a_forged_request_with_the_flag_allocates_nothing() -> None:
    svc, crypto = _service()
    a, b = _Peer(crypto.server_public), _Peer(crypto.server_public)
    svc.handle(a.request(b.pub), SA, 0.0, wall_ns=WALL)
    svc.handle(b.request(a.pub), SB, 0.0, wall_ns=WALL)
    forged = bytearray(b.request(a.pub, FLAG_RELAY))
    forged[-1] ^= 1
    assert svc.handle(bytes(forged), SX, 0.1, wall_ns=WALL) is None
    assert svc.v2 is not None and svc.v2.relay is not None and len(svc.v2.relay.table) == 0


def test_types_4_and_5_match_an_independent_construction_from_the_document() -> None:
    """Bind and relay datagrams built with struct and the cryptography primitives
    straight from docs/PROTOCOL.md ("Relay"), no wgpunch code, open with the codec; and
    the codec's own output has the documented layout."""
    import struct

    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def pub(priv: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)

    cpriv = generate_private_key()
    cpub, spub = pub(cpriv), pub(SERVER_PRIV)
    ss = X25519PrivateKey.from_private_bytes(cpriv).exchange(
        X25519PublicKey.from_public_bytes(spub))
    okm = HKDF(SHA256(), 64, b"wgpunch v2 rendezvous", cpub + spub).derive(ss)
    c2s, s2c = ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:])
    nonce = bytes(range(12))
    # bind: header || client_public || nonce || seal(timestamp || peer)
    ad = b"wgp\x02\x05\x00\x00\x00" + cpub
    bind = ad + nonce + c2s.encrypt(nonce, struct.pack("!Q32s", 1796000000123456789, B), ad)
    assert len(bind) == 108
    server = ServerCrypto(SERVER_PRIV)
    assert server.open_bind(bind) == (cpub, BindBody(1796000000123456789, B))
    # relay: header || nonce || seal(server_time, request_id, flags, reserved, peer, relay)
    hdr = b"wgp\x02\x04\x00\x00\x00"
    plain = (struct.pack("!QIB3s32s", 1796000000124256789, 0x1234ABCD, 0, bytes(3), B)
             + bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 2]) + struct.pack("!H", 49919))
    relay = hdr + nonce + s2c.encrypt(nonce, plain, hdr)
    assert len(relay) == 102
    client = ClientCrypto(cpriv, spub)
    assert client.open(relay) == RelayBody(1796000000124256789, 0x1234ABCD, B,
                                           Endpoint("198.51.100.2", 49919))
    # and the codec seals to exactly those bytes with the same nonce
    assert client.seal_bind(BindBody(1796000000123456789, B), nonce) == bind
    assert server.seal_relay(cpub, client.open(relay), nonce) == relay
