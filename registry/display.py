"""How the admin shows times and durations: one format everywhere.

A moment is relative text ("3 min ago", "in 12 s") inside a ``<time>`` element whose ``datetime`` is
ISO 8601 UTC and whose ``title`` is the exact UTC time with seconds, shown on hover. A duration is a
number with its unit ("2.5 s", "30 s", "4 min", "2 h 5 min").
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString


def duration(seconds: float) -> str:
    """``seconds`` (sign ignored) with a unit: "0.4 s", "2.5 s", "30 s", "4 min", "2 h 5 min", "3 d 4 h"."""
    seconds = abs(float(seconds))
    if seconds < 10:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text} s"
    if seconds < 60:
        return f"{int(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        hours, minutes = divmod(int(seconds // 60), 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(int(seconds // 3600), 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def iso_utc(moment: datetime) -> str:
    """``2026-11-27T17:00:03Z`` (whole seconds; a naive ``moment`` is taken as UTC)."""
    return _utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def exact(moment: datetime) -> str:
    """``2026-11-27 17:00:03 UTC``"""
    return _utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def relative(moment: datetime, now: datetime | None = None) -> str:
    """ "3 min ago", "in 12 s", or "now" within half a second."""
    delta = (_utc(moment) - _utc(now or timezone.now())).total_seconds()
    if abs(delta) < 0.5:
        return "now"
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


def when(moment: datetime | None, now: datetime | None = None) -> SafeString:
    """``<time datetime="…Z" title="… UTC">3 min ago</time>``; "-" for None."""
    if moment is None:
        return SafeString("-")
    return format_html(
        '<time datetime="{}" title="{}">{}</time>', iso_utc(moment), exact(moment), relative(moment, now)
    )


def _utc(moment: datetime) -> datetime:
    if timezone.is_naive(moment):
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
