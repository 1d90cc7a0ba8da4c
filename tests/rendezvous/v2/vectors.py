"""Load tests/data/v2_vectors.json and turn its fields into codec objects."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from rendezvous.v2.wire import Endpoint, NotifyBody, ReplyBody, RequestBody

PATH = Path(__file__).resolve().parents[2] / "data" / "v2_vectors.json"


@cache
def load() -> dict[str, Any]:
    return json.loads(PATH.read_text())


def key(name: str) -> bytes:
    return bytes.fromhex(load()["keys"][name])


def messages(t: int | None = None, canonical: bool | None = None) -> list[dict[str, Any]]:
    return [
        m
        for m in load()["messages"]
        if (t is None or m["type"] == t) and (canonical is None or m["canonical"] == canonical)
    ]


def body(m: dict[str, Any]) -> RequestBody | ReplyBody | NotifyBody:
    f = m["fields"]
    if m["type"] == 1:
        return RequestBody(
            f["timestamp"], f["request_id"], bytes.fromhex(f["peer"]), f["nat"], f["flags"]
        )
    eps = tuple(Endpoint.parse(e) for e in f["endpoints"])
    if m["type"] == 2:
        observed = None if f["observed"] is None else Endpoint.parse(f["observed"])
        return ReplyBody(
            f["request_id"], f["status"], f["server_time"], observed, eps, f["peer_nat"]
        )
    return NotifyBody(f["server_time"], bytes.fromhex(f["peer"]), eps, f["peer_nat"])
