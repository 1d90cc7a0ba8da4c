"""rendezvous.v2.crypto: vectors both ways, tampering, wrong keys, truncation, the key
cache, and a fuzz of the server's parser."""

from __future__ import annotations

import os
import random
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rendezvous.v2.crypto import (
    KDF_SALT,
    AuthError,
    ClientCrypto,
    ServerCrypto,
    derive_keys,
    x25519,
)
from rendezvous.v2.keys import generate_private_key, public_key
from rendezvous.v2.wire import (
    HEADER_LEN,
    NONCE_LEN,
    REQUEST_LEN,
    Endpoint,
    MsgType,
    NotifyBody,
    ReplyBody,
    RequestBody,
    Status,
    WireError,
    header,
    notify_len,
    parse_header,
    reply_len,
)
from tests.rendezvous.v2 import vectors

V4 = Endpoint("203.0.113.9", 40000)
V6 = Endpoint("2001:db8::7", 51820)
PEER = bytes(range(32))
SERVER_PRIV = generate_private_key()


def fuzz_seed() -> int:
    """WGPUNCH_FUZZ_SEED replays a run; otherwise a fresh seed, printed by the test."""
    return int(os.environ.get("WGPUNCH_FUZZ_SEED") or int.from_bytes(os.urandom(4), "big"))


def nonce_of(m: dict) -> bytes:
    return bytes.fromhex(m["nonce"])


@pytest.fixture(scope="module")
def client() -> ClientCrypto:
    return ClientCrypto(vectors.key("client_private"), vectors.key("server_public"))


@pytest.fixture
def server() -> ServerCrypto:
    return ServerCrypto(vectors.key("server_private"))


@pytest.fixture(scope="module")
def pair() -> tuple[ClientCrypto, ServerCrypto]:
    server = ServerCrypto(SERVER_PRIV)
    return ClientCrypto(generate_private_key(), server.server_public), server


# ---------------------------------------------------------------- vectors


def test_vector_keys(client: ClientCrypto, server: ServerCrypto) -> None:
    assert vectors.load()["kdf_salt"].encode() == KDF_SALT
    assert client.client_public == vectors.key("client_public")
    assert client.server_public == server.server_public == vectors.key("server_public")
    shared = x25519(
        X25519PrivateKey.from_private_bytes(vectors.key("client_private")),
        vectors.key("server_public"),
    )
    assert shared == vectors.key("shared")
    got = derive_keys(
        vectors.key("shared"), vectors.key("client_public"), vectors.key("server_public")
    )
    assert got == (vectors.key("k_c2s"), vectors.key("k_s2c"))


@pytest.mark.parametrize("m", vectors.messages(t=1), ids=lambda m: m["name"])
def test_vector_request_opens(m: dict, server: ServerCrypto) -> None:
    assert server.open_request(bytes.fromhex(m["datagram"])) == (
        vectors.key("client_public"),
        vectors.body(m),
    )


@pytest.mark.parametrize("m", vectors.messages(t=1, canonical=True), ids=lambda m: m["name"])
def test_vector_request_seals(m: dict, client: ClientCrypto) -> None:
    body = vectors.body(m)
    assert isinstance(body, RequestBody)
    assert client.seal_request(body, nonce_of(m)) == bytes.fromhex(m["datagram"])


def test_vector_extended_request_seals_from_its_plaintext(client: ClientCrypto) -> None:
    for m in vectors.messages(t=1, canonical=False):
        sealed = client.seal_request_bytes(bytes.fromhex(m["plaintext"]), nonce_of(m))
        assert sealed == bytes.fromhex(m["datagram"])


@pytest.mark.parametrize(
    "m", [*vectors.messages(t=2), *vectors.messages(t=3)], ids=lambda m: m["name"]
)
def test_vector_server_message_opens(m: dict, client: ClientCrypto) -> None:
    assert client.open(bytes.fromhex(m["datagram"])) == vectors.body(m)


@pytest.mark.parametrize(
    "m",
    [*vectors.messages(t=2, canonical=True), *vectors.messages(t=3, canonical=True)],
    ids=lambda m: m["name"],
)
def test_vector_server_message_seals(m: dict, server: ServerCrypto) -> None:
    body = vectors.body(m)
    pub = vectors.key("client_public")
    if isinstance(body, ReplyBody):
        sealed = server.seal_reply(pub, body, nonce_of(m))
    else:
        assert isinstance(body, NotifyBody)
        sealed = server.seal_notify(pub, body, nonce_of(m))
    assert sealed == bytes.fromhex(m["datagram"])
    t = MsgType(m["type"])
    assert server.seal_bytes(
        vectors.key("client_public"), t, body.to_bytes(), nonce_of(m)
    ) == bytes.fromhex(m["datagram"])


# ---------------------------------------------------------------- key derivation


def test_derive_keys_rejects_zero_secret() -> None:
    with pytest.raises(AuthError, match="all zero"):
        derive_keys(bytes(32), PEER, PEER)


@pytest.mark.parametrize(
    "args, message",
    [
        ((bytes(31), PEER, PEER), "shared secret must be 32 bytes, got 31"),
        ((PEER, bytes(33), PEER), "client_pub must be 32 bytes, got 33"),
        ((PEER, PEER, "x"), "server_pub must be 32 bytes, got str"),
    ],
)
def test_derive_keys_lengths(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_keys(*args)


def test_derive_keys_binds_both_public_keys() -> None:
    a = derive_keys(PEER, bytes(32), bytes(31) + b"\x01")
    b = derive_keys(PEER, bytes(31) + b"\x01", bytes(32))
    assert a != b and a[0] != a[1]


@pytest.mark.parametrize("low", vectors.load()["low_order_publics"])
def test_low_order_client_key_is_refused(low: str, server: ServerCrypto) -> None:
    # A request claiming a low-order key: without the check its AEAD key would be
    # HKDF(0, ...), which anybody can compute, so it must fail before the AEAD.
    ad = header(MsgType.REQUEST) + bytes.fromhex(low)
    datagram = ad + bytes(NONCE_LEN) + bytes(48 + 16)
    with pytest.raises(AuthError, match="X25519 with public key"):
        server.open_request(datagram)
    assert len(server) == 0


@pytest.mark.parametrize("low", vectors.load()["low_order_publics"])
def test_low_order_server_key_is_refused(low: str) -> None:
    with pytest.raises(AuthError):
        ClientCrypto(generate_private_key(), bytes.fromhex(low))


# ---------------------------------------------------------------- round trips


def test_round_trips(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    rng = random.Random(2)
    for i in range(200):
        body = RequestBody(
            rng.getrandbits(64), rng.getrandbits(32) | 1, rng.randbytes(32), rng.getrandbits(8)
        )
        sealed = client.seal_request(body)
        assert len(sealed) == REQUEST_LEN
        assert server.open_request(sealed) == (client.client_public, body)
        eps = (V6, V4)[: i % 3]
        reply = ReplyBody(
            body.request_id, Status(i % 3), rng.getrandbits(64), V4 if i % 2 else V6, eps, i % 256
        )
        assert client.open(server.seal_reply(client.client_public, reply)) == reply
        if eps:
            notify = NotifyBody(rng.getrandbits(64), body.peer, eps, i % 7)
            assert client.open(server.seal_notify(client.client_public, notify)) == notify


def test_nonces_are_fresh(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    body = RequestBody(1, 1, PEER)
    a, b = client.seal_request(body), client.seal_request(body)
    assert a[40:52] != b[40:52] and a[52:] != b[52:]
    reply = ReplyBody(1, Status.PENDING, 1, V4)
    c, d = (
        server.seal_reply(client.client_public, reply),
        server.seal_reply(client.client_public, reply),
    )
    assert c[8:20] != d[8:20]


def test_bad_nonce_length(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    with pytest.raises(ValueError, match="nonce must be 12 bytes, got 11"):
        client.seal_request(RequestBody(1, 1, PEER), bytes(11))
    with pytest.raises(ValueError, match="nonce must be 12 bytes, got 13"):
        server.seal_reply(client.client_public, ReplyBody(1, Status.PENDING, 1, V4), bytes(13))
    with pytest.raises(ValueError, match="not type"):
        server.seal_bytes(client.client_public, MsgType.REQUEST, b"")


@pytest.mark.parametrize("count", [0, 1, 2])
def test_sizes_never_exceed_the_request(
    count: int, pair: tuple[ClientCrypto, ServerCrypto]
) -> None:
    client, server = pair
    eps = (V6, V4)[:count]
    reply = server.seal_reply(client.client_public, ReplyBody(1, Status.FOUND, 1, V6, eps))
    assert len(reply) == reply_len(count) == (70, 88, 106)[count] <= REQUEST_LEN
    if count:
        notify = server.seal_notify(client.client_public, NotifyBody(1, PEER, eps))
        assert len(notify) == notify_len(count) == (98, 116)[count - 1] <= REQUEST_LEN


def test_trailing_plaintext_is_accepted(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    body = RequestBody(5, 6, PEER, 1)
    sealed = client.seal_request_bytes(body.to_bytes() + b"a newer field")
    assert len(sealed) == REQUEST_LEN + 13
    assert server.open_request(sealed) == (client.client_public, body)
    reply = ReplyBody(6, Status.FOUND, 9, V4, (V6,))
    assert (
        client.open(
            server.seal_bytes(client.client_public, MsgType.REPLY, reply.to_bytes() + bytes(9))
        )
        == reply
    )
    notify = NotifyBody(9, PEER, (V4,))
    assert (
        client.open(
            server.seal_bytes(client.client_public, MsgType.NOTIFY, notify.to_bytes() + b"z")
        )
        == notify
    )


def test_authentic_but_short_plaintext_is_a_wire_error(
    pair: tuple[ClientCrypto, ServerCrypto],
) -> None:
    client, server = pair
    sealed = client.seal_request_bytes(bytes(40))  # 108 bytes: refused before any crypto
    with pytest.raises(WireError, match="request of 108 bytes is shorter than 116"):
        server.open_request(sealed)
    with pytest.raises(WireError, match="reply plaintext of 33 bytes is shorter than 34"):
        client.open(server.seal_bytes(client.client_public, MsgType.REPLY, bytes(33)))
    with pytest.raises(WireError, match="notify plaintext of 0 bytes"):
        client.open(server.seal_bytes(client.client_public, MsgType.NOTIFY, b""))
    bad = RequestBody(1, 1, PEER).to_bytes()
    sealed = client.seal_request_bytes(bad[:8] + bytes(4) + bad[12:])  # request_id 0, authentic
    with pytest.raises(WireError, match="request_id 0"):
        server.open_request(sealed)


def test_wrong_direction_types(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    request = client.seal_request(RequestBody(1, 1, PEER))
    with pytest.raises(WireError, match=r"type 1 \(request\) is not a message for a client"):
        client.open(request)
    reply = server.seal_reply(client.client_public, ReplyBody(1, Status.PENDING, 1, V4, (V6, V4)))
    with pytest.raises(WireError, match="request of 106 bytes is shorter"):
        server.open_request(reply)
    notify = server.seal_notify(client.client_public, NotifyBody(1, PEER, (V6, V4)))
    with pytest.raises(WireError, match=r"type 3 \(notify\) is not a message for the server"):
        server.open_request(notify)
    # A request's own bytes relabelled as a reply do not open (key and AD differ).
    relabelled = header(MsgType.REPLY) + request[HEADER_LEN:]
    with pytest.raises(AuthError):
        client.open(relabelled)


# ---------------------------------------------------------------- tampering and wrong keys


def _sealed_messages(client: ClientCrypto, server: ServerCrypto) -> dict[str, bytes]:
    return {
        "request": client.seal_request(RequestBody(7, 8, PEER, 1)),
        "reply": server.seal_reply(
            client.client_public, ReplyBody(8, Status.FOUND, 9, V4, (V6, V4), 2)
        ),
        "notify": server.seal_notify(client.client_public, NotifyBody(9, PEER, (V6, V4), 3)),
    }


@pytest.mark.parametrize("kind", ["request", "reply", "notify"])
def test_every_tampered_byte_is_refused(kind: str) -> None:
    server_priv = generate_private_key()
    client = ClientCrypto(generate_private_key(), public_key(server_priv))
    server = ServerCrypto(server_priv)
    sealed = _sealed_messages(client, server)[kind]
    open_ = server.open_request if kind == "request" else client.open
    assert open_(sealed)  # the untouched one opens
    hits = server.cache_hits
    for i in range(len(sealed)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(sealed)
            bad[i] ^= flip
            try:  # a changed type that is still valid (reply <-> notify) fails the AEAD
                parse_header(bad)
                expected: type[Exception] = AuthError
            except WireError:
                expected = WireError
            assert (expected is AuthError) == (i >= HEADER_LEN or (i == 4 and bad[4] in (2, 3)))
            with pytest.raises(expected):
                open_(bytes(bad))
    if kind == "request":
        # Tampered keys (bytes 8..40) were derived afresh and never cached.
        assert len(server) == 1
        assert server.cache_hits - hits == 3 * (len(sealed) - HEADER_LEN - 32)
        assert server.open_request(sealed)[0] == client.client_public


def test_wrong_server_key() -> None:
    real, other = generate_private_key(), generate_private_key()
    client = ClientCrypto(generate_private_key(), public_key(other))  # pinned the wrong server
    server = ServerCrypto(real)
    with pytest.raises(AuthError, match="does not authenticate"):
        server.open_request(client.seal_request(RequestBody(1, 1, PEER)))
    assert len(server) == 0
    # ... and a reply from the real server does not open at that client.
    reply = server.seal_reply(client.client_public, ReplyBody(1, Status.PENDING, 1, V4))
    with pytest.raises(AuthError, match="reply of 70 bytes does not authenticate"):
        client.open(reply)


def test_wrong_client_key() -> None:
    server_priv = generate_private_key()
    server = ServerCrypto(server_priv)
    alice = ClientCrypto(generate_private_key(), server.server_public)
    mallory = ClientCrypto(generate_private_key(), server.server_public)
    # A reply or notify sealed for Alice does not open at Mallory, and vice versa.
    for sealed in _sealed_messages(alice, server).values():
        if parse_header(sealed) is not MsgType.REQUEST:
            with pytest.raises(AuthError):
                mallory.open(sealed)
    # Mallory claims Alice's public key but holds only her own private key.
    forged = bytearray(mallory.seal_request(RequestBody(1, 1, PEER)))
    forged[8:40] = alice.client_public
    with pytest.raises(AuthError):
        server.open_request(bytes(forged))


def test_truncated_datagrams_are_refused(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, server = pair
    for kind, sealed in _sealed_messages(client, server).items():
        open_ = server.open_request if kind == "request" else client.open
        for n in range(len(sealed)):
            with pytest.raises((WireError, AuthError)):
                open_(sealed[:n])


def test_constructor_key_errors() -> None:
    with pytest.raises(ValueError, match="client_private must be 32 bytes, got 31"):
        ClientCrypto(bytes(31), PEER)
    with pytest.raises(ValueError, match="server_public must be 32 bytes, got 0"):
        ClientCrypto(generate_private_key(), b"")
    with pytest.raises(ValueError, match="server_private must be 32 bytes"):
        ServerCrypto(b"short")
    with pytest.raises(ValueError, match="cache_size -1 is not a non-negative integer"):
        ServerCrypto(generate_private_key(), cache_size=-1)


# ---------------------------------------------------------------- the key cache


def test_cache_counts_and_lru_eviction() -> None:
    server_priv = generate_private_key()
    server = ServerCrypto(server_priv, cache_size=2)
    clients = [ClientCrypto(generate_private_key(), server.server_public) for _ in range(3)]
    req = [c.seal_request(RequestBody(1, 1, PEER)) for c in clients]
    server.open_request(req[0])
    server.open_request(req[1])
    assert (server.cache_hits, server.cache_misses, len(server)) == (0, 2, 2)
    server.open_request(req[0])  # 0 becomes the most recent
    assert (server.cache_hits, server.cache_misses) == (1, 2)
    server.open_request(req[2])  # evicts 1, the least recent
    assert len(server) == 2
    server.open_request(req[0])
    server.open_request(req[2])
    assert (server.cache_hits, server.cache_misses) == (3, 3)
    server.open_request(req[1])
    assert server.cache_misses == 4
    # Sealing uses (and fills) the same cache.
    server.seal_reply(clients[1].client_public, ReplyBody(1, Status.PENDING, 1, V4))
    assert server.cache_hits == 4


def test_two_levels_keep_one_lru_order_over_both() -> None:
    """3 clients cached, 1 with ready AEADs: a client that was moved down is a hit (no
    X25519) when it comes back, and the one dropped when a 4th arrives is the least
    recently seen over both levels."""
    server = ServerCrypto(generate_private_key(), cache_size=3, hot_size=1)
    a, b, c, d = (ClientCrypto(generate_private_key(), server.server_public) for _ in range(4))
    ts = iter(range(1, 100))

    def open_(cl: ClientCrypto) -> None:
        t = next(ts)
        assert server.open_request(cl.seal_request(RequestBody(t, t, PEER)))[1].timestamp == t

    for cl in (a, b, c):
        open_(cl)
    assert (server.cache_misses, len(server), server.ready) == (3, 3, 1)
    open_(a)  # from the second level: rebuilt, not derived; now b, c below, a ready
    assert (server.cache_hits, server.cache_misses, server.ready) == (1, 3, 1)
    open_(d)  # full: b, the least recently seen, goes
    assert (server.cache_misses, len(server)) == (4, 3)
    for cl in (c, a, d):
        open_(cl)
    assert (server.cache_hits, server.cache_misses) == (4, 4)
    open_(b)
    assert server.cache_misses == 5


def test_a_rebuilt_pair_seals_and_opens_what_the_client_expects() -> None:
    """A reply sealed for a client whose keys sat in the second level opens at the
    client; a tampered request under such a key fails and leaves the key cached."""
    server = ServerCrypto(generate_private_key(), cache_size=2, hot_size=1)
    a, b = (ClientCrypto(generate_private_key(), server.server_public) for _ in range(2))
    server.open_request(a.seal_request(RequestBody(1, 1, PEER)))
    server.open_request(b.seal_request(RequestBody(1, 1, PEER)))  # a moves down
    reply = ReplyBody(1, Status.PENDING, 1, V4)
    assert a.open(server.seal_reply(a.client_public, reply)) == reply  # a rebuilt, b down
    bad = bytearray(b.seal_request(RequestBody(2, 2, PEER)))
    bad[-1] ^= 1
    with pytest.raises(AuthError):
        server.open_request(bytes(bad))
    hits, misses = server.cache_hits, server.cache_misses
    assert server.open_request(b.seal_request(RequestBody(3, 3, PEER)))[1].timestamp == 3
    assert (server.cache_hits - hits, server.cache_misses - misses, len(server)) == (1, 0, 2)


def test_hot_size_is_checked_and_capped_by_the_cache_size() -> None:
    with pytest.raises(ValueError, match="hot_size -1 is not a non-negative integer"):
        ServerCrypto(generate_private_key(), hot_size=-1)
    assert ServerCrypto(generate_private_key(), cache_size=5, hot_size=10).hot_size == 5
    server = ServerCrypto(generate_private_key(), cache_size=2, hot_size=0)
    c = ClientCrypto(generate_private_key(), server.server_public)
    for t in (1, 2):  # every use rebuilds the pair, none is kept ready
        server.open_request(c.seal_request(RequestBody(t, t, PEER)))
    assert (server.cache_hits, server.cache_misses, len(server), server.ready) == (1, 1, 1, 0)


def test_failed_open_does_not_poison_the_cache() -> None:
    server = ServerCrypto(generate_private_key(), cache_size=2)
    good = [ClientCrypto(generate_private_key(), server.server_public) for _ in range(2)]
    for c in good:
        server.open_request(c.seal_request(RequestBody(1, 1, PEER)))
    for _ in range(20):  # forgeries under random keys must not evict the genuine clients
        forged = header(MsgType.REQUEST) + os.urandom(REQUEST_LEN - HEADER_LEN)
        with pytest.raises(AuthError):
            server.open_request(forged)
    assert len(server) == 2
    hits = server.cache_hits
    for c in good:
        server.open_request(c.seal_request(RequestBody(2, 2, PEER)))
    assert server.cache_hits == hits + 2
    # A tampered datagram under a cached key fails and leaves the entry working.
    bad = bytearray(good[0].seal_request(RequestBody(3, 3, PEER)))
    bad[-1] ^= 1
    with pytest.raises(AuthError):
        server.open_request(bytes(bad))
    assert server.open_request(good[0].seal_request(RequestBody(4, 4, PEER)))[1].timestamp == 4


def test_cache_size_zero_disables_caching(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    client, _ = pair
    server = ServerCrypto(generate_private_key(), cache_size=0)
    c = ClientCrypto(generate_private_key(), server.server_public)
    for _ in range(3):
        server.open_request(c.seal_request(RequestBody(1, 1, PEER)))
    assert (server.cache_hits, server.cache_misses, len(server)) == (0, 3, 0)


def test_independent_aead_matches(pair: tuple[ClientCrypto, ServerCrypto]) -> None:
    """The request layout, decrypted by hand with the library: AD is header || client key."""
    client, server = pair
    sealed = client.seal_request(RequestBody(11, 12, PEER, 3))
    ss = X25519PrivateKey.from_private_bytes(SERVER_PRIV).exchange(
        X25519PublicKey.from_public_bytes(sealed[8:40])
    )
    info = client.client_public + server.server_public
    k_c2s = HKDF(algorithm=SHA256(), length=64, salt=b"wgpunch v2 rendezvous", info=info).derive(
        ss
    )[:32]
    plain = ChaCha20Poly1305(k_c2s).decrypt(sealed[40:52], sealed[52:], sealed[:40])
    assert plain == RequestBody(11, 12, PEER, 3).to_bytes()


# ---------------------------------------------------------------- fuzz


@pytest.mark.fuzz
def test_fuzz_open_request_and_parse_header() -> None:
    """100,000+ random and mutated datagrams: each returns or raises WireError/AuthError."""
    seed = fuzz_seed()
    rng = random.Random(seed)
    server_priv = rng.randbytes(32)  # deterministic per seed
    server = ServerCrypto(server_priv, cache_size=64)
    clients = [ClientCrypto(rng.randbytes(32), server.server_public) for _ in range(4)]
    seeds = [
        c.seal_request(
            RequestBody(rng.getrandbits(64), rng.getrandbits(32) | 1, PEER), rng.randbytes(12)
        )
        for c in clients
    ]
    seeds.append(
        clients[0].seal_request_bytes(bytes(60), rng.randbytes(12))
    )  # authentic, longer plaintext
    valid_header = header(MsgType.REQUEST)
    outcomes = {"ok": 0, "WireError": 0, "AuthError": 0}
    started = time.perf_counter()
    n = 120_000
    for i in range(n):
        kind = i % 10
        if kind == 9:  # authentic, random plaintext of 48..80 bytes: reaches the body parser
            data = rng.choice(clients).seal_request_bytes(
                rng.randbytes(rng.randrange(48, 81)), rng.randbytes(12)
            )
        elif kind < 3:  # random bytes, random length
            data = rng.randbytes(rng.choice((rng.randrange(0, 200), rng.randrange(60, 130))))
        elif kind == 3:  # a valid header, then random bytes (mostly random keys: X25519 each)
            data = (
                valid_header + rng.randbytes(rng.randrange(100, 140))
                if rng.random() < 0.1
                else (rng.choice(seeds)[:40] + rng.randbytes(rng.randrange(60, 100)))
            )
        else:  # mutate a genuine request: flip bytes, truncate, extend, splice
            buf = bytearray(rng.choice(seeds))
            op = rng.randrange(5)
            if op <= 1:
                for _ in range(rng.randrange(1, 4)):
                    pos = (
                        rng.randrange(len(buf))
                        if rng.random() < 0.7
                        else rng.randrange(40, len(buf))
                    )
                    buf[pos] = rng.randrange(256)
            elif op == 2:
                del buf[rng.randrange(len(buf) + 1) :]
            elif op == 3:
                buf += rng.randbytes(rng.randrange(1, 40))
            else:
                buf[rng.randrange(8)] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        try:
            parse_header(data)
        except WireError:
            pass
        try:
            key, body = server.open_request(data)
        except WireError:
            outcomes["WireError"] += 1
        except AuthError:
            outcomes["AuthError"] += 1
        else:
            outcomes["ok"] += 1
            assert isinstance(body, RequestBody) and key in {c.client_public for c in clients}
    elapsed = time.perf_counter() - started
    print(f"fuzz seed {seed}: {n} inputs in {elapsed:.1f} s, {outcomes}, cache {len(server)} keys")
    assert sum(outcomes.values()) == n
    assert (
        outcomes["ok"] > n // 20
        and outcomes["AuthError"] > 10_000
        and outcomes["WireError"] > 10_000
    )
    assert len(server) <= len(clients)  # only authentic keys were cached


@pytest.mark.fuzz
def test_fuzz_client_open() -> None:
    """Random and mutated server messages at the client, through the AEAD and behind it."""
    seed = fuzz_seed()
    rng = random.Random(seed)
    server = ServerCrypto(rng.randbytes(32))
    client = ClientCrypto(rng.randbytes(32), server.server_public)
    pub = client.client_public
    good = [
        server.seal_reply(pub, ReplyBody(1, Status.FOUND, 2, V4, (V6, V4)), rng.randbytes(12)),
        server.seal_notify(pub, NotifyBody(3, PEER, (V6, V4)), rng.randbytes(12)),
    ]
    plains = {
        MsgType.REPLY: ReplyBody(1, Status.FOUND, 2, V4, (V6,)).to_bytes(),
        MsgType.NOTIFY: NotifyBody(3, PEER, (V6, V4)).to_bytes(),
    }
    opened = 0
    for i in range(30_000):
        if i % 3 == 0:  # authentic, random plaintext: exercises the body parsers
            t = rng.choice((MsgType.REPLY, MsgType.NOTIFY))
            plain = bytearray(plains[t])
            for _ in range(rng.randrange(0, 4)):
                plain[rng.randrange(len(plain))] = rng.randrange(256)
            plain = (
                plain[: rng.randrange(len(plain) + 1)]
                if rng.random() < 0.2
                else plain + rng.randbytes(rng.randrange(3))
            )
            data = server.seal_bytes(pub, t, bytes(plain), rng.randbytes(12))
        elif i % 3 == 1:
            data = rng.randbytes(rng.randrange(0, 130))
            if rng.random() < 0.5:
                data = header(rng.choice(list(MsgType))) + data
        else:
            buf = bytearray(rng.choice(good))
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf[: rng.randrange(len(buf) + 1)]) if rng.random() < 0.2 else bytes(buf)
        try:
            client.open(data)
        except (WireError, AuthError):
            continue
        opened += 1
    print(f"client fuzz seed {seed}: {opened} of 30000 opened")
    assert opened > 1000
