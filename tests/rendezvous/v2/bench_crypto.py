"""Print what ServerCrypto.open_request costs (a figure, never an assertion).

CPU time per call (time.process_time), best of 3, so a busy machine distorts it less
than wall time would.

python3 -m tests.rendezvous.v2.bench_crypto [-n N]
"""

from __future__ import annotations

import argparse
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from rendezvous.v2.crypto import ClientCrypto, ServerCrypto
from rendezvous.v2.keys import generate_private_key
from rendezvous.v2.wire import Endpoint, ReplyBody, RequestBody, Status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "-n", type=int, default=20000, help="datagrams per cached-key figure (fresh: n/10)"
    )
    args = ap.parse_args(argv)
    server_priv = generate_private_key()
    server = ServerCrypto(server_priv)
    client = ClientCrypto(generate_private_key(), server.server_public)
    sealed = client.seal_request(RequestBody(1, 1, bytes(32)))
    server.open_request(sealed)

    def per_call(fn, items) -> float:
        t0 = time.process_time()
        for x in items:
            fn(x)
        return (time.process_time() - t0) / len(items) * 1e6

    cached = min(per_call(server.open_request, [sealed] * args.n) for _ in range(3))
    # keys in the cache's second level (hot_size 0): each open rebuilds the two AEADs
    rebuilt_server = ServerCrypto(server_priv, hot_size=0)
    rebuilt_server.open_request(sealed)
    rebuilt = min(per_call(rebuilt_server.open_request, [sealed] * args.n) for _ in range(3))
    fresh_items = [
        ClientCrypto(generate_private_key(), server.server_public).seal_request(
            RequestBody(1, 1, bytes(32))
        )
        for _ in range(max(1, args.n // 10))
    ]
    uncached = ServerCrypto(server_priv, cache_size=0)  # every open derives afresh
    fresh = min(per_call(uncached.open_request, fresh_items) for _ in range(3))
    priv = X25519PrivateKey.from_private_bytes(server_priv)
    pubs = [X25519PublicKey.from_public_bytes(d[8:40]) for d in fresh_items]
    dh = min(per_call(priv.exchange, pubs) for _ in range(3))
    reply = ReplyBody(1, Status.FOUND, 1, Endpoint("192.0.2.1", 5), (Endpoint("2001:db8::1", 6),))
    seal = min(
        per_call(lambda b: server.seal_reply(client.client_public, b), [reply] * args.n)
        for _ in range(3)
    )
    reply_dgram = server.seal_reply(client.client_public, reply)
    opened = min(per_call(client.open, [reply_dgram] * args.n) for _ in range(3))
    print(f"ServerCrypto.open_request, cached key: {cached:6.1f} us")
    print(f"ServerCrypto.open_request, kept key:   {rebuilt:6.1f} us  (AEADs rebuilt from "
          "the cached keys)")
    print(f"ServerCrypto.open_request, fresh key:  {fresh:6.1f} us  (X25519 + HKDF + AEAD)")
    print(f"  of which X25519 alone:               {dh:6.1f} us")
    print(f"ServerCrypto.seal_reply (1 endpoint):  {seal:6.1f} us")
    print(f"ClientCrypto.open (reply):             {opened:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
