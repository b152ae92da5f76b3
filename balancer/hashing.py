"""The hash strategy's pick (``strategies.rendezvous``), computed with fewer steps per instance for a pool
that answers many keys: the same winner for every key, by construction.

``rendezvous`` scores every instance ``-weight / ln(h)``, ``h`` from the 8-byte BLAKE2b digest of
``key \\0 id``. Among instances of one weight the score only grows with the digest, so a weight class is won
by its largest digest (ties of score resolved as ``rendezvous`` does, by the larger id), and only the class
winners are scored. The digests share the key's prefix, so each is a copy of one hash state plus the id.
Pure: no Django.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Sequence

from .strategies import Instance, eligible


def _score(weight: int, digest: bytes) -> float:
    # strategies._unit_hash and rendezvous' score, term for term.
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -weight / math.log(unit)


class RendezvousPool:
    """An eligible pool prepared for ``rendezvous`` over many keys."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        self.pool = eligible(instances)
        classes: dict[int, tuple[list[bytes], list[int]]] = {}
        for position, inst in enumerate(self.pool):
            ids, positions = classes.setdefault(inst.weight, ([], []))
            ids.append(inst.id.encode())
            positions.append(position)
        self._classes = list(classes.items())

    def index(self, key: str) -> int:
        """Where ``rendezvous(pool, key)`` stands in the pool."""
        base = hashlib.blake2b(f"{key}\0".encode(), digest_size=8)
        best: tuple[float, str] | None = None
        best_position = -1
        for weight, (ids, positions) in self._classes:
            digests = []
            for raw in ids:
                h = base.copy()
                h.update(raw)
                digests.append(h.digest())
            if len(digests) == 1:
                members = [0]
            else:
                top, second = heapq.nlargest(2, digests)
                if _score(weight, second) < _score(weight, top):
                    members = [digests.index(top)]
                else:  # scores equal as floats: rendezvous takes the larger id among them
                    top_score = _score(weight, top)
                    members = [n for n, d in enumerate(digests) if _score(weight, d) == top_score]
            for n in members:
                candidate = (_score(weight, digests[n]), self.pool[positions[n]].id)
                if best is None or candidate > best:
                    best, best_position = candidate, positions[n]
        return best_position
