"""CPU cost of wg-rendezvous's own code per request on the bulk path, without system calls.

Run from the repository root::

    /root/.pyenv/versions/3.11.7/bin/python3 bench/batch_cost.py [--keys 60000] [--batch 64]

It registers ``--keys`` keys in a ``Service``, then feeds ``rendezvous.mmsg.Batch``
pre-filled batches of classic requests (128 clients, each sending 1-4 requests in a row,
each asking for a random registered key) exactly as ``recvmmsg`` would leave them, and
answers them through ``Batch.exchange`` with the bulk handler, except that the two
system calls are skipped. It prints the process CPU time per request, which is the
server's user time in bench_server.py minus the cost of the system calls' own
user-space side (cffi). ``--pollute MB`` touches that many MiB between batches, as the
kernel's work and other processes do to the caches in a real run. Prints figures; never
fails because something was slow.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rendezvous import mmsg
from rendezvous.batch import ClassicBatch
from rendezvous.service import Config, Service

__all__ = ["main"]


class _NoSyscalls(mmsg.Batch):
    """A Batch whose recvmmsg 'returns' the pre-filled datagrams and whose sendmmsg
    'sends' everything."""

    filled = 0

    def recv(self, fd: int) -> int:
        self._used = self.filled
        return self.filled

    def _send(self, fd: int, total: int, vec: object) -> tuple[int, int]:
        return total, 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=60_000, help="registered keys (default 60000)")
    p.add_argument("--batch", type=int, default=64, help="requests per batch (default 64)")
    p.add_argument("--batches", type=int, default=500, help="distinct batches (default 500)")
    p.add_argument("--pollute", type=int, default=0, metavar="MB",
                   help="MiB of memory to touch between batches (default 0)")
    p.add_argument("--seconds", type=float, default=3.0, help="measure this long (default 3)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.keys < 1:
        p.error("--batch and --keys must be at least 1")
    rng = random.Random(1)
    service = Service(Config(rate=0, max_peers=max(1_000_000, 2 * args.keys)))
    keys = [rng.randbytes(32) for _ in range(args.keys)]
    for i, k in enumerate(keys):
        service.handle(k + bytes(32), struct.pack(">IH", 0x7F010000 + i // 60000,
                                                  2000 + i % 60000), 1.0)
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
    batch = _NoSyscalls(n, 2048)
    batch.filled = n
    st = batch._stride4
    for i in range(n):
        batch._r4[i * st + batch._msglen4] = 64
        batch.names[16 * i:16 * i + 16] = (struct.pack("<H", 2) +
                                           struct.pack(">HI", 10000 + i, 0x7F000002) + bytes(8))
    bulk = ClassicBatch(service).handle
    junk = bytearray(args.pollute << 20)
    zeros = bytes(len(junk) // 64)

    def one_pass(answer: bool) -> None:
        for h in heads:
            batch.head[:64 * n] = h
            if junk:
                junk[::64] = zeros  # one write per cache line
            if answer:
                batch.exchange(0, service.handle, 2.0, bulk)

    def cpu_per_pass(answer: bool) -> float:
        passes, t0 = 0, time.process_time()
        while time.process_time() - t0 < args.seconds / 2:
            one_pass(answer)
            passes += 1
        return (time.process_time() - t0) / passes

    base = cpu_per_pass(False)  # copying the batches in, and the pollution
    total = cpu_per_pass(True)
    per_batch = (total - base) / len(heads)
    print(f"{args.keys} keys, batches of {n}, {args.pollute} MiB touched between batches: "
          f"{per_batch * 1e6:.1f} us per batch, {per_batch / n * 1e9:.0f} ns per request "
          f"(Python {sys.version.split()[0]}, pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
