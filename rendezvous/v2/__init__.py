"""Protocol v2 (docs/PROTOCOL.md): authenticated, encrypted, IPv6-capable rendezvous.

``wire`` is the pure codec (header, endpoints, plaintext bodies; no cryptography),
``crypto`` seals and opens datagrams (X25519, HKDF-SHA256, ChaCha20-Poly1305 via the
``cryptography`` package), ``keys`` makes, encodes and reads X25519 keys.
Import the submodules directly; this package imports nothing.
"""
