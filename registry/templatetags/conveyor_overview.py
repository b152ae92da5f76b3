"""``{% conveyor_overview %}``: the operator's overview (registry.dashboard) on the admin index."""

from __future__ import annotations

from typing import Any

from django import template

from registry import dashboard, display

register = template.Library()


@register.inclusion_tag("admin/conveyor/overview.html")
def conveyor_overview() -> dict[str, Any]:
    return {"o": dashboard.overview()}


@register.filter
def when(moment: Any) -> Any:
    """A moment in the admin's one time format (registry.display.when)."""
    return display.when(moment)


@register.filter
def iso_utc(moment: Any) -> str:
    return display.iso_utc(moment) if moment else ""
