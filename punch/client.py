"""The client's I/O loop: reads the device, drives :class:`punch.machine.Punch`, and
carries out its actions on the raw socket and the WireGuard backend.

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

from .errors import BadInterface, NotPermitted, ServerUnresolvable
from .machine import Apply, DeviceView, Keepalive, PeerView, Punch, Timing

if TYPE_CHECKING:
    from .observe import Observer
    from .rawsock import RawChannel
    from .wg import Backend, Device

__all__ = ["Options", "Result", "resolve_server", "run"]

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
    observers: tuple[Observer, ...] = ()  # see punch.observe: state file, metrics


@dataclass
class Result:
    code: int
    message: str = ""


def resolve_server(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` to an IPv4 (address, port); the classic protocol is IPv4 only."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        host, port_text = text, str(DEFAULT_PORT)
    try:
        port = int(port_text)
        if not 0 < port <= 65535:
            raise ValueError
    except ValueError:
        raise ServerUnresolvable(f"bad server port in {text!r}") from None
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ServerUnresolvable(f"cannot resolve server {host!r}: {e.strerror}") from None
    return str(infos[0][4][0]), port


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
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.backend: Backend | None = None
        self.channel: RawChannel | None = None
        self.device: Device | None = None
        self.machine = Punch(opts.timing, daemon=opts.daemon, only=opts.peers)

    def stop(self, *_: object) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- setup ------------------------------------------------------------------------

    def open(self) -> None:
        from . import wg  # the backend; pyroute2 is imported only where needed
        from .rawsock import RawChannel

        opts = self.opts
        server = resolve_server(opts.server)
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
        self.channel = RawChannel(server, device.listen_port)
        self.wg_port = device.listen_port
        self.device = device
        log.info("%s: public key %s, port %d, %d peer(s); server %s:%d%s", opts.interface,
                 short_key(device.public_key), device.listen_port, len(device.peers),
                 server[0], server[1], " (daemon)" if opts.daemon else "")

    def summary(self) -> str:
        c = self.machine.counters
        ignored = self.channel.ignored if self.channel is not None else 0
        return (f"requests={c.sent} replies={c.replies} lost={c.lost} late={c.late} "
                f"malformed={c.malformed} applied={c.applied} ignored_packets={ignored}")

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
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
            log.warning("%s listen port changed to %d: reopening", self.opts.interface,
                        self.device.listen_port)
            from .rawsock import RawChannel

            assert self.channel is not None
            server = self.channel.server
            self.poller.unregister(self.channel.fileno())
            self.channel.close()
            self.channel = RawChannel(server, self.device.listen_port)
            self.channel.arm()
            self.poller.register(self.channel.fileno(), select.POLLIN)
            self.wg_port = self.device.listen_port
        self.machine.update_device(now, _view(self.device, time.time()))

    def apply(self, action: Apply | Keepalive) -> None:
        assert self.backend is not None and self.channel is not None
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
        self.channel.poke(ep)
        log.info("peer %s: endpoint %s (%s), keepalive %ds", short_key(action.peer),
                 action.endpoint, action.reason, action.keepalive,
                 extra=peer_fields(action.peer, action.endpoint, reason=action.reason,
                                   keepalive=action.keepalive))

    def run(self) -> Result:
        opts = self.opts
        machine = self.machine
        assert self.channel is not None and self.device is not None
        clock = time.monotonic
        start = clock()
        deadline = start + opts.timeout if not opts.daemon else float("inf")
        machine.update_device(start, _view(self.device, time.time()))
        for send in machine.poll(start):  # the first request goes out before cffi loads
            self.channel.send_to_server(send.payload)
        self.channel.arm()
        self.poller = select.poll()
        self.poller.register(self.channel.fileno(), select.POLLIN)
        self.poller.register(self._wake_r.fileno(), select.POLLIN)
        next_refresh = start + opts.device_refresh
        next_summary = start + 600
        self.last_reply = start
        warned_silent = False
        self._take_replies()  # an early reply may already be in
        while not self.stopping:
            now = clock()
            for o in opts.observers:
                o.tick(self, now)
            for send in machine.poll(now):
                log.debug("asking for %s", short_key(send.peer), extra=peer_fields(send.peer))
                self.channel.send_to_server(send.payload)
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
            wake = min(machine.next_wakeup(), next_refresh, deadline)
            for fd, _ in self.poller.poll(max(0.0, wake - clock()) * 1000 + 1):
                if fd == self.channel.fileno():
                    self._take_replies()
        return Result(EXIT_OK, "stopped")

    def _take_replies(self) -> None:
        assert self.channel is not None
        for payload in self.channel.replies():
            now = time.monotonic()
            self.last_reply = now
            log.debug("reply: %d bytes", len(payload))
            for action in self.machine.on_reply(now, payload):
                self.apply(action)

    def _finished(self, now: float, deadline: float) -> Result | None:
        machine = self.machine
        if machine.done() and not self.opts.wait:
            return Result(EXIT_OK)
        if machine.done() and self.opts.wait and not machine.without_handshake(now):
            return Result(EXIT_OK)
        if now < deadline:
            return None
        if not machine.replied:
            assert self.channel is not None
            s = self.channel.server
            return Result(EXIT_SILENT, f"no reply from the server {s[0]}:{s[1]} within "
                          f"{self.opts.timeout:g}s (is wg-rendezvous running there, and is "
                          f"UDP port {s[1]} open?)")
        pending = machine.pending()
        if pending:
            names = ", ".join(short_key(p.key) for p in pending)
            return Result(EXIT_NOT_FOUND, f"the server does not know peer(s) {names}: "
                          "they have not run wg-punch against this server recently")
        silent = machine.without_handshake(now)
        names = ", ".join(f"{short_key(p.key)} at {p.answer}" for p in silent)
        return Result(EXIT_NO_HANDSHAKE, f"no handshake with {names}: WireGuard got no answer "
                      "at the endpoint the server reported; a destination-dependent "
                      "(symmetric) NAT on either side is the likely cause, or a firewall "
                      "that drops UDP")


def run(opts: Options) -> Result:
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
