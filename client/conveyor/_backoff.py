"""Retry pacing shared by every long-lived object of the client: capped exponential backoff with jitter, and
jittered periods (so a fleet started together does not heartbeat or reconnect in lockstep)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def jittered(period: float, rng: random.Random | None = None, spread: float = 0.2) -> float:
    """``period`` shortened by up to ``spread`` of it, at random: never later than asked, rarely in step."""
    return period * (1.0 - spread * (rng or random).random())


@dataclass
class Backoff:
    """Delays for attempt 1, 2, 3, ...: ``base * 2**(n-1)`` capped at ``cap``, with "equal jitter" (half the
    delay fixed, half random), so retries spread out but never come back at once."""

    base: float = 0.25
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next(self) -> float:
        self.attempts += 1
        delay = min(self.cap, self.base * (1 << min(self.attempts - 1, 30)))
        return delay / 2 + self.rng.random() * delay / 2

    def reset(self) -> None:
        self.attempts = 0
