"""Sealing and opening v2 datagrams (docs/PROTOCOL.md, "Keys").

    ss    = X25519(client_private, server_public)      (all-zero ss refused)
    okm   = HKDF-SHA256(ss, salt="wgpunch v2 rendezvous", info=client_pub || server_pub, 64)
    k_c2s = okm[:32]  seals requests;  k_s2c = okm[32:]  seals replies and notifies

Every message is ChaCha20-Poly1305 under its direction's key with a random 12-byte
nonce carried in the message and the cleartext header (plus, for a request, the
client's public key) as associated data.

Pure functions on bytes, no I/O. A datagram that does not authenticate raises
:class:`AuthError`; one that is malformed (header, length, plaintext fields) raises
:class:`~rendezvous.v2.wire.WireError`. Nothing else escapes for any input bytes.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from rendezvous.v2.wire import (
    BIND_LEN,
    HEADER_LEN,
    KEY_LEN,
    NONCE_LEN,
    REQUEST_AD_LEN,
    REQUEST_LEN,
    SERVER_MSG_OVERHEAD,
    BindBody,
    BytesLike,
    MsgType,
    NotifyBody,
    RelayBody,
    ReplyBody,
    RequestBody,
    WireError,
    header,
    parse_header,
)

__all__ = [
    "KDF_SALT",
    "AuthError",
    "ClientCrypto",
    "ServerCrypto",
    "derive_keys",
    "x25519",
]

KDF_SALT = b"wgpunch v2 rendezvous"
_ZERO32 = bytes(32)
_HDR_REQUEST = header(MsgType.REQUEST)
_HDR_REPLY = header(MsgType.REPLY)
_HDR_NOTIFY = header(MsgType.NOTIFY)
_HDR_RELAY = header(MsgType.RELAY)
_HDR_BIND = header(MsgType.BIND)
_NONCE_END = REQUEST_AD_LEN + NONCE_LEN  # where a request's ciphertext starts


class AuthError(Exception):
    """A datagram that does not open: wrong key, tampered, truncated tag, or a
    public key whose shared secret is all zero (low order)."""


def _check_key(name: str, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != KEY_LEN:
        size = len(key) if isinstance(key, (bytes, bytearray, memoryview)) else type(key).__name__
        raise ValueError(f"{name} must be {KEY_LEN} bytes, got {size}")
    return bytes(key)


def _raw_public(private: X25519PrivateKey) -> bytes:
    # public_bytes_raw() needs cryptography 40; Debian 12 ships 38.
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _nonce(nonce: bytes | None) -> bytes:
    if nonce is None:
        return os.urandom(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    return bytes(nonce)


def x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    """The shared secret; :class:`AuthError` for a low-order ``public`` (all-zero result)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # OpenSSL refuses an all-zero result itself
        raise AuthError(f"X25519 with public key {bytes(public).hex()} failed: {e}") from None
    if shared == _ZERO32:
        raise AuthError(f"X25519 with public key {bytes(public).hex()} gives an all-zero secret")
    return shared


def derive_keys(shared: bytes, client_pub: bytes, server_pub: bytes) -> tuple[bytes, bytes]:
    """``(k_c2s, k_s2c)`` from the static-static secret; all-zero ``shared`` is an AuthError."""
    shared = _check_key("shared secret", shared)
    if shared == _ZERO32:
        raise AuthError("the X25519 shared secret is all zero (a low-order public key)")
    info = _check_key("client_pub", client_pub) + _check_key("server_pub", server_pub)
    okm = HKDF(algorithm=SHA256(), length=64, salt=KDF_SALT, info=info).derive(shared)
    return okm[:32], okm[32:]


ServerMsg = ReplyBody | NotifyBody | RelayBody
_Ready = tuple[bytes, ChaCha20Poly1305, ChaCha20Poly1305]  # okm, c2s, s2c
_SERVER_BODIES = {MsgType.REPLY: ReplyBody, MsgType.NOTIFY: NotifyBody, MsgType.RELAY: RelayBody}


def _open_server_msg(aead: ChaCha20Poly1305, datagram: BytesLike) -> ServerMsg:
    t = parse_header(datagram)
    if t not in _SERVER_BODIES:
        raise WireError(f"type {int(t)} ({t.name.lower()}) is not a message for a client")
    if len(datagram) < SERVER_MSG_OVERHEAD:
        raise WireError(
            f"{t.name.lower()} of {len(datagram)} bytes is shorter than {SERVER_MSG_OVERHEAD}"
        )
    data = bytes(datagram)
    nonce_end = HEADER_LEN + NONCE_LEN
    try:
        plain = aead.decrypt(data[HEADER_LEN:nonce_end], data[nonce_end:], data[:HEADER_LEN])
    except InvalidTag:
        raise AuthError(f"{t.name.lower()} of {len(data)} bytes does not authenticate") from None
    return _SERVER_BODIES[t].from_bytes(plain)  # type: ignore[attr-defined, no-any-return]


class ClientCrypto:
    """One client's view: its private key and the pinned server public key."""

    def __init__(self, client_private: bytes, server_public: bytes) -> None:
        private = X25519PrivateKey.from_private_bytes(_check_key("client_private", client_private))
        self.client_public: bytes = _raw_public(private)
        self.server_public: bytes = _check_key("server_public", server_public)
        k_c2s, k_s2c = derive_keys(
            x25519(private, self.server_public), self.client_public, self.server_public
        )
        self._seal = ChaCha20Poly1305(k_c2s)
        self._open = ChaCha20Poly1305(k_s2c)
        self._ad = _HDR_REQUEST + self.client_public
        self._bind_ad = _HDR_BIND + self.client_public

    def seal_request_bytes(self, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        """A request datagram around any plaintext (tests use this for longer ones)."""
        nonce = _nonce(nonce)
        return self._ad + nonce + self._seal.encrypt(nonce, bytes(plaintext), self._ad)

    def seal_request(self, body: RequestBody, nonce: bytes | None = None) -> bytes:
        """The 116-byte request datagram; ``nonce`` is random unless given (tests)."""
        return self.seal_request_bytes(body.to_bytes(), nonce)

    def seal_bind(self, body: BindBody, nonce: bytes | None = None) -> bytes:
        """The 108-byte bind datagram for the relay (sealed like a request, type 5)."""
        nonce = _nonce(nonce)
        return self._bind_ad + nonce + self._seal.encrypt(nonce, body.to_bytes(), self._bind_ad)

    def open(self, datagram: BytesLike) -> ServerMsg:
        """Open a reply, notify or relay message from the server (WireError / AuthError)."""
        return _open_server_msg(self._open, datagram)


class ServerCrypto:
    """The server's key and a bounded two-level LRU of per-client keys.

    Deriving a client's keys costs an X25519 and an HKDF (~40 us here), so they are
    cached, at most ``cache_size`` clients in all (0: none), in two levels, each client
    in one of them:

    - **ready**: the ``hot_size`` most recently seen clients keep their two
      ChaCha20Poly1305 objects, as the AEAD calls need them. Each holds OpenSSL contexts:
      about 2.2 KB of memory, 4.4 KB a client.
    - **keys**: the others keep only the 64 derived bytes (~320 B a client with the key
      and the LRU's bookkeeping). When such a client is seen again its two objects are
      rebuilt (~2 us) and it moves to the first level; the least recent client there
      moves down.

    So a busy server remembers a million clients in ~320 MB instead of 4.4 GB, and a
    client returning after 20 s costs a rebuild, not an X25519. The order over both
    levels is the clients' last use; the least recent one is dropped when all
    ``cache_size`` places are taken.

    Only a datagram that authenticates (or a seal for a key) adds a cache entry, so
    forged datagrams with random keys cost an X25519 each (the service caps how many
    a second: ``--new-key-rate``) but never evict genuine clients. ``cache_hits`` / ``cache_misses`` count lookups (a hit in either level).
    """

    def __init__(self, server_private: bytes, cache_size: int = 1 << 20,
                 hot_size: int = 4096) -> None:
        for name, value in (("cache_size", cache_size), ("hot_size", hot_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} {value!r} is not a non-negative integer")
        self._private = X25519PrivateKey.from_private_bytes(
            _check_key("server_private", server_private)
        )
        self.server_public: bytes = _raw_public(self._private)
        self.cache_size = cache_size
        self.hot_size = min(hot_size, cache_size)
        self.cache_hits = 0
        self.cache_misses = 0
        # client key -> (k_c2s || k_s2c, AEAD c2s, AEAD s2c), least recent first
        self._hot: OrderedDict[bytes, _Ready] = OrderedDict()
        # client key -> k_c2s || k_s2c, least recent first; all less recent than _hot's
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        """Number of cached client keys (both levels)."""
        return len(self._hot) + len(self._keys)

    def sender_cached(self, datagram: BytesLike) -> bool:
        """Whether the keys of the client a request or bind DATAGRAM names are cached,
        i.e. opening it needs no X25519; a peek: the LRU order does not change."""
        client_pub = bytes(datagram[HEADER_LEN:REQUEST_AD_LEN])
        return client_pub in self._hot or client_pub in self._keys

    @property
    def ready(self) -> int:
        """How many of them keep ready AEAD objects (the first level)."""
        return len(self._hot)

    def _derive(self, client_pub: bytes) -> _Ready:
        k_c2s, k_s2c = derive_keys(
            x25519(self._private, client_pub), client_pub, self.server_public
        )
        return k_c2s + k_s2c, ChaCha20Poly1305(k_c2s), ChaCha20Poly1305(k_s2c)

    def _lookup(self, client_pub: bytes) -> _Ready | None:
        entry = self._hot.get(client_pub)
        if entry is not None:
            self.cache_hits += 1
            self._hot.move_to_end(client_pub)
            return entry
        okm = self._keys.pop(client_pub, None)
        if okm is None:
            self.cache_misses += 1
            return None
        self.cache_hits += 1
        entry = okm, ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:])
        self._make_ready(client_pub, entry)
        return entry

    def _make_ready(self, client_pub: bytes, entry: _Ready) -> None:
        """CLIENT_PUB, just used, into the first level; its least recent moves down."""
        hot = self._hot
        hot[client_pub] = entry
        if len(hot) > self.hot_size:
            old, (okm, _, _) = hot.popitem(last=False)
            keys = self._keys
            keys[old] = okm
            if len(hot) + len(keys) > self.cache_size:
                keys.popitem(last=False)

    def _store(self, client_pub: bytes, entry: _Ready) -> None:
        if self.cache_size == 0:
            return
        self._make_ready(client_pub, entry)

    def _aeads(self, client_pub: bytes) -> _Ready:
        client_pub = _check_key("client_pub", client_pub)
        entry = self._lookup(client_pub)
        if entry is None:
            entry = self._derive(client_pub)
            self._store(client_pub, entry)
        return entry

    def open_request(self, datagram: BytesLike) -> tuple[bytes, RequestBody]:
        """``(client_public, body)`` of an authentic request; WireError / AuthError otherwise."""
        client_pub, plain = self._open_from_client(datagram, MsgType.REQUEST, REQUEST_LEN)
        return client_pub, RequestBody.from_bytes(plain)

    def open_bind(self, datagram: BytesLike) -> tuple[bytes, BindBody]:
        """``(client_public, body)`` of an authentic bind; WireError / AuthError otherwise."""
        client_pub, plain = self._open_from_client(datagram, MsgType.BIND, BIND_LEN)
        return client_pub, BindBody.from_bytes(plain)

    def _open_from_client(self, datagram: BytesLike, want: MsgType,
                          min_len: int) -> tuple[bytes, bytes]:
        """Requests and binds share one layout: header, client key (both the associated
        data), nonce, ciphertext and tag under the client's k_c2s. A failed open leaves
        the key cache as it was."""
        what = want.name.lower()
        if len(datagram) < min_len:
            raise WireError(f"{what} of {len(datagram)} bytes is shorter than {min_len}")
        t = parse_header(datagram)
        if t is not want:
            expected = "a message for the server" if want is MsgType.REQUEST else f"a {what}"
            raise WireError(f"type {int(t)} ({t.name.lower()}) is not {expected}")
        data = bytes(datagram)
        client_pub = data[HEADER_LEN:REQUEST_AD_LEN]
        entry = self._lookup(client_pub)
        fresh = entry is None
        if entry is None:
            entry = self._derive(client_pub)
        try:
            plain = entry[1].decrypt(
                data[REQUEST_AD_LEN:_NONCE_END], data[_NONCE_END:], data[:REQUEST_AD_LEN]
            )
        except InvalidTag:
            raise AuthError(f"{what} from key {client_pub.hex()} does not authenticate") from None
        if fresh:
            self._store(client_pub, entry)
        return client_pub, plain

    def seal_relay(self, client_pub: bytes, body: RelayBody, nonce: bytes | None = None) -> bytes:
        """The 102-byte relay message (type 4) to the client ``client_pub``."""
        return self._seal(client_pub, _HDR_RELAY, body.to_bytes(), nonce)

    def _seal(self, client_pub: bytes, hdr: bytes, plaintext: bytes, nonce: bytes | None) -> bytes:
        aead = self._aeads(client_pub)[2]
        nonce = _nonce(nonce)
        return hdr + nonce + aead.encrypt(nonce, plaintext, hdr)

    def seal_bytes(
        self, client_pub: bytes, t: MsgType, plaintext: bytes, nonce: bytes | None = None
    ) -> bytes:
        """A reply or notify datagram around any plaintext (for tests of lax parsing)."""
        if t not in (MsgType.REPLY, MsgType.NOTIFY):
            raise ValueError(f"the server seals replies and notifies, not type {t!r}")
        return self._seal(client_pub, header(t), bytes(plaintext), nonce)

    def seal_reply(self, client_pub: bytes, body: ReplyBody, nonce: bytes | None = None) -> bytes:
        """The reply datagram (70, 88 or 106 bytes) to the client ``client_pub``."""
        return self._seal(client_pub, _HDR_REPLY, body.to_bytes(), nonce)

    def seal_notify(self, client_pub: bytes, body: NotifyBody, nonce: bytes | None = None) -> bytes:
        """The notify datagram (98 or 116 bytes) to the client ``client_pub``."""
        return self._seal(client_pub, _HDR_NOTIFY, body.to_bytes(), nonce)
