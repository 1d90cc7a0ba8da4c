"""The v2 client shell (``wg-punch --server-key``): :class:`ClientV2` drives
:class:`punch.v2machine.PunchV2`.

Requests are sealed with keys derived from the interface's own private key (read from
the device) and the pinned server key, and go out over IPv4 and IPv6: one raw socket
per family the server has an address of and this host has a route for (a family that
fails to open is counted and skipped). Every datagram from the server is opened and
authenticated before the machine sees it; one that does not open is counted and
dropped. Only this module imports ``cryptography`` (through rendezvous.v2.crypto), so
the classic path never pays for it.
"""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING, Protocol

from rendezvous.classic import short_key
from rendezvous.logsetup import peer_fields

from .client import Client, Options, _view, resolve_servers
from .errors import BadInterface, BadServerKey, NotPermitted, PunchError, ServerUnreachable
from .machine import Apply as ClassicApply
from .machine import Keepalive, Punch
from .netcheck import Recheck, Verdict
from .v2machine import Apply, Bind, PunchV2, Send, Spray, SprayConfig

if TYPE_CHECKING:
    from rendezvous.v2.crypto import ClientCrypto

    from .rawsock import RawChannel
    from .wg import Device

__all__ = ["CheckRun", "ClientV2"]

log = logging.getLogger("wg-punch")


class CheckRun(Protocol):
    """A NAT check in progress, as the loop drives it (:class:`punch.netprobe.ProbeRun`)."""

    wg_port: int
    done: bool

    def waiting(self) -> list[int]: ...

    def next_wakeup(self) -> float: ...

    def readable(self, fd: int) -> None: ...

    def tick(self, now: float) -> None: ...

    def verdict(self) -> Verdict: ...

    def close(self) -> None: ...


class ClientV2(Client):
    """The v2 client: sealed requests over every family that reaches the server."""

    protocol = "v2"

    def __init__(self, opts: Options) -> None:
        self.crypto: ClientCrypto | None = None
        self.failed_channels = 0
        self.auth_failed = 0
        self.malformed = 0
        self.nat_verdict: Verdict | None = None  # this host's (with --probe-port)
        self._told_nat: dict[bytes, int] = {}    # the peer verdicts logged so far
        self.sprayed = 0                         # datagrams sent by sprays
        self.bind_failed = 0
        self.recheck: Recheck | None = None      # daemon with --probe-port
        self.nat_checks = 0                      # NAT checks after the one at start
        self.nat_changes = 0                     # ... that found another verdict
        self.nat_checked_at: float | None = None  # when the latest check ended (monotonic)
        self.probe_next_ts = 0                   # after a NAT check: our next timestamp
        self.probe_ids: set[int] = set()         # ... and its request ids
        self.check: CheckRun | None = None       # a NAT re-check in progress
        self._check_why = ""
        self._check_fds: set[int] = set()        # its sockets, in the loop's poller
        super().__init__(opts)

    def _make_machine(self) -> Punch | PunchV2:
        opts = self.opts
        return PunchV2(opts.timing, daemon=opts.daemon, only=opts.peers, families=opts.families,
                       relay=opts.relay)

    def _resolve(self) -> None:
        self.servers = resolve_servers(self.opts.server, self.opts.families)

    def _open_channels(self, device: Device) -> None:
        from .rawsock import open_channel, source_address_for

        opts = self.opts
        if device.private_key is None:
            raise BadInterface(f"cannot read the private key of {opts.interface} "
                               "(v2 proves ownership of it to the server)")
        assert opts.server_key is not None
        try:
            from rendezvous.v2.crypto import AuthError, ClientCrypto
        except ImportError as e:
            raise PunchError(f"v2 needs the cryptography package: {e}") from None
        try:
            self.crypto = ClientCrypto(device.private_key, opts.server_key)
        except (AuthError, ValueError) as e:
            raise BadServerKey(f"--server-key is not a usable server key: {e}") from None
        nat = 0
        if opts.probe_port is not None:
            nat = self._netcheck(device)
        for family, server in self.servers.items():
            try:
                source_address_for(server)
                self.channels.append(open_channel(server, device.listen_port))
            except NotPermitted:
                raise
            except (PunchError, OSError) as e:
                self.failed_channels += 1
                log.info("IPv%d: not using the server at %s: %s", family, server[0], e)
        if not self.channels:
            raise ServerUnreachable(f"no route to the server {self._server_text()}")
        # Only the families that opened are asked over.
        spray = SprayConfig(opts.spray_count, opts.spray_rate) if opts.spray else None
        self.machine = PunchV2(opts.timing, daemon=opts.daemon, only=opts.peers,
                               families=[c.family for c in self.channels], nat=nat,
                               spray=spray, relay=opts.relay)
        self.machine.stamped_elsewhere(self.probe_next_ts)

    def _netcheck(self, device: Device) -> int:
        """Probe this host's NAT (over IPv4 when the server has an IPv4 address: that is
        the NAT that matters; else over IPv6) before the first request; the nat byte
        every request then carries. A probe that fails leaves the verdict unknown."""
        from .netcheck import advice

        verdict = self._check_nat(device, device.listen_port)
        self.nat_checked_at = time.monotonic()
        if self.opts.daemon and self.opts.nat_recheck > 0:
            self.recheck = Recheck(after=self.opts.nat_recheck)
            self.recheck.start(time.monotonic())
        if verdict is None:
            return 0
        self.nat_verdict = verdict
        log.info("NAT (this host, IPv%d): %s; %s (%s)", self._nat_family(), verdict.nat,
                 advice(verdict.nat), verdict.reason, extra={"nat": verdict.nat.token})
        return verdict.code

    def _nat_family(self) -> int:
        return 4 if 4 in self.servers else 6

    def _check_failed(self, family: int, error: Exception) -> None:
        log.warning("NAT check over IPv%d failed: %s; the verdict stays %s", family, error,
                    "unknown" if self.nat_verdict is None else "as it was")

    def _check_nat(self, device: Device, wg_port: int) -> Verdict | None:
        """One NAT check from WG_PORT, waited for (the one at start: the first request
        carries its verdict); None (logged) when the probe could not run. The lowest
        timestamp the client may use next is left in ``probe_next_ts``."""
        from .netcheck import decide
        from .netprobe import ProbeConfig, V2Exchange, probe

        opts = self.opts
        assert self.crypto is not None and opts.probe_port is not None
        assert device.public_key is not None
        family = self._nat_family()
        server = self.servers[family]
        exchange = V2Exchange(self.crypto, device.public_key,
                              self.nat_verdict.code if self.nat_verdict else 0)
        try:
            obs, _ = probe(server, wg_port, ProbeConfig(opts.probe_port, opts.probe_address),
                           exchange)
        except NotPermitted:
            raise
        except (PunchError, OSError) as e:
            self._check_failed(family, e)
            return None
        finally:
            self.probe_next_ts = exchange.next_timestamp
            self.probe_ids = exchange.issued
        return decide(obs)

    def _maybe_recheck(self, now: float) -> None:
        """Daemon with --probe-port: start a NAT check again when :class:`Recheck` says
        so. The check runs beside the loop (:meth:`_side_turn`), which goes on with
        everything else meanwhile; its end is :meth:`_end_check`."""
        machine, recheck = self.machine, self.recheck
        if recheck is None or not isinstance(machine, PunchV2) or self.check is not None:
            return
        stuck = machine.stuck_since()
        if not recheck.due(now, stuck):
            return
        self._check_why = ("a peer has waited %.0f s for a working tunnel" % (now - stuck)
                           if stuck is not None else "the periodic check")
        run = self._begin_check(now)
        if run is None:
            self._end_check(now, None)
            return
        self.check = run
        self._side_turn(set(), now)  # it may have ended already

    def _begin_check(self, now: float) -> CheckRun | None:
        """The probe of a re-check, started (its first tries sent); None (logged) when
        it cannot start. Its timestamps come from the machine's clock, which goes on
        stamping our requests meanwhile."""
        from .netprobe import ProbeConfig, ProbeRun, V2Exchange

        opts, machine, device = self.opts, self.machine, self.device
        assert isinstance(machine, PunchV2) and device is not None
        assert self.crypto is not None and opts.probe_port is not None
        assert device.public_key is not None
        family = self._nat_family()
        exchange = V2Exchange(self.crypto, device.public_key,
                              self.nat_verdict.code if self.nat_verdict else 0,
                              stamps=machine)
        try:
            run = ProbeRun(self.servers[family], self.wg_port,
                           ProbeConfig(opts.probe_port, opts.probe_address), exchange, now)
        except NotPermitted:
            raise
        except (PunchError, OSError) as e:
            self._check_failed(family, e)
            return None
        self.probe_ids = exchange.issued  # grows with every try the run sends
        return run

    def _side_wakeup(self) -> float:
        return self.check.next_wakeup() if self.check is not None else float("inf")

    def _side_turn(self, ready: set[int], now: float) -> None:
        """The re-check's turn: read its ready sockets, send its next try when due, keep
        the poller watching exactly its unanswered sockets, and end it when it is done."""
        run = self.check
        if run is None:
            return
        failed: OSError | None = None
        try:
            for fd in run.waiting():
                if fd in ready:
                    run.readable(fd)
            run.tick(now)
        except OSError as e:  # its raw sockets (the network went away): the check fails,
            failed = e        # the daemon goes on
        wanted = set(run.waiting()) if failed is None else set()
        for fd in self._check_fds - wanted:
            self.poller.unregister(fd)
        for fd in wanted - self._check_fds:
            self.poller.register(fd, select.POLLIN)
        self._check_fds = wanted
        if failed is None and not run.done:
            return
        self.check = None
        run.close()
        if failed is not None:
            self._check_failed(self._nat_family(), failed)
            self._end_check(now, None)
        elif run.wg_port != self.wg_port:
            log.info("NAT check again: WireGuard's port changed during it; no verdict")
            self._end_check(now, None)
        else:
            self._end_check(now, run.verdict())

    def _end_check(self, now: float, checked: Verdict | None) -> None:
        """A re-check ended with CHECKED (None: it could not run); tell the machine
        (hence the server and the peers) a verdict that changed."""
        from .netcheck import advice, replacing

        machine, recheck = self.machine, self.recheck
        assert isinstance(machine, PunchV2) and recheck is not None
        self.nat_checks += 1
        self.nat_checked_at = now
        old = self.nat_verdict
        verdict = replacing(old, checked)
        recheck.checked(now, verdict is not None)
        why = self._check_why
        if verdict is None:
            log.debug("NAT checked again (%s): unchanged", why)
            return
        self.nat_verdict = verdict
        self.nat_changes += 1
        machine.set_nat(verdict.code, now)
        log.info("NAT (this host, IPv%d) checked again (%s): now %s, was %s; %s (%s); "
                 "telling the peers", self._nat_family(), why, verdict.nat,
                 old.nat if old is not None else "unknown", advice(verdict.nat),
                 verdict.reason, extra={"nat": verdict.nat.token})

    def close(self) -> None:
        if self.check is not None:
            self.check.close()
            self.check = None
        super().close()

    def summary(self) -> str:
        assert not isinstance(self.machine, Punch)
        c = self.machine.counters
        ignored = sum(ch.ignored for ch in self.channels)
        fams = ",".join(str(ch.family) for ch in self.channels)
        return (f"requests={c.sent} replies={c.replies} lost={c.lost} late={c.late} "
                f"unknown={c.unknown} stale={c.stale} notifies={c.notifies} "
                f"old_notifies={c.old_notifies} auth_failed={self.auth_failed} "
                f"malformed={self.malformed} applied={c.applied} fallbacks={c.fallbacks} "
                f"sprays={c.sprays} sprayed={self.sprayed} nat_checks={self.nat_checks} "
                f"nat_changes={self.nat_changes} "
                f"ignored_packets={ignored} families={fams} failed_channels={self.failed_channels}"
                + (f" relay_asked={c.relay_asked} relay_offers={c.relay_offers} "
                   f"relay_old={c.relay_old} relay_declined={c.relay_declined} "
                   f"binds={c.binds} bind_failed={self.bind_failed} "
                   f"upgrade_tries={c.upgrade_tries} upgrades={c.upgrades} paths="
                   + ",".join(f"{short_key(st.key)}:{st.path or 'none'}"
                              for st in self.machine.peers.values())
                   if self.opts.relay is not None else ""))

    def apply(self, action: ClassicApply | Apply | Keepalive | Spray) -> None:  # type: ignore[override]
        if isinstance(action, Spray):
            self._spray(action)
            return
        if isinstance(action, Apply) and action.endpoint.family == 6:
            self._before_ipv6(action.peer)
        super().apply(action)

    def _before_ipv6(self, peer: bytes) -> None:
        """Tell the machine what WireGuard has for PEER right before we set an IPv6
        endpoint (one UAPI/netlink read, only for IPv6 endpoints): a handshake the
        peer already made over that endpoint proves it."""
        assert self.backend is not None and not isinstance(self.machine, Punch)
        try:
            device = self.backend.get_device()
        except Exception as e:  # the interface may be gone for a moment
            log.debug("cannot read %s before setting an endpoint: %s", self.opts.interface, e)
            return
        for view in _view(device, time.time()).peers:
            if view.key == peer:
                self.machine.before_apply(time.monotonic(), view)

    def _send_due(self, now: float) -> None:
        machine = self.machine
        assert self.crypto is not None and not isinstance(machine, Punch)
        self._maybe_recheck(now)
        for action in machine.poll(now, time.time_ns()):
            if isinstance(action, Send):
                log.debug("asking for %s over IPv%d (id %08x)", short_key(action.peer),
                          action.family, action.body.request_id,
                          extra=peer_fields(action.peer))
                channel = next(c for c in self.channels if c.family == action.family)
                channel.send_to_server(self.crypto.seal_request(action.body))
            else:
                self._act(action)

    def _act(self, action: object) -> None:
        if isinstance(action, Bind):
            self._send_bind(action)
        else:
            self.apply(action)  # type: ignore[arg-type]

    def _send_bind(self, action: Bind) -> None:
        """The bind to the relay, from WireGuard's port: the relay learns the public
        address:port that WireGuard's own packets to it will come from."""
        from rendezvous.v2.wire import BindBody

        machine = self.machine
        assert self.crypto is not None and not isinstance(machine, Punch)
        relay = action.relay
        channel = self._channel_for(relay.ip)
        datagram = self.crypto.seal_bind(BindBody(machine.stamp(time.time_ns()), action.peer))
        if channel is None or not channel.send((relay.ip, relay.port), datagram):
            self.bind_failed += 1
            log.info("peer %s: cannot send the bind to the relay %s", short_key(action.peer),
                     relay, extra=peer_fields(action.peer, relay))
            return
        log.debug("peer %s: bind sent to the relay %s", short_key(action.peer), relay,
                  extra=peer_fields(action.peer, relay))

    def _take_replies(self, channel: RawChannel) -> None:
        from rendezvous.v2.crypto import AuthError
        from rendezvous.v2.wire import NotifyBody, RelayBody, WireError

        machine = self.machine
        assert self.crypto is not None and not isinstance(machine, Punch)
        for payload in channel.replies():
            now = time.monotonic()
            try:
                body = self.crypto.open(payload)
            except AuthError:
                self.auth_failed += 1
                log.debug("a %d-byte datagram from the server does not authenticate",
                          len(payload))
                continue
            except WireError as e:
                self.malformed += 1
                log.debug("a malformed datagram from the server: %s", e)
                continue
            self.last_reply = now
            if isinstance(body, NotifyBody):
                log.debug("notify over IPv%d: peer %s", channel.family, short_key(body.peer))
                actions = machine.on_notify(now, body, channel.family)
            elif isinstance(body, RelayBody):
                log.debug("relay over IPv%d: peer %s at %s", channel.family,
                          short_key(body.peer), body.relay)
                actions = machine.on_relay(now, body)
            elif body.request_id in self.probe_ids:
                # The NAT check's reply from the server's usual port, which reaches this
                # socket too (the check reads it from its own): not a request of ours.
                log.debug("reply over IPv%d: id %08x, the NAT check's", channel.family,
                          body.request_id)
                continue
            else:
                log.debug("reply over IPv%d: id %08x %s", channel.family, body.request_id,
                          body.status.name.lower())
                actions = machine.on_reply(now, body, channel.family)
            for action in actions:
                self._act(action)
            self._log_peer_nat()

    def _log_peer_nat(self) -> None:
        """Log each peer's NAT verdict when the server first tells it, or it changes."""
        from rendezvous.nat import UNKNOWN, NatVerdict

        from .netcheck import pair_advice

        machine = self.machine
        assert not isinstance(machine, Punch)
        mine = self.nat_verdict.nat if self.nat_verdict is not None else UNKNOWN
        for key, st in machine.peers.items():
            if self._told_nat.get(key, 0) == st.peer_nat:
                continue
            self._told_nat[key] = st.peer_nat
            theirs = NatVerdict.from_byte(st.peer_nat)
            log.info("peer %s: NAT %s; between us: %s", short_key(key), theirs,
                     pair_advice(mine, theirs), extra=peer_fields(key, nat=theirs.token))


    def _spray(self, spray: Spray) -> None:
        """Send the spray's empty datagrams from WireGuard's port, paced to its rate (a
        burst of at most count/rate seconds: 0.1 s by default)."""
        channel = self._channel_for(spray.ip)
        if channel is None:
            return
        chunk = max(1, int(spray.rate / 100))
        start = time.monotonic()
        sent = 0
        for i, port in enumerate(spray.ports):
            if i and i % chunk == 0:
                delay = start + i / spray.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if channel.send((spray.ip, port), b""):
                sent += 1
        self.sprayed += sent
        ports = spray.ports
        log.info("peer %s: its NAT is hard and ours easy: sprayed %d empty datagrams to %s "
                 "ports %d-%d in %.0f ms, so its handshake gets through our NAT",
                 short_key(spray.peer), sent, spray.ip, ports.start, ports.stop - 1,
                 (time.monotonic() - start) * 1000,
                 extra=peer_fields(spray.peer, spray.ip, sprayed=sent))

    def _silent(self) -> str:
        port = next(iter(self.servers.values()))[1]
        return (f"no reply from the server {self._server_text()} within "
                f"{self.opts.timeout:g}s (is wg-rendezvous running there with --key, is UDP "
                f"port {port} open, and is --server-key its public key?)")

    def _not_found(self, names: str) -> str:
        return (f"no answer yet for peer(s) {names}: they have not asked this server for "
                "us recently (v2 answers only peers that ask for each other: run "
                "wg-punch --server-key on them too)")
