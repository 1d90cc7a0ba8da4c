"""--log-format: the formatter, then the real programs (wg-rendezvous on loopback,
wg-punch against wireguard-go in a namespace) with every stderr line parsed as JSON."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
import time

import pytest

from rendezvous.logsetup import JsonFormatter, configure, fail, peer_fields
from tests.nstools import Netns, py_env
from tests.rendezvous.test_server import RunningServer, ask, client

A, B = b"A" * 32, b"B" * 32


def test_peer_fields():
    assert peer_fields(A, ("1.2.3.4", 5)) == {"peer": "QUFBQUFB…", "addr": "1.2.3.4:5"}
    assert peer_fields(addr=("2001:db8::1", 5)) == {"addr": "[2001:db8::1]:5"}
    assert peer_fields(A, None, reason="x", keepalive=25, gone=None) == {
        "peer": "QUFBQUFB…", "reason": "x", "keepalive": 25}


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("wg-test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_formatter_has_the_fields_and_the_same_message():
    rec = _record("peer %s: endpoint %s", "QUFBQUFB…", "1.2.3.4:5", peer="QUFBQUFB…",
                  addr="1.2.3.4:5", keepalive=25, odd=object(), stats={"found": 2})
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "warning" and doc["logger"] == "wg-test"
    assert doc["message"] == "peer QUFBQUFB…: endpoint 1.2.3.4:5"
    assert doc["peer"] == "QUFBQUFB…" and doc["addr"] == "1.2.3.4:5" and doc["keepalive"] == 25
    assert doc["odd"].startswith("<object object") and doc["stats"] == {"found": 2}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert "args" not in doc and "msg" not in doc and "exc_info" not in doc


def test_json_formatter_keeps_an_exception_on_one_line():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exception"]


def test_configure_text_and_json_and_fail(capsys):
    out = io.StringIO()
    try:
        configure("json", stream=out)
        logging.getLogger("t").info("hello %d", 1, extra=peer_fields(A))
        logging.getLogger("t").debug("hidden")
        fail("wg-x", "it broke", "json")
        configure("text", verbose=True, stream=out)
        logging.getLogger("t").debug("shown")
    finally:
        logging.getLogger().handlers.clear()
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["message"] for x in lines[:2]] == ["hello 1", "it broke"]
    assert json.loads(lines[1])["fatal"] is True and json.loads(lines[1])["logger"] == "wg-x"
    assert re.fullmatch(r"\S+ \S+ DEBUG shown", lines[2])
    fail("wg-x", "plain", "text")
    assert capsys.readouterr().err == "wg-x: plain\n"
    with pytest.raises(ValueError, match="log format must be one of text, json, got 'xml'"):
        configure("xml")


def _json_lines(text: str) -> list[dict]:
    lines = text.splitlines()
    assert lines, "no log lines"
    return [json.loads(line) for line in lines]  # each must be one JSON object


def test_server_json_logs_every_line_with_peer_fields():
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "-v", "--log-format", "json")
    a = client()
    assert ask(a, s.addr, A, B) == b""
    a.sendto(b"short", s.addr)
    time.sleep(0.2)
    code, err = s.finish()
    assert code == 0
    docs = _json_lines(err)
    port = a.getsockname()[1]
    asks = [d for d in docs if d.get("target")]
    assert asks == [{
        "time": asks[0]["time"], "level": "debug", "logger": "rendezvous.server",
        "message": f"127.0.0.1:{port}: QUFBQUFB… asks for QkJCQkJC… -> not found",
        "peer": "QUFBQUFB…", "addr": f"127.0.0.1:{port}", "target": "QkJCQkJC…",
        "result": "not_found"}]
    dropped = [d for d in docs if d.get("result") == "dropped"]
    assert dropped[0]["addr"] == f"127.0.0.1:{port}" and "5-byte" in dropped[0]["message"]
    assert any(d["message"].startswith("listening on 127.0.0.1:") for d in docs)
    assert docs[-1]["message"] == "stopped"


def test_server_text_log_is_unchanged():
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "-v")
    a = client()
    ask(a, s.addr, A, B)
    _, err = s.finish()
    assert re.search(r"^\S+ \S+ DEBUG 127\.0\.0\.1:\d+: QUFBQUFB… asks for QkJCQkJC… -> not found$",
                     err, re.M), err


def test_server_listen_error_in_json_is_one_json_line():
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", "--port",
                        str(port), "--log-format", "json"], capture_output=True, text=True,
                       env=py_env(), timeout=30)
    busy.close()
    assert r.returncode == 1
    [doc] = _json_lines(r.stderr)
    assert doc["level"] == "error" and doc["logger"] == "wg-rendezvous"
    assert doc["message"] == f"cannot listen on 127.0.0.1:{port}: address already in use"


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_punch_json_logs_every_line_with_peer_fields():
    from tests.punch.test_client import Pair, start_server

    with Netns("lj") as ns:
        pair = Pair(ns)
        port = start_server(ns)
        server = f"127.0.0.1:{port}"
        a = ns.popen([sys.executable, "-m", "punch", "--log-format", "json", "-v", "--wait",
                      "--timeout", "20", server, pair.ifs[0]])
        time.sleep(0.3)
        b = ns.run([sys.executable, "-m", "punch", "--log-format", "json", "--wait",
                    "--timeout", "20", server, pair.ifs[1]], check=False)
        assert b.returncode == 0, b.stderr
        assert a.wait(25) == 0
        a_docs = _json_lines(a.stderr.read().decode())
        b_docs = _json_lines(b.stderr)
        alice, bob = pair.keys[0][1], pair.keys[1][1]
        applied = [d for d in b_docs if d["message"].startswith("peer ")]
        assert applied and applied[0]["peer"] == alice[:8] + "…"
        assert applied[0]["addr"] == "127.0.0.1:51820" and applied[0]["keepalive"] == 25
        assert applied[0]["message"] == \
            f"peer {alice[:8]}…: endpoint 127.0.0.1:51820 (no endpoint), keepalive 25s"
        asking = [d for d in a_docs if d["message"].startswith("asking for")]
        assert asking and all(d["peer"] == bob[:8] + "…" and d["level"] == "debug"
                              for d in asking)
        # A fatal error is a JSON line too, not a bare "wg-punch: ..." line.
        r = ns.run([sys.executable, "-m", "punch", "--log-format", "json", "--timeout", "1",
                    "127.0.0.1:9", pair.ifs[0]], check=False)
        assert r.returncode == 6
        last = _json_lines(r.stderr)[-1]
        assert last["level"] == "error" and last["fatal"] is True
        assert last["message"].startswith("no reply from the server 127.0.0.1:9 within 1s")
