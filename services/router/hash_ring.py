"""Consistent choice of a node for a key, without shared state.

Rendezvous (highest random weight) hashing: every node gets a weight from a
hash of (node, key) and the key goes to the heaviest node. Any two routers
that see the same nodes pick the same node for a key, with nothing to
exchange; when a node leaves, only the keys it held move (each to its own
next heaviest node), and when one joins it takes only the keys it now
outweighs, about 1/N of them. With the few replicas a model has (2 to a few
dozen) N hashes per request cost microseconds, and unlike a ring there are
no virtual nodes to tune.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b


def weight(node: str, key: bytes) -> int:
    """The node's weight for `key`: a 64-bit hash of both, the same in every process."""
    digest = blake2b(node.encode() + b"\x00" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preferred(key: bytes, nodes: Iterable[str]) -> str | None:
    """The node that `key` belongs to among `nodes` (None when there is none).

    Equal weights (a 2^-64 chance) go to the smaller node name, so the
    result never depends on the order of `nodes`.
    """
    best: tuple[int, str] | None = None
    for node in nodes:
        w = weight(node, key)
        if best is None or w > best[0] or (w == best[0] and node < best[1]):
            best = (w, node)
    return None if best is None else best[1]
