"""The daemon's NAT re-check in the v2 shell (punch.v2client): when it runs, what a
changed, an unchanged and an unanswered check do, and how it runs beside the loop. The
probe itself (raw sockets to a real server, :class:`punch.netprobe.ProbeRun`) is
replaced here by scripted runs, over a real socket pair where the loop's poller is
involved; the probe is tested in test_netprobe.py, and the whole path in the lab
(tests/lab/test_spray_lab.py)."""

from __future__ import annotations

import logging
import random
import socket

import pytest

from punch.client import Options
from punch.netcheck import Recheck, Verdict
from punch.policy import DeviceView, PeerView, Timing
from punch.v2client import ClientV2
from punch.v2machine import PunchV2
from rendezvous.nat import Mapping, NatVerdict
from rendezvous.v2.wire import Endpoint, ReplyBody, Status

ME, PEER = b"M" * 32, b"P" * 32
EASY = Verdict(NatVerdict(Mapping.ENDPOINT_INDEPENDENT, True), ("192.0.2.1", 51820), False,
               "seen at two ports")
HARD = Verdict(NatVerdict(Mapping.ADDRESS_AND_PORT_DEPENDENT, False), ("192.0.2.1", 40001),
               False, "a new mapping per destination port")
SILENT = Verdict(NatVerdict(), None, False, "no reply from the server's port to the probe")
WALL = 1_700_000_000_000_000_000


class _Device:
    public_key = ME
    listen_port = 51820


class Run:
    """A scripted NAT check: done at once with VERDICT, unless SOCK is given; then it
    waits for one datagram on SOCK, and its tries are due every second."""

    wg_port = 51820

    def __init__(self, verdict: Verdict, now: float, sock: socket.socket | None = None):
        self._verdict, self.sock = verdict, sock
        self.done = sock is None
        self.due = now + 1.0
        self.tries = 1
        self.closed = False

    def waiting(self) -> list[int]:
        return [] if self.done or self.sock is None else [self.sock.fileno()]

    def next_wakeup(self) -> float:
        return float("inf") if self.done else self.due

    def readable(self, fd: int) -> None:
        assert self.sock is not None and fd == self.sock.fileno()
        self.sock.recv(100)
        self.done = True

    def tick(self, now: float) -> None:
        if not self.done and now >= self.due:
            self.tries += 1
            self.due = now + 1.0

    def verdict(self) -> Verdict:
        return self._verdict

    def close(self) -> None:
        self.closed = True


class Scripted(ClientV2):
    """ClientV2 whose NAT checks are the next of VERDICTS (None: the probe could not
    start), each a :class:`Run` on ``self.sock`` when that is set."""

    def __init__(self, verdicts: list[Verdict | None]) -> None:
        super().__init__(Options(server="192.0.2.9:49918", interface="wg0", daemon=True,
                                 server_key=bytes(32), probe_port=49919, nat_recheck=30))
        self.verdicts = verdicts
        self.probes: list[float] = []
        self.runs: list[Run] = []
        self.sock: socket.socket | None = None
        self.servers = {4: ("192.0.2.9", 49918)}
        self.device, self.wg_port = _Device(), 51820  # type: ignore[assignment]
        self.crypto = object()  # type: ignore[assignment]
        self.machine = PunchV2(Timing(request_timeout=1.0, interval=20.0), daemon=True,
                               families=(4,), randbits=random.Random(1).getrandbits,
                               nat=EASY.code)
        self.nat_verdict = EASY
        self.recheck = Recheck(after=30)
        self.recheck.start(0.0)

    def _begin_check(self, now):  # type: ignore[override]
        self.probes.append(now)
        verdict = self.verdicts.pop(0)
        if verdict is None:
            return None
        run = Run(verdict, now, self.sock)
        self.runs.append(run)
        return run


def stuck_client(verdicts: list[Verdict | None]) -> Scripted:
    """A client whose one peer got our endpoint at t=0.5 and has given no handshake."""
    c = Scripted(verdicts)
    m = c.machine
    assert isinstance(m, PunchV2)
    m.update_device(0.0, DeviceView(ME, (PeerView(PEER),)))
    [send] = m.poll(0.0, WALL)
    m.on_reply(0.5, ReplyBody(send.body.request_id, Status.FOUND, WALL,
                              Endpoint("192.0.2.1", 51820),
                              (Endpoint("198.51.100.7", 51820),), EASY.code), 4)
    return c


def test_a_changed_verdict_goes_to_the_machine_and_out_at_once(caplog):
    c = stuck_client([HARD])
    m = c.machine
    assert isinstance(m, PunchV2)
    c._maybe_recheck(30.0)  # stuck for 29.5 s: not yet
    assert c.probes == []
    with caplog.at_level(logging.INFO, "wg-punch"):
        c._maybe_recheck(30.5)
    assert len(c.probes) == 1 and c.nat_checks == c.nat_changes == 1
    assert c.nat_verdict == HARD and m.nat == HARD.code and c.nat_checked_at == 30.5
    assert "checked again (a peer has waited 30 s for a working tunnel): now " \
           "address-and-port-dependent" in caplog.text
    assert c.runs[0].closed
    # the new byte goes out now
    [send] = m.poll(30.6, WALL)
    assert send.body.nat == HARD.code


@pytest.mark.parametrize("second", [SILENT, None, EASY])
def test_an_unanswered_failed_or_unchanged_check_keeps_the_verdict(second):
    c = stuck_client([second])
    c._maybe_recheck(31.0)
    assert len(c.probes) == 1 and c.nat_checks == 1 and c.nat_changes == 0
    assert c.nat_verdict == EASY and c.machine.nat == EASY.code
    c._maybe_recheck(90.0)  # backed off: 60 s after the last check
    assert len(c.probes) == 1
    c.verdicts.append(EASY)
    c._maybe_recheck(91.0)
    assert len(c.probes) == 2


def test_no_check_without_a_stuck_peer_until_the_periodic_one():
    c = Scripted([EASY])
    c._maybe_recheck(1799.0)
    assert c.probes == []
    c._maybe_recheck(1800.0)
    assert len(c.probes) == 1


def test_after_a_failed_check_at_start_an_unanswered_one_is_no_change_a_real_one_is():
    c = stuck_client([SILENT, HARD])
    c.nat_verdict = None
    c.machine.nat = 0
    c._maybe_recheck(31.0)
    assert c.nat_verdict is None and c.nat_changes == 0 and c.machine.nat == 0
    c._maybe_recheck(91.0)
    assert c.nat_verdict == HARD and c.nat_changes == 1 and c.machine.nat == HARD.code


@pytest.fixture
def sockets():
    """A real socket pair: the check waits on the first, the test answers on the second."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def checking(sock: socket.socket, verdict: Verdict = HARD) -> Scripted:
    """A stuck client whose check (waiting on SOCK) started at t=31."""
    c = stuck_client([verdict])
    c.sock = sock
    c._maybe_recheck(31.0)
    return c


def test_the_check_runs_beside_the_loop_which_goes_on_meanwhile(caplog, sockets):
    """A check that waits for its answer: the daemon's loop keeps polling and asking
    the server, the poller watches the check's socket until the answer is in, and the
    verdict lands then."""
    a, b = sockets
    c = checking(a)
    m = c.machine
    [run] = c.runs
    assert not run.done and c.check is run and c.nat_changes == 0
    assert c._side_wakeup() == 32.0  # its next try
    assert c.poller.poll(0) == []    # its socket is watched, and quiet
    c._side_turn(set(), 32.0)
    assert run.tries == 2 and c._side_wakeup() == 33.0
    c._maybe_recheck(32.5)           # a check runs: no second one
    assert len(c.probes) == 1
    # meanwhile the machine goes on: a request for the peer when it is due
    sends = m.poll(60.0, WALL)
    assert sends and all(s.body.nat == EASY.code for s in sends)
    b.send(b"answer")
    ready = {fd for fd, _ in c.poller.poll(1000)}
    assert ready == {a.fileno()}
    with caplog.at_level(logging.INFO, "wg-punch"):
        c._side_turn(ready, 60.1)
    assert run.done and run.closed and c.check is None
    assert c.nat_verdict == HARD and m.nat == HARD.code and c.nat_changes == 1
    assert c._side_wakeup() == float("inf")
    b.send(b"late")
    assert c.poller.poll(0) == []    # no longer watched
    assert "checked again (a peer has waited 30 s for a working tunnel)" in caplog.text


def test_a_check_over_a_port_that_changed_meanwhile_gives_no_verdict(sockets):
    a, b = sockets
    c = checking(a)
    c.wg_port = 51821  # WireGuard's port moved (refresh_device reopened the channels)
    b.send(b"answer")
    c._side_turn({a.fileno()}, 31.2)
    assert c.check is None and c.nat_checks == 1 and c.nat_changes == 0
    assert c.nat_verdict == EASY


def test_closing_the_client_closes_a_check_in_progress(sockets):
    c = checking(sockets[0])
    [run] = c.runs
    c.close()
    assert run.closed and c.check is None


def test_a_check_whose_socket_fails_ends_without_a_verdict_and_the_daemon_goes_on(
        caplog, sockets):
    class Failing(Run):
        def readable(self, fd: int) -> None:
            raise OSError(100, "Network is down")

    a, b = sockets
    c = checking(a)
    [run] = c.runs
    run.__class__ = Failing
    b.send(b"answer")
    with caplog.at_level(logging.WARNING, "wg-punch"):
        c._side_turn({a.fileno()}, 31.2)
    assert c.check is None and run.closed and c.nat_checks == 1 and c.nat_changes == 0
    assert c.nat_verdict == EASY
    assert c.poller.poll(0) == []  # no longer watched
    assert "NAT check over IPv4 failed: [Errno 100] Network is down; the verdict stays " \
           "as it was" in caplog.text
    c.verdicts.append(HARD)
    c._maybe_recheck(92.0)  # the next one, backed off, runs as usual
    assert len(c.probes) == 2
