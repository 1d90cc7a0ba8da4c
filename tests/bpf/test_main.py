"""python -m bpf prints the filters the client attaches."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bpf import encode, format_c, format_decimal, ipv4_reply_filter
from bpf.__main__ import main
from tests.bpf.test_programs import GOLDEN_IPV4, GOLDEN_IPV6
from tests.nstools import REPO, py_env


def test_ipv4_golden(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ipv4", "--server", "198.51.100.7", "--wg-port", "51820"]) == 0
    assert capsys.readouterr().out == GOLDEN_IPV4


def test_ipv4_explicit_port_and_formats(capsys: pytest.CaptureFixture[str]) -> None:
    prog = ipv4_reply_filter("198.51.100.7", 1234, 51820, 6)
    args = ["ipv4", "--server", "198.51.100.7:1234", "--wg-port", "51820", "--max-payload", "6"]
    main([*args, "--c"])
    assert capsys.readouterr().out == format_c(prog)
    main([*args, "--decimal"])
    assert capsys.readouterr().out == format_decimal(prog)
    main([*args, "--hex"])
    assert capsys.readouterr().out == encode(prog).hex() + "\n"


@pytest.mark.parametrize("server", ["2001:db8::7", "[2001:db8::7]:49918", "[2001:db8::7]"])
def test_ipv6_golden(capsys: pytest.CaptureFixture[str], server: str) -> None:
    assert main(["ipv6", "--server", server, "--wg-port", "51820"]) == 0
    assert capsys.readouterr().out == GOLDEN_IPV6


@pytest.mark.parametrize("argv,message", [
    (["ipv4", "--server", "198.51.100", "--wg-port", "1"], "--server '198.51.100'"),
    (["ipv4", "--server", "198.51.100.7:x", "--wg-port", "1"], "--server"),
    (["ipv6", "--server", "[2001:db8::7", "--wg-port", "1"], "expected [IPv6]:PORT"),
    (["ipv4", "--server", "198.51.100.7", "--wg-port", "0"], "wg_port=0 is not a UDP port"),
    (["ipv4", "--server", "198.51.100.7", "--wg-port", "1", "--c", "--hex"], "not allowed"),
    (["ipv4", "--wg-port", "1"], "--server"),
])
def test_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_teaches() -> None:
    r = subprocess.run([sys.executable, "-m", "bpf", "--help"], capture_output=True, text=True,
                       cwd=REPO, env=py_env(), timeout=60)
    assert r.returncode == 0
    for phrase in ("raw socket", "SKF_NET_OFF", "tcpdump -d", "ldxb 4*([0]&0xf)", "examples:"):
        assert phrase in r.stdout


def test_module_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "bpf", "ipv6", "--server", "2001:db8::7",
                        "--wg-port", "51820"], capture_output=True, text=True, cwd=REPO,
                       env=py_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == GOLDEN_IPV6
