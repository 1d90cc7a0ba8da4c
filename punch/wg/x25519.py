"""X25519 (RFC 7748) in pure Python: enough to derive a public key from a private key.

Not constant-time; it runs once per UAPI device read on a key the local root user
already holds, so timing leaks reveal nothing new.
"""

from __future__ import annotations

__all__ = ["x25519", "public_from_private", "BASE_POINT"]

P = 2**255 - 19
A24 = 121665
BASE_POINT = (9).to_bytes(32, "little")


def _clamp(scalar: bytes) -> int:
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return int.from_bytes(k, "little")


def x25519(scalar: bytes, u: bytes) -> bytes:
    """The X25519 function: scalar multiplication on the Montgomery ladder (RFC 7748 §5)."""
    if len(scalar) != 32 or len(u) != 32:
        raise ValueError("X25519 takes a 32-byte scalar and a 32-byte u-coordinate")
    k = _clamp(scalar)
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)  # mask the top bit (§5)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in reversed(range(255)):
        bit = (k >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a = (x2 + z2) % P
        aa = a * a % P
        b = (x2 - z2) % P
        bb = b * b % P
        e = (aa - bb) % P
        c = (x3 + z3) % P
        d = (x3 - z3) % P
        da = d * a % P
        cb = c * b % P
        x3 = (da + cb) ** 2 % P
        z3 = x1 * (da - cb) ** 2 % P
        x2 = aa * bb % P
        z2 = e * (aa + A24 * e) % P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


def public_from_private(private_key: bytes) -> bytes:
    """The WireGuard public key of a 32-byte private key."""
    return x25519(private_key, BASE_POINT)
