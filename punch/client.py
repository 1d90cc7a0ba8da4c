"""The client's I/O loop: reads the device, drives the punch state machine, and
carries out its actions on the raw socket(s) and the WireGuard backend.

Classic (the default): :class:`Client` with :class:`punch.machine.Punch`, one IPv4 raw
socket. v2 (``--server-key``): :class:`punch.v2client.ClientV2`, a subclass that only
this path imports.

No decisions are made here beyond *when to stop*, which depends on the mode.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rendezvous.classic import DEFAULT_PORT, short_key
from rendezvous.logsetup import peer_fields

from .errors import BadInterface, NotPermitted, PunchError, ServerUnresolvable
from .machine import Apply, DeviceView, Keepalive, PeerView, Punch, Timing

if TYPE_CHECKING:
    from . import v2machine
    from .observe import Observer
    from .rawsock import RawChannel
    from .wg import Backend, Device

__all__ = ["Client", "Options", "Result", "resolve_server", "resolve_servers", "run",
           "split_server"]

log = logging.getLogger("wg-punch")

IFF_UP = 0x1

# Exit statuses (documented in --help).
EXIT_OK = 0
EXIT_SILENT = 6
EXIT_NOT_FOUND = 7
EXIT_NO_HANDSHAKE = 8


@dataclass(frozen=True)
class Options:
    server: str
    interface: str
    timeout: float = 60.0
    wait: bool = False
    daemon: bool = False
    peers: frozenset[bytes] | None = None
    timing: Timing = field(default_factory=Timing)
    device_refresh: float = 1.0
    server_key: bytes | None = None      # v2: the server's pinned public key
    families: tuple[int, ...] = (4, 6)   # v2: the address families to use
    observers: tuple[Observer, ...] = ()  # see punch.observe: state file, metrics
    probe_port: int | None = None        # v2: the server's probe port (NAT verdict at start)
    probe_address: str | None = None     # v2: the server's second (probe) address
    spray: bool = True                   # v2: spray toward a hard peer when we are easy
    spray_count: int = 512               # ... that many ports (and datagrams)
    spray_rate: float = 5000.0           # ... at most that many a second
    relay: v2machine.RelayTiming | None = None  # v2: the relay fallback (None: off)
    nat_recheck: float = 30.0            # v2 daemon with probe_port: see netcheck.Recheck


@dataclass
class Result:
    code: int
    message: str = ""


def split_server(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``IPV6``, ``[IPV6]`` or ``[IPV6]:PORT`` to (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ServerUnresolvable(f"bad server address {text!r} (use [IPV6]:PORT)")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") > 1:  # a bare IPv6 address: no port
        host, port_text = text, str(DEFAULT_PORT)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            host, port_text = text, str(DEFAULT_PORT)
    try:
        port = int(port_text)
        if not 0 < port <= 65535:
            raise ValueError
    except ValueError:
        raise ServerUnresolvable(f"bad server port in {text!r}") from None
    if not host:
        raise ServerUnresolvable(f"no server host in {text!r}")
    return host, port


def resolve_server(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` to an IPv4 (address, port); the classic protocol is IPv4 only."""
    host, port = split_server(text)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        if ":" in host:
            raise ServerUnresolvable(f"server {host!r} is IPv6: the classic protocol is IPv4 "
                                     "only (v2, with --server-key, speaks IPv6)") from None
        raise ServerUnresolvable(f"cannot resolve server {host!r}: {e.strerror}") from None
    return str(infos[0][4][0]), port


def resolve_servers(text: str, families: tuple[int, ...] = (4, 6)) -> dict[int, tuple[str, int]]:
    """``HOST[:PORT]`` to one (address, port) per family it has among FAMILIES."""
    host, port = split_server(text)
    wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ServerUnresolvable(f"cannot resolve server {host!r}: {e.strerror}") from None
    out: dict[int, tuple[str, int]] = {}
    for af, _, _, _, sockaddr in infos:
        fam = wanted.get(af)
        if fam in families and fam not in out:
            ip = str(sockaddr[0])
            if fam == 6 and "%" in ip:  # a scoped (link-local) address does not cross hosts
                continue
            out[fam] = (ip, port)
    if not out:
        only = " or ".join(f"IPv{f}" for f in families)
        raise ServerUnresolvable(f"server {host!r} has no {only} address")
    return dict(sorted(out.items()))


def _link_is_up(ifname: str) -> bool | None:
    """Read the IFF_UP flag from sysfs (cheap); None when sysfs does not know the link."""
    try:
        return bool(int(Path(f"/sys/class/net/{ifname}/flags").read_text(), 16) & IFF_UP)
    except (OSError, ValueError):
        return None


def _view(device: Device, wall: float) -> DeviceView:
    """The machine's view of DEVICE: handshake times become ages (seconds ago)."""
    peers = []
    for p in device.peers:
        age = wall - p.last_handshake if p.last_handshake else None
        peers.append(PeerView(p.public_key, p.endpoint, age, p.rx_bytes, p.keepalive))
    assert device.public_key is not None
    return DeviceView(device.public_key, tuple(peers))


class Client:
    """The classic client: one IPv4 raw socket, the classic machine."""

    protocol = "classic"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.backend: Backend | None = None
        self.channels: list[RawChannel] = []
        self.device: Device | None = None
        self.machine: Punch | v2machine.PunchV2 = self._make_machine()
        self.poller = select.poll()
        self._reopen_failed = 0  # the listen port the channels could not be reopened on

    def _make_machine(self) -> Punch | v2machine.PunchV2:
        opts = self.opts
        return Punch(opts.timing, daemon=opts.daemon, only=opts.peers)

    @property
    def channel(self) -> RawChannel:
        return self.channels[0]

    def stop(self, *_: object) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- setup ------------------------------------------------------------------------

    def open(self) -> None:
        device = self._open_device()
        self._open_channels(device)
        self.wg_port = device.listen_port
        self.device = device
        servers = ", ".join(f"{ip}:{port}" if c.family == 4 else f"[{ip}]:{port}"
                            for c in self.channels for ip, port in (c.server,))
        assert device.public_key is not None
        log.info("%s: public key %s, port %d, %d peer(s); server %s%s%s", self.opts.interface,
                 short_key(device.public_key), device.listen_port, len(device.peers), servers,
                 " (v2)" if self.protocol == "v2" else "", " (daemon)" if self.opts.daemon else "")

    def _open_device(self) -> Device:
        from . import wg  # the backend; pyroute2 is imported only where needed

        opts = self.opts
        self._resolve()
        up = _link_is_up(opts.interface)
        if up is None and not Path(f"/var/run/wireguard/{opts.interface}.sock").exists():
            if not wg.link_exists(opts.interface):
                raise BadInterface(f"interface {opts.interface} does not exist")
        try:
            self.backend = wg.open_backend(opts.interface)
            if up is False or up is None:
                wg.link_up(opts.interface)
            device = self.backend.get_device()
        except wg.DeviceNotFound as e:
            raise BadInterface(str(e)) from None
        except wg.PermissionDenied as e:
            raise NotPermitted(str(e)) from None
        except wg.WgError as e:
            raise BadInterface(str(e)) from None
        if device.public_key is None:
            raise BadInterface(f"{opts.interface} has no private key "
                               f"(wg set {opts.interface} private-key FILE)")
        if not device.listen_port:
            raise BadInterface(f"{opts.interface} has no listen port "
                               f"(wg set {opts.interface} listen-port 51820)")
        if not device.peers:
            raise BadInterface(f"{opts.interface} has no peers")
        if opts.peers is not None:
            missing = opts.peers - {p.public_key for p in device.peers}
            if missing:
                raise BadInterface(f"{opts.interface} has no peer "
                                   + ", ".join(short_key(k) for k in sorted(missing)))
        return device

    def _resolve(self) -> None:
        self.servers = {4: resolve_server(self.opts.server)}

    def _open_channels(self, device: Device) -> None:
        from .rawsock import RawChannel

        self.channels = [RawChannel(self.servers[4], device.listen_port)]

    def summary(self) -> str:
        assert isinstance(self.machine, Punch)
        c = self.machine.counters
        ignored = sum(ch.ignored for ch in self.channels)
        return (f"requests={c.sent} replies={c.replies} lost={c.lost} late={c.late} "
                f"malformed={c.malformed} applied={c.applied} ignored_packets={ignored}")

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        if self.backend is not None:
            self.backend.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ---------------------------------------------------------------------

    def refresh_device(self, now: float) -> None:
        assert self.backend is not None
        try:
            self.device = self.backend.get_device()
        except Exception as e:  # the interface may be gone for a moment (wg-quick down/up)
            log.warning("cannot read %s: %s", self.opts.interface, e)
            return
        if self.device.listen_port and self.device.listen_port != self.wg_port:
            self._reopen_channels(self.device.listen_port)
        self.machine.update_device(now, _view(self.device, time.time()))

    def _reopen_channels(self, port: int) -> None:
        """WireGuard listens on PORT now: send from it. The new channels are opened before
        the old ones close, so a failure (no descriptors left, the filter refused) keeps
        the daemon running on the old ones, and the next device read tries again."""
        from .rawsock import open_channel

        again = port == self._reopen_failed
        (log.debug if again else log.warning)(
            "%s listen port changed from %d to %d: reopening", self.opts.interface,
            self.wg_port, port)
        reopened: list[RawChannel] = []
        try:
            for old in self.channels:
                reopened.append(open_channel(old.server, port))
                reopened[-1].arm()
        except (OSError, PunchError) as e:
            for ch in reopened:
                ch.close()
            (log.debug if again else log.warning)(
                "cannot reopen the channels on port %d: %s; still sending from port %d, "
                "trying again at each device read", port, e, self.wg_port)
            self._reopen_failed = port
            return
        if self._reopen_failed:
            log.warning("reopened the channels on port %d", port)
            self._reopen_failed = 0
        for old in self.channels:
            self.poller.unregister(old.fileno())
            old.close()
        for ch in reopened:
            self.poller.register(ch.fileno(), select.POLLIN)
        self.channels = reopened
        self.wg_port = port

    def apply(self, action: Apply | v2machine.Apply | Keepalive) -> None:
        """Set what ACTION says on the interface. If the interface cannot take it now
        (gone for a moment: wg-quick down/up, wireguard-go restarted), say so and carry
        on: once it is back, the device read shows the peer without our endpoint, and
        the next answer sets it again."""
        from .wg.errors import WgError  # loaded with the backend already

        try:
            self._apply(action)
        except WgError as e:
            log.warning("cannot set peer %s on %s: %s; setting it again once the interface "
                        "is back", short_key(action.peer), self.opts.interface, e,
                        extra=peer_fields(action.peer))

    def _apply(self, action: Apply | v2machine.Apply | Keepalive) -> None:
        assert self.backend is not None
        if isinstance(action, Keepalive):
            self.backend.set_peer(action.peer, keepalive=action.keepalive)
            current = self.device.peer(action.peer) if self.device is not None else None
            log.info("peer %s: endpoint kept, keepalive %ds", short_key(action.peer),
                     action.keepalive, extra=peer_fields(
                         action.peer, current.endpoint if current else None,
                         keepalive=action.keepalive))
            return
        ep = (action.endpoint.ip, action.endpoint.port)
        # Keepalive 0 then K: turning keepalive on makes WireGuard send at once (a
        # handshake initiation), instead of after up to K seconds.
        self.backend.set_peer(action.peer, endpoint=ep, keepalive=0)
        self.backend.set_peer(action.peer, keepalive=action.keepalive)
        channel = self._channel_for(ep[0])
        if channel is not None:
            channel.poke(ep)
        log.info("peer %s: endpoint %s (%s), keepalive %ds", short_key(action.peer),
                 action.endpoint, action.reason, action.keepalive,
                 extra=peer_fields(action.peer, action.endpoint, reason=action.reason,
                                   keepalive=action.keepalive))

    def _channel_for(self, ip: str) -> RawChannel | None:
        family = 6 if ":" in ip else 4
        return next((c for c in self.channels if c.family == family), None)

    def _send_due(self, now: float) -> None:
        machine = self.machine
        assert isinstance(machine, Punch)
        for send in machine.poll(now):
            log.debug("asking for %s", short_key(send.peer), extra=peer_fields(send.peer))
            self.channel.send_to_server(send.payload)

    def run(self) -> Result:
        opts = self.opts
        machine = self.machine
        assert self.channels and self.device is not None
        clock = time.monotonic
        start = clock()
        deadline = start + opts.timeout if not opts.daemon else float("inf")
        machine.update_device(start, _view(self.device, time.time()))
        self._send_due(start)  # the first request goes out before cffi loads
        for ch in self.channels:
            ch.arm()
        for ch in self.channels:
            self.poller.register(ch.fileno(), select.POLLIN)
        self.poller.register(self._wake_r.fileno(), select.POLLIN)
        next_refresh = start + opts.device_refresh
        next_summary = start + 600
        self.last_reply = start
        warned_silent = False
        for ch in self.channels:
            self._take_replies(ch)  # an early reply may already be in
        while not self.stopping:
            now = clock()
            for o in opts.observers:
                o.tick(self, now)
            self._send_due(now)
            if opts.daemon and now >= next_summary:
                log.info("counters: %s", self.summary())
                next_summary = now + 600
            if now >= next_refresh:
                self.refresh_device(now)
                next_refresh = now + (0.2 if opts.wait and machine.done() else opts.device_refresh)
            if not opts.daemon:
                result = self._finished(now, deadline)
                if result is not None:
                    return result
            elif now - self.last_reply > 3 * opts.timing.interval:
                if not warned_silent:
                    log.warning("no reply from the server for %ds", now - self.last_reply)
                    warned_silent = True
            else:
                warned_silent = False
            wake = min(machine.next_wakeup(), next_refresh, deadline, self._side_wakeup())
            ready = {fd for fd, _ in self.poller.poll(max(0.0, wake - clock()) * 1000 + 1)}
            for ch in self.channels:
                if ch.fileno() in ready:
                    self._take_replies(ch)
            self._side_turn(ready, clock())
        return Result(EXIT_OK, "stopped")

    def _side_wakeup(self) -> float:
        """When the loop's side task (the v2 daemon's NAT re-check) is due a turn."""
        return float("inf")

    def _side_turn(self, ready: set[int], now: float) -> None:
        """The side task's turn after each poll; READY: the descriptors that are."""

    def _take_replies(self, channel: RawChannel) -> None:
        machine = self.machine
        assert isinstance(machine, Punch)
        for payload in channel.replies():
            now = time.monotonic()
            self.last_reply = now
            log.debug("reply: %d bytes", len(payload))
            for action in machine.on_reply(now, payload):
                self.apply(action)

    def _server_text(self) -> str:
        return " and ".join(f"{ip}:{port}" if fam == 4 else f"[{ip}]:{port}"
                            for fam, (ip, port) in self.servers.items())

    def _silent(self) -> str:
        port = next(iter(self.servers.values()))[1]
        return (f"no reply from the server {self._server_text()} within "
                f"{self.opts.timeout:g}s (is wg-rendezvous running there, and is "
                f"UDP port {port} open?)")

    def _not_found(self, names: str) -> str:
        return (f"the server does not know peer(s) {names}: "
                "they have not run wg-punch against this server recently")

    def _finished(self, now: float, deadline: float) -> Result | None:
        machine = self.machine
        if machine.done() and not self.opts.wait:
            return Result(EXIT_OK)
        if machine.done() and self.opts.wait and not machine.without_handshake(now):
            return Result(EXIT_OK)
        if now < deadline:
            return None
        if not machine.replied:
            return Result(EXIT_SILENT, self._silent())
        pending = machine.pending()
        if pending:
            return Result(EXIT_NOT_FOUND, self._not_found(", ".join(short_key(p.key)
                                                                    for p in pending)))
        silent = machine.without_handshake(now)
        names = ", ".join(f"{short_key(p.key)} at {p.answer}" for p in silent)
        return Result(EXIT_NO_HANDSHAKE, f"no handshake with {names}: WireGuard got no answer "
                      "at the endpoint the server reported; a destination-dependent "
                      "(symmetric) NAT on either side is the likely cause, or a firewall "
                      "that drops UDP")


def run(opts: Options) -> Result:
    client: Client
    if opts.server_key is not None:
        from .v2client import ClientV2  # cryptography and the v2 codec load only here

        client = ClientV2(opts)
    else:
        client = Client(opts)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, client.stop)
    try:
        client.open()
        for o in opts.observers:
            o.opened(client)
        try:
            return client.run()
        finally:
            log.info("counters: %s", client.summary())
    finally:
        for o in opts.observers:
            o.closed(client)
        client.close()
