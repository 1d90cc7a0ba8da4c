"""The state file codec and its atomic writer."""

from __future__ import annotations

import base64
import json
import os
import random

import pytest

from punch.statefile import (
    InterfaceState,
    PeerRecord,
    StateFileError,
    decode,
    default_dir,
    encode,
    read,
    state_path,
    write_atomic,
)

K1, K2 = bytes(range(32)), bytes(range(100, 132))

STATE = InterfaceState(
    interface="wg0", pid=1234, mode="daemon", server="203.0.113.7:49918", started=1.5,
    updated=9.25, ended=None, last_reply=9.0,
    peers={K1: PeerRecord("applied", "198.51.100.4:51820", True, 9.0, "198.51.100.4:51820", 2.0,
                          path="relay"),
           K2: PeerRecord("not found", None, False, 8.0)})


def test_round_trip():
    data = encode(STATE)
    assert data.endswith(b"}\n")
    assert decode(data) == STATE
    doc = json.loads(data)
    assert doc["version"] == 1
    assert list(doc["peers"]) == [base64.b64encode(K1).decode(), base64.b64encode(K2).decode()]
    assert doc["peers"][base64.b64encode(K2).decode()] == {
        "status": "not found", "answer": None, "answer_found": False, "answered_at": 8.0,
        "applied": None, "applied_at": None, "nat": "unknown", "path": None}
    assert doc["peers"][base64.b64encode(K1).decode()]["path"] == "relay"


def test_unknown_fields_are_ignored():
    doc = json.loads(encode(STATE))
    doc["future"] = {"x": 1}
    doc["peers"][base64.b64encode(K1).decode()]["relay"] = "yes"
    assert decode(json.dumps(doc).encode()) == STATE


def _mutated(**changes: object) -> bytes:
    doc = json.loads(encode(STATE))
    for path, value in changes.items():
        *parents, last = [base64.b64encode(K1).decode() if p == "K1" else p
                          for p in path.split("__")]
        target = doc
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("data,msg", [
    (b"{", "not a JSON document: "),
    (b"[]", "state must be a JSON object, got list"),
    (_mutated(version=2), "state: version 2 is not supported (expected 1)"),
    (_mutated(version="1"), "state: field 'version' must be int, got '1'"),
    (_mutated(mode="sometimes"),
     "state: field 'mode' must be one of daemon, once, got 'sometimes'"),
    (_mutated(pid=KeyError), "state: field 'pid' is missing"),
    (_mutated(pid=True), "state: field 'pid' must be int, got True"),
    (_mutated(updated="now"), "state: field 'updated' must be int or float, got 'now'"),
    (_mutated(started=None), "state: field 'started' must be int or float, got None"),
    (_mutated(peers=[]), "state: field 'peers' must be dict, got []"),
    (_mutated(peers__K1__status=3), "field 'status' must be str, got 3"),
    (_mutated(peers__K1__answer_found="yes"), "field 'answer_found' must be bool, got 'yes'"),
    (_mutated(peers__K1="x"), "must be a JSON object, got 'x'"),
    (_mutated(peers={"nokey": {}}), "peer 'nokey': not a base64 WireGuard key"),
])
def test_bad_documents_name_the_field(data, msg):
    with pytest.raises(StateFileError) as e:
        decode(data)
    assert msg in str(e.value)


def test_random_mutations_decode_or_raise_our_error():
    good = encode(STATE)
    rng = random.Random(8)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode(bytes(data))
        except StateFileError:
            pass


def test_state_path_refuses_names_that_climb_out(tmp_path):
    assert state_path(tmp_path, "wg0") == tmp_path / "wg0.json"
    for bad in ("", ".", "..", "a/b", "../etc"):
        with pytest.raises(StateFileError, match="cannot name a state file"):
            state_path(tmp_path, bad)


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WG_PUNCH_STATE_DIR", str(tmp_path))
    assert default_dir() == tmp_path
    monkeypatch.delenv("WG_PUNCH_STATE_DIR")
    assert str(default_dir()) == "/run/wg-punch"


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "wg0.json"
    assert read(path) is None
    write_atomic(path, encode(STATE))
    assert read(path) == STATE
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"
    # A reader holding the old file keeps reading the old contents: it was replaced, not
    # rewritten in place.
    with open(path, "rb") as old:
        write_atomic(path, b"new\n")
        assert decode(old.read()) == STATE
    assert path.read_bytes() == b"new\n"
    assert sorted(os.listdir(path.parent)) == ["wg0.json"]


def test_write_atomic_that_fails_leaves_no_temporary(tmp_path):
    target = tmp_path / "wg0.json"
    target.mkdir()  # rename() onto a directory fails, even for root
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"new")
    assert os.listdir(tmp_path) == ["wg0.json"] and target.is_dir()


def test_nat_verdicts_round_trip_and_default_to_unknown():
    state = InterfaceState(
        interface="wg0", pid=1, mode="once", server="s", started=1.0, updated=2.0,
        nat="endpoint-independent+port-preserved",
        peers={K1: PeerRecord("applied", nat="address-and-port-dependent")})
    doc = json.loads(encode(state))
    assert doc["nat"] == "endpoint-independent+port-preserved"
    assert doc["peers"][base64.b64encode(K1).decode()]["nat"] == "address-and-port-dependent"
    assert decode(encode(state)) == state
    del doc["nat"]  # a file from before verdicts
    assert decode(json.dumps(doc).encode()).nat == "unknown"
    doc["nat"] = 5
    with pytest.raises(StateFileError, match="state: field 'nat' must be str, got 5"):
        decode(json.dumps(doc).encode())


def test_nat_checks_round_trip_and_an_older_file_has_none():
    state = InterfaceState(
        interface="wg0", pid=1, mode="daemon", server="s", started=1.0, updated=2.0,
        nat="address-and-port-dependent", nat_checked=1.75, nat_checks=3, nat_changes=1)
    doc = json.loads(encode(state))
    assert (doc["nat_checked"], doc["nat_checks"], doc["nat_changes"]) == (1.75, 3, 1)
    assert decode(encode(state)) == state
    for name in ("nat_checked", "nat_checks", "nat_changes"):  # a file from before them
        del doc[name]
    old = decode(json.dumps(doc).encode())
    assert (old.nat_checked, old.nat_checks, old.nat_changes) == (None, 0, 0)
    for value, msg in ((-1, "state: nat_checks must be a count, got -1"),
                       (1.5, "state: field 'nat_checks' must be int, got 1.5"),
                       (True, "state: field 'nat_checks' must be int, got True")):
        doc["nat_checks"] = value
        with pytest.raises(StateFileError, match=msg.replace(".", r"\.")):
            decode(json.dumps(doc).encode())
