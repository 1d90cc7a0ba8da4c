"""X25519 keys as ``wg`` writes them: 32 raw bytes, shown as 44 characters of base64.

``cryptography`` is imported only by :func:`public_key`, so encoding, decoding and
reading keys stay cheap to import.
"""

from __future__ import annotations

import base64
import binascii
import os

__all__ = [
    "KEY_LEN",
    "KeyFormatError",
    "decode_key",
    "encode_key",
    "generate_private_key",
    "public_key",
    "read_key_file",
]

KEY_LEN = 32
_B64_LEN = 44  # base64 of 32 bytes, one "=" of padding
_MAX_FILE = 4096


class KeyFormatError(ValueError):
    """Text or bytes that are not a key (base64 of exactly 32 bytes)."""


def _clamp(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key() -> bytes:
    """32 random bytes clamped as X25519 requires (what ``wg genkey`` does)."""
    return _clamp(os.urandom(KEY_LEN))


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (what ``wg pubkey`` does)."""
    if not isinstance(private, (bytes, bytearray)) or len(private) != KEY_LEN:
        raise KeyFormatError(f"private key must be {KEY_LEN} bytes, got {_size(private)}")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = X25519PrivateKey.from_private_bytes(bytes(private)).public_key()
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _size(value: object) -> str:
    return str(len(value)) if isinstance(value, (bytes, bytearray)) else type(value).__name__


def encode_key(raw: bytes) -> str:
    """The 44-character base64 form of a 32-byte key."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_LEN:
        raise KeyFormatError(f"a key must be {KEY_LEN} bytes, got {_size(raw)}")
    return base64.b64encode(bytes(raw)).decode("ascii")


def decode_key(text: str | bytes) -> bytes:
    """The 32 bytes of a base64 key; surrounding whitespace is ignored.

    Strict like ``wg``: exactly 44 characters of the standard alphabet, one ``=`` of
    padding and no stray bits in the last character.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise KeyFormatError("key is not ASCII base64") from None
    if not isinstance(text, str):
        raise KeyFormatError(f"key must be text, got {type(text).__name__}")
    # The text is never echoed: it may be a (mangled) private key.
    s = text.strip()
    if len(s) != _B64_LEN:
        raise KeyFormatError(
            f"key is {len(s)} characters, not {_B64_LEN} (base64 of {KEY_LEN} bytes)"
        )
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("key is not valid base64 (A-Z a-z 0-9 + / and one '=')") from None
    if len(raw) != KEY_LEN or base64.b64encode(raw).decode("ascii") != s:
        raise KeyFormatError(f"key is not the canonical base64 of {KEY_LEN} bytes")
    return raw


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The key in a file holding one base64 key (like ``wg``'s key files).

    Bad content raises :class:`KeyFormatError` naming the file; :class:`OSError`
    (missing file, no permission) passes through.
    """
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise KeyFormatError(
            f"key file {os.fspath(path)}: more than {_MAX_FILE} bytes, not one key"
        )
    try:
        return decode_key(data.decode("ascii"))
    except UnicodeDecodeError:
        raise KeyFormatError(f"key file {os.fspath(path)}: not ASCII base64") from None
    except KeyFormatError as e:
        raise KeyFormatError(f"key file {os.fspath(path)}: {e}") from None
