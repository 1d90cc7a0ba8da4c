"""X25519 against the RFC 7748 test vectors, and against ``wg pubkey``."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from punch.wg.x25519 import BASE_POINT, public_from_private, x25519

h = bytes.fromhex


@pytest.mark.parametrize("scalar, u, out", [
    # RFC 7748 section 5.2
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    # the u-coordinate has its top bit set: it must be masked, not rejected
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
])
def test_rfc7748_vectors(scalar: str, u: str, out: str) -> None:
    assert x25519(h(scalar), h(u)) == h(out)


def test_rfc7748_iterated() -> None:
    k = u = BASE_POINT
    expected = {1: "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079",
                1000: "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"}
    for i in range(1, 1001):
        k, u = x25519(k, u), k
        if i in expected:
            assert k == h(expected[i]), i


def test_rfc7748_diffie_hellman() -> None:
    alice = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub, bob_pub = public_from_private(alice), public_from_private(bob)
    assert alice_pub == h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert bob_pub == h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert x25519(alice, bob_pub) == x25519(bob, alice_pub) == shared


def test_rejects_wrong_lengths() -> None:
    with pytest.raises(ValueError):
        x25519(b"\x00" * 31, BASE_POINT)
    with pytest.raises(ValueError):
        public_from_private(b"\x00" * 33)


@pytest.mark.skipif(not shutil.which("wg"), reason="needs wireguard-tools (wg)")
def test_matches_wg_pubkey() -> None:
    for _ in range(5):
        private = os.urandom(32)  # wg pubkey clamps, as X25519 does
        out = subprocess.run(["wg", "pubkey"], input=base64.b64encode(private) + b"\n",
                             capture_output=True, check=True).stdout
        assert public_from_private(private) == base64.b64decode(out.strip())
