"""wg-punch's state file: what it last learnt per peer, for ``wg-punch status``.

One small JSON file per interface (``/run/wg-punch/INTERFACE.json`` by default),
replaced atomically (write a temporary file in the same directory, fsync, rename),
so a reader sees the old file or the new one, never half of one. Times are unix
seconds (wall clock), so any process can compare them with the device's handshakes.

Pure encode/decode plus :func:`write_atomic` and :func:`read`; nothing here knows
about the punch loop. The document::

    {"version": 1, "interface": "wg0", "pid": 1234, "mode": "daemon",
     "server": "203.0.113.7:49918", "started": 1764620000.0, "updated": 1764620042.5,
     "ended": null, "last_reply": 1764620041.9, "nat": "endpoint-independent",
     "nat_checked": 1764620030.4, "nat_checks": 3, "nat_changes": 1,
     "peers": {"<base64 key>": {"status": "applied", "answer": "198.51.100.4:51820",
               "answer_found": true, "answered_at": 1764620041.9,
               "applied": "198.51.100.4:51820", "applied_at": 1764620001.2,
               "nat": "address-and-port-dependent"}}}

``nat`` (this host's) and each peer's ``nat`` are the tokens of :mod:`rendezvous.nat`
(``unknown`` until wg-punch --probe-port measures ours, or the server tells us a peer's).
``nat_checked`` is when this host's NAT was last checked (at start or again, whatever
the outcome; null: never), ``nat_checks`` and ``nat_changes`` how many checks the
daemon ran after the one at start and how many of them changed the verdict.

A reader ignores fields it does not know (a newer writer may add some) and rejects
a document whose version it does not know.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_DIR",
    "ENV_DIR",
    "VERSION",
    "InterfaceState",
    "PeerRecord",
    "StateFileError",
    "decode",
    "default_dir",
    "encode",
    "read",
    "state_path",
    "write_atomic",
]

VERSION = 1
DEFAULT_DIR = Path("/run/wg-punch")
ENV_DIR = "WG_PUNCH_STATE_DIR"  # overrides DEFAULT_DIR (for tests and odd layouts)
MODES = ("daemon", "once")


class StateFileError(ValueError):
    """A state file that cannot be read as one (names the field and the value)."""


@dataclass(frozen=True)
class PeerRecord:
    """What wg-punch knows about one peer. Endpoints are ``ip:port`` text."""

    status: str = "asking"             # punch.machine.Status values
    answer: str | None = None          # the server's latest endpoint for the peer
    answer_found: bool | None = None   # did the latest answer know the peer? None: no answer
    answered_at: float | None = None
    applied: str | None = None         # the endpoint wg-punch last set
    applied_at: float | None = None
    nat: str = "unknown"               # the peer's NAT verdict, as the server told it
    path: str | None = None            # v2: "direct", "relay" or "trying direct"


@dataclass(frozen=True)
class InterfaceState:
    interface: str
    pid: int
    mode: str
    server: str
    started: float
    updated: float
    ended: float | None = None
    last_reply: float | None = None
    peers: Mapping[bytes, PeerRecord] = field(default_factory=dict)
    nat: str = "unknown"  # this host's NAT verdict (wg-punch --probe-port)
    nat_checked: float | None = None  # when it was last checked (at start or again)
    nat_checks: int = 0   # the daemon's checks after the one at start ...
    nat_changes: int = 0  # ... and those that changed the verdict


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def encode(state: InterfaceState) -> bytes:
    """The file's bytes (UTF-8 JSON, one trailing newline)."""
    import json  # imported on first use: after wg-punch's first request is out

    doc = {
        "version": VERSION,
        "interface": state.interface,
        "pid": state.pid,
        "mode": state.mode,
        "server": state.server,
        "started": state.started,
        "updated": state.updated,
        "ended": state.ended,
        "last_reply": state.last_reply,
        "nat": state.nat,
        "nat_checked": state.nat_checked,
        "nat_checks": state.nat_checks,
        "nat_changes": state.nat_changes,
        "peers": {_b64(k): {
            "status": r.status, "answer": r.answer, "answer_found": r.answer_found,
            "answered_at": r.answered_at, "applied": r.applied, "applied_at": r.applied_at,
            "nat": r.nat, "path": r.path} for k, r in sorted(state.peers.items())},
    }
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


def _get(doc: Mapping[str, Any], name: str, kinds: tuple[type, ...], where: str,
         optional: bool = False) -> Any:
    if name not in doc:
        if optional:
            return None
        raise StateFileError(f"{where}: field {name!r} is missing")
    value = doc[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise StateFileError(f"{where}: field {name!r} must be {want}, got {value!r}")
    return value


def _time(doc: Mapping[str, Any], name: str, where: str, optional: bool = True) -> float | None:
    value = _get(doc, name, (int, float), where, optional)
    return None if value is None else float(value)


def decode(data: bytes) -> InterfaceState:
    """Parse a state file; :class:`StateFileError` says which field is wrong."""
    import json

    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"not a JSON document: {e}") from None
    if not isinstance(doc, dict):
        raise StateFileError(f"state must be a JSON object, got {type(doc).__name__}")
    version = _get(doc, "version", (int,), "state")
    if version != VERSION:
        raise StateFileError(f"state: version {version} is not supported (expected {VERSION})")
    mode = _get(doc, "mode", (str,), "state")
    if mode not in MODES:
        raise StateFileError(f"state: field 'mode' must be one of {', '.join(MODES)}, "
                             f"got {mode!r}")
    raw_peers = _get(doc, "peers", (dict,), "state")
    peers: dict[bytes, PeerRecord] = {}
    for text, rec in raw_peers.items():
        where = f"peer {text!r}"
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise StateFileError(f"{where}: not a base64 WireGuard key")
        if not isinstance(rec, dict):
            raise StateFileError(f"{where}: must be a JSON object, got {rec!r}")
        peers[key] = PeerRecord(
            status=_get(rec, "status", (str,), where),
            answer=_get(rec, "answer", (str,), where, optional=True),
            answer_found=_get(rec, "answer_found", (bool,), where, optional=True),
            answered_at=_time(rec, "answered_at", where),
            applied=_get(rec, "applied", (str,), where, optional=True),
            applied_at=_time(rec, "applied_at", where),
            nat=_get(rec, "nat", (str,), where, optional=True) or "unknown",
            path=_get(rec, "path", (str,), where, optional=True),
        )
    return InterfaceState(
        interface=_get(doc, "interface", (str,), "state"),
        pid=_get(doc, "pid", (int,), "state"),
        mode=mode,
        server=_get(doc, "server", (str,), "state"),
        started=_time(doc, "started", "state", optional=False),  # type: ignore[arg-type]
        updated=_time(doc, "updated", "state", optional=False),  # type: ignore[arg-type]
        ended=_time(doc, "ended", "state"),
        last_reply=_time(doc, "last_reply", "state"),
        peers=peers,
        nat=_get(doc, "nat", (str,), "state", optional=True) or "unknown",
        nat_checked=_time(doc, "nat_checked", "state"),
        nat_checks=_count(doc, "nat_checks"),
        nat_changes=_count(doc, "nat_changes"),
    )


def _count(doc: Mapping[str, Any], name: str) -> int:
    """A non-negative count; absent (an older writer): 0."""
    value = _get(doc, name, (int,), "state", optional=True)
    if value is None:
        return 0
    if value < 0:
        raise StateFileError(f"state: {name} must be a count, got {value!r}")
    return int(value)


def default_dir() -> Path:
    """``$WG_PUNCH_STATE_DIR`` if set, else ``/run/wg-punch``."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_DIR


def state_path(directory: Path | str, interface: str) -> Path:
    """DIRECTORY/INTERFACE.json; an interface name cannot climb out of DIRECTORY."""
    if not interface or "/" in interface or interface in (".", "..") or "\0" in interface:
        raise StateFileError(f"interface name {interface!r} cannot name a state file")
    return Path(directory) / f"{interface}.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Replace PATH with DATA atomically; creates the directory (0755) if needed.

    Readers see the old file or the new one (rename is atomic). DURABLE also fsyncs
    before the rename, for a file that must survive a crash; the state file lives in
    /run, which a crash empties anyway, and an fsync costs milliseconds on a disk.
    """
    import tempfile  # only writers need it (~5 ms to import)

    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read(path: Path) -> InterfaceState | None:
    """The state at PATH; None if there is no such file. Bad contents raise StateFileError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode(data)
