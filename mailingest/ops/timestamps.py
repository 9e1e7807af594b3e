"""
Times as text, made once a second: each message's log line, our Received:
header and its raw copy's key name the time to the second (or the day), and
formatting a time anew for every message was a measurable part of a small
message's CPU (issue 29).
"""

from collections.abc import Callable
from datetime import datetime, timezone


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
