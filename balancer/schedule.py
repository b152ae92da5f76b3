"""Smooth weighted round robin addressed by position: the n-th pick of nginx's sequence for a fixed pool.

``strategies.smooth_weighted`` carries a current weight per instance from pick to pick. Started from zero
for a fixed pool, its picks form a sequence with period ``sum(weights)``; the select endpoint keeps only a
shared counter in Redis and reads position ``counter % period`` of that sequence here, so a pick costs the
same for 3 instances or 3,000.

The sequence is built per weight class rather than per instance: instances of equal weight start equal and
gain equally, so among them the picks go round in id order, and a class is summed up by how many picks it
has had. One step compares the classes (a handful), not the instances. Ties go to the first id, as in
``smooth_weighted``. Pure: no Django.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Sequence

from .strategies import Instance, eligible


class SmoothWeightedSchedule:
    """Positions of nginx's smooth weighted round robin for one pool, computed as far as they are asked."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        pool = eligible(instances)
        self.pool = pool
        divisor = 0
        for inst in pool:
            divisor = math.gcd(divisor, inst.weight)
        # Dividing every weight by their gcd scales every current weight alike: the same picks.
        weights = sorted({inst.weight // divisor for inst in pool}, reverse=True)
        self._class_weight = weights
        self._members: list[list[int]] = [[] for _ in weights]
        index_of = {w: n for n, w in enumerate(weights)}
        for position, inst in enumerate(pool):
            self._members[index_of[inst.weight // divisor]].append(position)
        self.period = sum(inst.weight // divisor for inst in pool)
        self._picks = [0] * len(weights)  # picks each class has had so far
        self._sequence = array("I")  # pool positions, one per pick computed
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.period

    def at(self, position: int) -> Instance:
        """The pick at ``position`` (0, 1, 2, ...) of the sequence that starts from zero weights."""
        return self.pool[self.index_at(position)]

    def index_at(self, position: int) -> int:
        """Where the pick at ``position`` stands in the eligible pool (sorted by id)."""
        position %= self.period
        if len(self._sequence) <= position:
            with self._lock:
                while len(self._sequence) <= position:
                    self._step()
        return self._sequence[position]

    def _step(self) -> None:
        t = len(self._sequence) + 1  # every current weight has gained t times its weight
        best_class = -1
        best_value = 0
        best_position = 0
        for n, weight in enumerate(self._class_weight):
            members = self._members[n]
            picks = self._picks[n]
            # The member with the fewest picks (the first in id order among them) leads its class.
            value = t * weight - self.period * (picks // len(members))
            position = members[picks % len(members)]
            if best_class < 0 or value > best_value or (value == best_value and position < best_position):
                best_class, best_value, best_position = n, value, position
        self._picks[best_class] += 1
        self._sequence.append(best_position)
