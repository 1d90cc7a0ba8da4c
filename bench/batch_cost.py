"""CPU cost of wg-rendezvous's own code per request on the bulk path, without system calls.

Run from the repository root::

    python3 bench/batch_cost.py [--keys 60000] [--batch 64] [--pollute MB]
    python3 bench/batch_cost.py --baseline DIR   # against another source tree, same run

It registers ``--keys`` keys in a ``Service``, then feeds ``rendezvous.mmsg.Batch``
pre-filled batches of classic requests (128 clients, each sending 1-4 requests in a row,
each asking for a random registered key) exactly as ``recvmmsg`` would leave them, and
answers them through ``Batch.exchange`` with the bulk handler, except that the two
system calls are skipped. It prints the process CPU time per request, which is the
server's user time in bench_server.py minus the cost of the system calls' own
user-space side (cffi). ``--pollute MB`` touches that many MiB between batches, as the
kernel's work and other processes do to the caches in a real run.

``--baseline DIR`` loads the ``rendezvous`` package of another source tree (e.g. a git
worktree of the previous commit) next to this one, gives each its own service with the
same keys, and answers every batch with both, alternating which goes first: on a shared
machine, whose speed drifts by more than most changes, only such a comparison shows a
difference of a few percent. (Modules the baseline imports by absolute name, such as
``rendezvous.v2``, come from this tree; the bulk path uses none of them.)

Prints figures; never fails because something was slow.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import random
import struct
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

__all__ = ["main"]


def load_tree(root: Path, name: str) -> ModuleType:
    """The ``rendezvous`` package of the source tree ROOT, imported as NAME."""
    pkg = root / "rendezvous"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    if spec is None or spec.loader is None or not (pkg / "__init__.py").is_file():
        raise SystemExit(f"batch_cost: no rendezvous package in {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Side:
    """One tree's bulk path: a service holding the keys, a Batch that skips the system
    calls, and the bulk handler."""

    def __init__(self, package: str, n: int, keys: list[bytes]) -> None:
        mmsg = importlib.import_module(f"{package}.mmsg")
        batch_mod = importlib.import_module(f"{package}.batch")
        service_mod = importlib.import_module(f"{package}.service")

        class NoSyscalls(mmsg.Batch):  # type: ignore[name-defined,misc]
            """recvmmsg 'returns' the pre-filled datagrams, sendmmsg 'sends' them all."""

            filled = 0

            def recv(self, fd: int) -> int:
                self._used = self.filled
                return self.filled

            def _send(self, fd: int, total: int, vec: object) -> tuple[int, int]:
                return total, 0

        self.service: Any = service_mod.Service(
            service_mod.Config(rate=0, max_peers=max(1_000_000, 2 * len(keys))))
        for i, k in enumerate(keys):
            self.service.handle(k + bytes(32), struct.pack(">IH", 0x7F010000 + i // 60000,
                                                          2000 + i % 60000), 1.0)
        self.batch: Any = NoSyscalls(n, 2048)
        self.batch.filled = n
        st = self.batch._stride4
        for i in range(n):
            self.batch._r4[i * st + self.batch._msglen4] = 64
            self.batch.names[16 * i:16 * i + 16] = (struct.pack("<H", 2) + struct.pack(
                ">HI", 10000 + i, 0x7F000002) + bytes(8))
        self.bulk = batch_mod.ClassicBatch(self.service).handle
        self.cpu = 0

    def answer(self, head: bytes, now: float) -> None:
        """Answer one batch (its CPU time is added to self.cpu)."""
        b = self.batch
        b.head[:len(head)] = head
        t0 = time.process_time_ns()
        b.exchange(0, self.service.handle, now, self.bulk)
        self.cpu += time.process_time_ns() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=60_000, help="registered keys (default 60000)")
    p.add_argument("--batch", type=int, default=64, help="requests per batch (default 64)")
    p.add_argument("--batches", type=int, default=500, help="distinct batches (default 500)")
    p.add_argument("--pollute", type=int, default=0, metavar="MB",
                   help="MiB of memory to touch between batches (default 0)")
    p.add_argument("--seconds", type=float, default=3.0, help="measure this long (default 3)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also measure the rendezvous package of the source tree DIR")
    args = p.parse_args(argv)
    if args.batch < 1 or args.keys < 1:
        p.error("--batch and --keys must be at least 1")
    rng = random.Random(1)
    keys = [rng.randbytes(32) for _ in range(args.keys)]
    clients = [rng.randbytes(32) for _ in range(128)]
    n = args.batch
    heads = []
    for _ in range(args.batches):
        reqs = bytearray()
        while len(reqs) < 64 * n:
            c = rng.choice(clients)
            for _ in range(rng.randint(1, 4)):
                reqs += c + rng.choice(keys)
        heads.append(bytes(reqs[:64 * n]))
    sides = {"this tree": Side("rendezvous", n, keys)}
    if args.baseline:
        load_tree(Path(args.baseline).resolve(), "baseline_rendezvous")
        sides["baseline"] = Side("baseline_rendezvous", n, keys)
    order = list(sides.values())
    junk = bytearray(args.pollute << 20)
    zeros = bytes(len(junk) // 64)
    now, rounds = 2.0, 0
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        for head in heads:
            for side in (order if rounds % 2 else order[::-1]):
                if junk:
                    junk[::64] = zeros  # one write per cache line
                side.answer(head, now)
            rounds += 1
        now += 0.01
    per = {name: s.cpu / (rounds * n) for name, s in sides.items()}
    for name, ns in per.items():
        print(f"{name:9}: {args.keys} keys, batches of {n}, {args.pollute} MiB touched "
              f"between batches: {ns * n / 1000:.1f} us per batch, {ns:.0f} ns per request")
    if "baseline" in per:
        print(f"this tree / baseline: {per['this tree'] / per['baseline']:.3f} "
              f"(CPU per request, {rounds} batches each, alternating)")
    print(f"(Python {sys.version.split()[0]}, pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
