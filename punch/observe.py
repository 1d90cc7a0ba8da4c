"""Observers of the punch loop: the state file writer (and, in punch.metrics, the
metrics collector) watch the client without the loop knowing what they do.

The loop calls ``opened(client)`` once the device and the socket are set up,
``tick(client, now)`` on every turn (``now`` is the loop's monotonic clock), and
``closed(client)`` when it ends, however it ends. An observer must be cheap and must
never raise into the loop: a state file that cannot be written is logged once and
the punching goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rendezvous.nat import nat_name

from .machine import PeerState, Punch, Status
from .statefile import (
    DEFAULT_DIR,
    ENV_DIR,
    InterfaceState,
    PeerRecord,
    default_dir,
    encode,
    state_path,
    write_atomic,
)

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Observer", "StateWriter", "add_arguments", "build_state", "from_args"]

log = logging.getLogger(__name__)


class Observer:
    """The hooks of the punch loop; every one is a no-op here."""

    def opened(self, client: Client) -> None:
        """The client is open: device read, socket ready, nothing sent yet."""

    def tick(self, client: Client, now: float) -> None:
        """One turn of the loop (NOW on the loop's monotonic clock)."""

    def closed(self, client: Client) -> None:
        """The loop has ended (also after an error)."""


def _record(st: PeerState, to_wall: Callable[[float], float]) -> PeerRecord:
    # The classic and the v2 machines' peer states share these fields but one: v2
    # keeps its miss counts per family, so its latest answer found the peer if the
    # status says so.
    answered_at = st.answered_at
    misses = getattr(st, "misses", 0)
    found = None if answered_at is None else (misses == 0 and st.answer is not None
                                              and st.status is not Status.NOT_FOUND)
    return PeerRecord(
        status=st.status.value,
        answer=str(st.answer) if st.answer is not None else None,
        answer_found=found,
        answered_at=to_wall(answered_at) if answered_at is not None else None,
        applied=str(st.applied) if st.applied is not None else None,
        applied_at=to_wall(st.applied_at) if st.applied_at is not None else None,
        nat=nat_name(getattr(st, "peer_nat", 0)),  # v2 only; classic peers are unknown
        path=getattr(st, "path", None) or None,  # v2 only
    )


def build_state(machine: Punch, *, interface: str, pid: int, daemon: bool, server: str,
                started: float, last_reply: float | None, mono_now: float, wall_now: float,
                ended: bool = False, nat: str = "unknown", nat_checked: float | None = None,
                nat_checks: int = 0, nat_changes: int = 0) -> InterfaceState:
    """The state file's contents from MACHINE; monotonic times become unix times.

    STARTED is already unix time; LAST_REPLY and NAT_CHECKED are monotonic (None: no
    reply yet, no NAT check).
    """
    def to_wall(t: float) -> float:
        return round(wall_now - (mono_now - t), 3)

    return InterfaceState(
        interface=interface, pid=pid, mode="daemon" if daemon else "once", server=server,
        started=started, updated=round(wall_now, 3), ended=round(wall_now, 3) if ended else None,
        last_reply=to_wall(last_reply) if last_reply is not None else None,
        peers={k: _record(st, to_wall) for k, st in machine.peers.items()}, nat=nat,
        nat_checked=to_wall(nat_checked) if nat_checked is not None else None,
        nat_checks=nat_checks, nat_changes=nat_changes)


def _progress(client: Client) -> tuple[object, ...]:
    """What the state file shows changes when this does (v2: peers' verdicts too)."""
    m = client.machine
    c = m.counters
    nats = tuple(getattr(st, "peer_nat", 0) for st in m.peers.values())
    return (c.sent, c.replies, c.lost, c.applied, len(m.peers), nats,
            getattr(client, "nat_checks", 0), getattr(client, "nat_changes", 0))


class StateWriter(Observer):
    """Keep DIRECTORY/INTERFACE.json current: on change (at most every MIN_GAP seconds),
    at least every HEARTBEAT seconds, and once more at the end."""

    def __init__(self, directory: Path | str, min_gap: float = 1.0,
                 heartbeat: float = 30.0) -> None:
        self.directory = Path(directory)
        self.min_gap = min_gap
        self.heartbeat = heartbeat
        self.path: Path | None = None
        self._started = time.time()
        self._last_write = float("-inf")
        self._last_seen: tuple[object, ...] | None = None
        self._failed = False

    def opened(self, client: Client) -> None:
        # The first write waits for the first tick: the first request goes out first.
        self.path = state_path(self.directory, client.opts.interface)
        self._started = time.time()

    def tick(self, client: Client, now: float) -> None:
        if self.path is None:
            return
        seen = _progress(client)
        if seen == self._last_seen and now - self._last_write < self.heartbeat:
            return
        if now - self._last_write < self.min_gap:
            return
        self._write(client, now)

    def closed(self, client: Client) -> None:
        if self.path is not None:
            self._write(client, time.monotonic(), ended=True)

    def _write(self, client: Client, now: float, ended: bool = False) -> None:
        assert self.path is not None
        self._last_seen = _progress(client)
        self._last_write = now
        server = client.channel.server if client.channel is not None else None
        state = build_state(
            client.machine, interface=client.opts.interface, pid=os.getpid(),
            daemon=client.opts.daemon,
            server=f"{server[0]}:{server[1]}" if server else client.opts.server,
            started=round(self._started, 3),
            last_reply=getattr(client, "last_reply", None) if client.machine.replied else None,
            mono_now=now, wall_now=time.time(), ended=ended, nat=_own_nat(client),
            nat_checked=getattr(client, "nat_checked_at", None),  # v2 with --probe-port
            nat_checks=getattr(client, "nat_checks", 0),
            nat_changes=getattr(client, "nat_changes", 0))
        try:
            write_atomic(self.path, encode(state))
        except OSError as e:
            if not self._failed:
                log.warning("cannot write the state file %s: %s (wg-punch status will not "
                            "see this run)", self.path, e.strerror or e)
                self._failed = True
            return
        self._failed = False


def _own_nat(client: Client) -> str:
    verdict = getattr(client, "nat_verdict", None)  # v2 with --probe-port only
    return verdict.nat.token if verdict is not None else "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """wg-punch's --state-dir and --no-state."""
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help=f"write the state `wg-punch status` reads to DIR/INTERFACE.json "
                             f"(default ${ENV_DIR} or {DEFAULT_DIR})")
    parser.add_argument("--no-state", action="store_true", help="write no state file")


def from_args(args: argparse.Namespace) -> tuple[Observer, ...]:
    """The observers the options ask for; starts the metrics listener (MetricsError)."""
    observers: list[Observer] = []
    if not args.no_state:
        observers.append(StateWriter(args.state_dir or default_dir()))
    if getattr(args, "metrics", None) is not None:
        from .metrics import start

        observers.append(start(args.metrics))
    return tuple(observers)
