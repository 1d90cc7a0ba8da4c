"""rendezvous.v2.keys: against the stored vectors and against the real `wg` tool."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from rendezvous.v2.keys import (
    KeyFormatError,
    decode_key,
    encode_key,
    generate_private_key,
    public_key,
    read_key_file,
)
from tests.rendezvous.v2 import vectors

needs_wg = pytest.mark.skipif(
    shutil.which("wg") is None, reason="wireguard-tools (wg) is not installed"
)


def wg(*args: str, stdin: str = "") -> str:
    return subprocess.run(
        ["wg", *args], input=stdin, capture_output=True, text=True, check=True, timeout=10
    ).stdout


def test_generate_is_clamped_and_random() -> None:
    keys = {generate_private_key() for _ in range(64)}
    assert len(keys) == 64
    for k in keys:
        assert len(k) == 32 and k[0] & 7 == 0 and k[31] & 0x80 == 0 and k[31] & 0x40


def test_public_key_vectors() -> None:
    for who in ("client", "server", "peer"):
        assert public_key(vectors.key(f"{who}_private")) == vectors.key(f"{who}_public")


@needs_wg
def test_public_key_matches_wg_pubkey() -> None:
    for _ in range(5):
        private = generate_private_key()
        assert wg("pubkey", stdin=encode_key(private) + "\n").strip() == encode_key(
            public_key(private)
        )


@needs_wg
def test_decode_wg_genkey() -> None:
    text = wg("genkey")
    private = decode_key(text)
    assert encode_key(private) == text.strip()
    assert encode_key(public_key(private)) == wg("pubkey", stdin=text).strip()


def test_encode_decode_round_trip() -> None:
    for raw in (bytes(32), b"\xff" * 32, bytes(range(32)), generate_private_key()):
        text = encode_key(raw)
        assert len(text) == 44 and text.endswith("=")
        assert decode_key(text) == raw
        assert decode_key(f"  {text}\n") == raw
        assert decode_key(text.encode()) == raw


def test_encode_errors() -> None:
    with pytest.raises(KeyFormatError, match="a key must be 32 bytes, got 31"):
        encode_key(bytes(31))
    with pytest.raises(KeyFormatError, match="got str"):
        encode_key("x" * 32)  # type: ignore[arg-type]


GOOD = encode_key(bytes(range(32)))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"key is 0 characters, not 44 \(base64 of 32 bytes\)"),
        (GOOD[:-1], "key is 43 characters, not 44"),
        (GOOD + "=", "key is 45 characters"),
        (base64.b64encode(bytes(64)).decode(), "key is 88 characters"),
        (GOOD[:42] + "=A", "key is not valid base64"),  # padding inside
        (GOOD[:10] + "*" + GOOD[11:], "key is not valid base64"),
        (GOOD[:10] + " " + GOOD[11:], "key is not valid base64"),
        ("-" + GOOD[1:], "key is not valid base64"),  # the URL-safe alphabet is not wg's
        ("_" + GOOD[1:], "key is not valid base64"),
        (GOOD[:42] + "==", "key is not the canonical base64 of 32 bytes"),  # 31 bytes
        (GOOD[:43] + "A", "key is not the canonical base64 of 32 bytes"),  # 33 bytes
        (GOOD[:42] + "B=", "key is not the canonical base64 of 32 bytes"),  # stray low bits
    ],
)
def test_decode_errors(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        decode_key(text)


def test_decode_never_echoes_the_text() -> None:
    secret = encode_key(generate_private_key())
    for bad in (secret[:-2], secret[:20] + "!" + secret[21:], secret[:42] + "=="):
        with pytest.raises(KeyFormatError) as info:
            decode_key(bad)
        assert secret[:16] not in str(info.value)


def test_decode_type_errors() -> None:
    with pytest.raises(KeyFormatError, match="key must be text, got NoneType"):
        decode_key(None)  # type: ignore[arg-type]
    with pytest.raises(KeyFormatError, match="key is not ASCII base64"):
        decode_key("é".encode() * 22)


def test_is_a_value_error() -> None:
    assert issubclass(KeyFormatError, ValueError)


def test_public_key_errors() -> None:
    with pytest.raises(KeyFormatError, match="private key must be 32 bytes, got 44"):
        public_key(GOOD.encode())


def test_read_key_file(tmp_path: Path) -> None:
    raw = generate_private_key()
    path = tmp_path / "server.key"
    path.write_text(encode_key(raw) + "\n")
    assert read_key_file(path) == raw
    assert read_key_file(str(path)) == raw


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "key is 0 characters"),
        (b"\n\n", "key is 0 characters"),
        ((GOOD + "\n" + GOOD + "\n").encode(), "key is 89 characters"),
        (b"\xff" * 44, "not ASCII base64"),
        (b"A" * 5000, "more than 4096 bytes, not one key"),
        (b"PrivateKey = " + GOOD.encode(), "key is 57 characters"),
    ],
)
def test_read_key_file_bad_content(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFormatError, match=f"key file {path}: .*{message}"):
        read_key_file(path)


def test_read_key_file_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_key_file(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        read_key_file(tmp_path)


@needs_wg
def test_read_key_file_written_by_wg(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    path.write_text(wg("genkey"))
    assert (
        encode_key(public_key(read_key_file(path))) == wg("pubkey", stdin=path.read_text()).strip()
    )
