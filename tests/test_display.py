"""The one time and duration format of the admin (registry.display)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from registry.display import duration, when

NOW = datetime(2026, 11, 27, 17, 3, 3, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0.4 s"),
        (2.5, "2.5 s"),
        (2.0, "2 s"),
        (30, "30 s"),
        (-30, "30 s"),
        (240, "4 min"),
        (3600, "1 h"),
        (7500, "2 h 5 min"),
        (86400 * 3 + 3600 * 4, "3 d 4 h"),
    ],
)
def test_durations_carry_their_unit(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_past_moment_is_relative_text_with_the_exact_utc_time_on_hover() -> None:
    html = when(NOW - timedelta(minutes=3), now=NOW)
    assert html == '<time datetime="2026-11-27T17:00:03Z" title="2026-11-27 17:00:03 UTC">3 min ago</time>'


def test_a_future_moment_and_none() -> None:
    assert ">in 12 s</time>" in when(NOW + timedelta(seconds=12), now=NOW)
    assert when(None) == "-"
