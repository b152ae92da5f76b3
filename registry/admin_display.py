"""Small HTML pieces the operators' admin pages share: times and durations in the project's one format
(registry.display), badges, truncated cells with the full value on hover, lease countdown cells and
tables that scroll sideways on a narrow screen."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from django.utils.html import format_html
from django.utils.safestring import SafeString

from .display import duration, when  # the project's one time format
from .display import iso_utc as iso  # what ``data-deadline`` carries

__all__ = ["badge", "countdown", "duration", "iso", "scroll", "truncated", "when"]


def _whole(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def left_text(seconds: float) -> str:
    """What a lease cell says at render time, as the page's countdown (conveyor/live.js) will say it
    a second later: whole seconds, "12 s left" or "lapsed 3 s ago"."""
    if seconds > 0:
        return f"{_whole(math.ceil(seconds))} left"
    return f"lapsed {_whole(math.floor(-seconds))} ago"


def countdown(deadline: datetime, now: datetime, tail: str = "") -> SafeString:
    """A lease cell: ``<span data-deadline="ISO">12 s left</span>`` the page's script ticks each second."""
    return format_html(
        '<span class="conveyor-nowrap"><span data-deadline="{}" title="{}">{}</span>{}</span>',
        iso(deadline),
        deadline.astimezone(UTC).strftime("deadline %Y-%m-%d %H:%M:%S UTC"),
        left_text((deadline - now).total_seconds()),
        tail,
    )


def badge(text: str, colour: str, extra_class: str = "", title: str = "") -> SafeString:
    return format_html(
        '<span class="conveyor-badge {}" style="background:{}" title="{}">{}</span>',
        extra_class,
        colour,
        title or text,
        text,
    )


def middle(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters in the middle, keeping both ends: ids and hosts that share a
    long prefix differ at the end (``ingest-orde…-replica-12``)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def truncated(text: str, width: str = "14em", keep_ends: int = 0) -> SafeString:
    """A cell cut to ``width`` with an ellipsis (or, with ``keep_ends``, to that many characters in the
    middle); the full value in ``title`` (shown on hover)."""
    if not text:
        return SafeString("-")
    shown = middle(text, keep_ends) if keep_ends else text
    return format_html('<span class="conveyor-cut" style="max-width:{}" title="{}">{}</span>', width, text, shown)


def scroll(table: SafeString) -> SafeString:
    """A read-only table in a wrapper that scrolls sideways on a narrow screen instead of cutting columns."""
    return format_html('<div class="conveyor-scroll">{}</div>', table)
