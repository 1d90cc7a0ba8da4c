"""Compute tests/data/v2_vectors.json from docs/PROTOCOL.md with fixed keys and nonces.

An independent second implementation of the v2 construction: it packs plaintexts
with ``struct`` straight from the tables in docs/PROTOCOL.md and seals them with the
``cryptography`` primitives, importing nothing from ``rendezvous``. The tests check
the codec against its output both ways (decode the datagrams, re-encode the fields).

    python3 tests/rendezvous/v2/make_vectors.py           # rewrite the JSON
    python3 tests/rendezvous/v2/make_vectors.py --check   # exit 1 if it is out of date
    python3 tests/rendezvous/v2/make_vectors.py --doc     # print the "Test vectors" section

The hex in docs/PROTOCOL.md's "Test vectors" section is :func:`render_doc`'s output
(a test keeps the two equal).
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

OUT = Path(__file__).resolve().parents[2] / "data" / "v2_vectors.json"

SALT = b"wgpunch v2 rendezvous"
HEADERS = {
    1: b"wgp\x02\x01\x00\x00\x00",
    2: b"wgp\x02\x02\x00\x00\x00",
    3: b"wgp\x02\x03\x00\x00\x00",
}

# Public keys of small order (RFC 7748 section 6.1; Bernstein's list used by libsodium
# and the Noise test suites): X25519 with any of them yields the all-zero secret.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p (= 0 mod p)
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1 (= 1 mod p)
]


def fixed_private(label: str) -> bytes:
    b = bytearray(hashlib.sha256(f"wgpunch v2 test vector {label}".encode()).digest())
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def fixed_nonce(name: str) -> bytes:
    return hashlib.sha256(f"wgpunch v2 test nonce {name}".encode()).digest()[:12]


def public(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def endpoint(text: str | None) -> bytes:
    """18 bytes: 16-byte address (IPv4 as ::ffff:a.b.c.d), 2-byte port; None -> zeros."""
    if text is None:
        return bytes(18)
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        addr = socket.inet_pton(socket.AF_INET6, host[1:-1])
    else:
        addr = bytes(10) + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host)
    return addr + struct.pack("!H", int(port))


def request_plain(f: dict[str, Any], reserved: int = 0) -> bytes:
    # timestamp 8 | request_id 4 | flags 1 | nat 1 | reserved 2 | peer_public 32
    peer = bytes.fromhex(f["peer"])
    return (
        struct.pack("!QIBBH", f["timestamp"], f["request_id"], f["flags"], f["nat"], reserved)
        + peer
    )


def reply_plain(f: dict[str, Any], reserved: int = 0) -> bytes:
    # request_id 4 | status 1 | peer_nat 1 | count 1 | reserved 1 | server_time 8
    # | observed 18 | n x 18
    eps = f["endpoints"]
    head = struct.pack(
        "!IBBBBQ", f["request_id"], f["status"], f["peer_nat"], len(eps), reserved, f["server_time"]
    )
    return head + endpoint(f["observed"]) + b"".join(endpoint(e) for e in eps)


def notify_plain(f: dict[str, Any], reserved: int = 0) -> bytes:
    # server_time 8 | peer_public 32 | peer_nat 1 | count 1 | reserved 2 | n x 18
    eps = f["endpoints"]
    head = struct.pack("!Q", f["server_time"]) + bytes.fromhex(f["peer"])
    head += struct.pack("!BBH", f["peer_nat"], len(eps), reserved)
    return head + b"".join(endpoint(e) for e in eps)


def build() -> dict[str, Any]:
    client_priv, server_priv, peer_priv = (fixed_private(x) for x in ("client", "server", "peer"))
    client_pub, server_pub, peer_pub = public(client_priv), public(server_priv), public(peer_priv)
    shared = X25519PrivateKey.from_private_bytes(client_priv).exchange(
        X25519PublicKey.from_public_bytes(server_pub)
    )
    assert shared == X25519PrivateKey.from_private_bytes(server_priv).exchange(
        X25519PublicKey.from_public_bytes(client_pub)
    )
    okm = HKDF(algorithm=SHA256(), length=64, salt=SALT, info=client_pub + server_pub).derive(
        shared
    )
    k_c2s, k_s2c = okm[:32], okm[32:]

    t0 = 1_796_000_000_123_456_789  # 2026-11-29, ns since the epoch
    cases: list[tuple[str, int, dict[str, Any], int, bytes]] = [
        # name, type, fields, reserved value written, trailing plaintext bytes
        (
            "request",
            1,
            dict(timestamp=t0, request_id=0x1234ABCD, flags=0, nat=2, peer=peer_pub.hex()),
            0,
            b"",
        ),
        (
            "request_self",
            1,
            dict(timestamp=t0 + 1, request_id=0xDEADBEEF, flags=0, nat=0, peer=client_pub.hex()),
            0,
            b"",
        ),
        (
            "reply_found",
            2,
            dict(
                request_id=0x1234ABCD,
                status=0,
                peer_nat=1,
                server_time=t0 + 500_000,
                observed="198.51.100.7:51820",
                endpoints=["[2001:db8::7]:51820", "203.0.113.9:40000"],
            ),
            0,
            b"",
        ),
        (
            "reply_found_one",
            2,
            dict(
                request_id=0x00000001,
                status=0,
                peer_nat=3,
                server_time=t0 + 600_000,
                observed="[2001:db8:1::2]:51820",
                endpoints=["[2001:db8::7]:51820"],
            ),
            0,
            b"",
        ),
        (
            "reply_pending",
            2,
            dict(
                request_id=0xDEADBEEF,
                status=1,
                peer_nat=0,
                server_time=t0 + 700_000,
                observed="[2001:db8:1::2]:51820",
                endpoints=[],
            ),
            0,
            b"",
        ),
        (
            "reply_stale",
            2,
            dict(
                request_id=0xFFFFFFFF,
                status=2,
                peer_nat=0,
                server_time=t0 + 2_000_000_000,
                observed="198.51.100.7:51820",
                endpoints=[],
            ),
            0,
            b"",
        ),
        (
            "reply_no_observed",
            2,
            dict(
                request_id=0x0BADF00D,
                status=1,
                peer_nat=0,
                server_time=t0,
                observed=None,
                endpoints=[],
            ),
            0,
            b"",
        ),
        (
            "notify",
            3,
            dict(
                server_time=t0 + 800_000,
                peer=peer_pub.hex(),
                peer_nat=1,
                endpoints=["203.0.113.9:40000"],
            ),
            0,
            b"",
        ),
        (
            "notify_two",
            3,
            dict(
                server_time=t0 + 900_000,
                peer=peer_pub.hex(),
                peer_nat=4,
                endpoints=["[2001:db8::7]:51820", "203.0.113.9:40000"],
            ),
            0,
            b"",
        ),
        # Lax parsing: a newer sender's non-zero reserved bytes and appended fields.
        (
            "request_extended",
            1,
            dict(timestamp=t0 + 2, request_id=0x01020304, flags=0, nat=1, peer=peer_pub.hex()),
            0xA5A5,
            b"future fields",
        ),
        (
            "reply_extended",
            2,
            dict(
                request_id=0x01020304,
                status=1,
                peer_nat=0,
                server_time=t0 + 3,
                observed="198.51.100.7:51820",
                endpoints=[],
            ),
            0x5A,
            b"\x01\x02\x03\x04",
        ),
        (
            "notify_extended",
            3,
            dict(
                server_time=t0 + 4, peer=peer_pub.hex(), peer_nat=0, endpoints=["203.0.113.9:40000"]
            ),
            0x0101,
            bytes(20),
        ),
    ]
    plain_of = {1: request_plain, 2: reply_plain, 3: notify_plain}
    messages = []
    for name, t, fields, reserved, trailing in cases:
        plain = plain_of[t](fields, reserved) + trailing
        nonce = fixed_nonce(name)
        if t == 1:
            ad = HEADERS[1] + client_pub
            datagram = ad + nonce + ChaCha20Poly1305(k_c2s).encrypt(nonce, plain, ad)
        else:
            ad = HEADERS[t]
            datagram = ad + nonce + ChaCha20Poly1305(k_s2c).encrypt(nonce, plain, ad)
        messages.append(
            {
                "name": name,
                "type": t,
                "canonical": reserved == 0 and not trailing,
                "fields": fields,
                "nonce": nonce.hex(),
                "plaintext": plain.hex(),
                "datagram": datagram.hex(),
                "length": len(datagram),
            }
        )
    return {
        "about": "docs/PROTOCOL.md v2 vectors, computed by tests/rendezvous/v2/make_vectors.py "
        "(struct + the cryptography package, no wgpunch code). Non-canonical messages carry "
        "non-zero reserved bytes and trailing plaintext: receivers must accept them.",
        "kdf_salt": SALT.decode(),
        "keys": {
            "client_private": client_priv.hex(),
            "client_public": client_pub.hex(),
            "server_private": server_priv.hex(),
            "server_public": server_pub.hex(),
            "peer_private": peer_priv.hex(),
            "peer_public": peer_pub.hex(),
            "shared": shared.hex(),
            "k_c2s": k_c2s.hex(),
            "k_s2c": k_s2c.hex(),
        },
        "low_order_publics": LOW_ORDER,
        "messages": messages,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


DOC_MESSAGES = {
    "request": "Request",
    "reply_found": "Reply, found, two endpoints",
    "notify": "Notify, one endpoint",
}


def _hex_lines(data: bytes, indent: str = "        ") -> list[str]:
    return [indent + data[i : i + 32].hex() for i in range(0, len(data), 32)]


def _describe(m: dict[str, Any], keys: dict[str, str]) -> str:
    f = dict(m["fields"])
    for k, v in list(f.items()):
        if isinstance(v, str) and v in keys.values():
            f[k] = next(name for name, hexed in keys.items() if hexed == v)
        elif k == "request_id":
            f[k] = f"0x{v:08x}"
        elif k == "status":
            f[k] = f"{v} ({('found', 'pending', 'stale')[v]})"
        elif k == "endpoints":
            f[k] = "[" + ", ".join(v) + "]"
    return ", ".join(f"{k} {v}" for k, v in f.items())


def render_doc(data: dict[str, Any] | None = None) -> str:
    """The body of docs/PROTOCOL.md's "Test vectors" section (after its heading)."""
    data = build() if data is None else data
    keys = data["keys"]
    intro = (
        "`tests/data/v2_vectors.json` holds the keys, the shared secret, the derived keys and "
        f"{len(data['messages'])} sealed messages with fixed nonces: every type and status, "
        '0 to 2 endpoints, the "none" observed endpoint, and three non-canonical messages '
        "(non-zero reserved bytes and appended plaintext) that receivers must accept. "
        "`tests/rendezvous/v2/make_vectors.py` computes them with `struct` and the "
        "`cryptography` package alone (no wgpunch code); `tests/rendezvous/v2/` checks the "
        "codec against them both ways, and that the hex below is theirs. Private keys are "
        '`sha256("wgpunch v2 test vector <who>")` clamped, nonces the first 12 bytes of '
        '`sha256("wgpunch v2 test nonce <name>")`. All values are hex; the hex of a datagram '
        "is shown 32 bytes to a line."
    )
    out = [*textwrap.wrap(intro, 88, break_on_hyphens=False, break_long_words=False), ""]
    width = max(len(k) for k in keys)
    out += [f"    {k.ljust(width)}  {v}" for k, v in keys.items() if k != "peer_private"]
    for name, title in DOC_MESSAGES.items():
        m = next(x for x in data["messages"] if x["name"] == name)
        text = f"**{title}** (`{name}`, {m['length']} bytes): {_describe(m, keys)}."
        out += [
            "",
            *textwrap.wrap(text, 90, break_on_hyphens=False),
            "",
            f"    nonce     {m['nonce']}",
            "    plaintext",
            *_hex_lines(bytes.fromhex(m["plaintext"])),
            "    datagram",
            *_hex_lines(bytes.fromhex(m["datagram"])),
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if args == ["--doc"]:
        print(render_doc(), end="")
        return 0
    if args:
        print("usage: make_vectors.py [--check | --doc]", file=sys.stderr)
        return 2
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
