"""
Timestamps as every output (API, webhooks, console, admin command, audit texts) writes them,
and as text made once a second (L{PerSecond}): each message's log line, our Received: header
and its raw copy's key name the time to the second (or the day), and formatting a time anew
for every message was a measurable part of a small message's CPU (issue 29).
"""

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


def iso(value: Any) -> str | None:
    """A timestamp as ISO 8601 UTC, whether the database gave a datetime (PostgreSQL) or text (SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class PerSecond:
    """C{render}'s text for the second a time falls in, rendered once per second and kept."""

    def __init__(self, render: Callable[[datetime], str]):
        self._render = render
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float) -> str:
        """The text of C{when} (seconds since the epoch), rounded to the microsecond as C{datetime} does."""
        second = int(when + 5e-7) if when >= 0 else None
        if second is None or second != self._second:
            text = self._render(datetime.fromtimestamp(when, timezone.utc))
            if second is None:
                return text
            self._second, self._text = second, text
        return self._text
