"""Timestamps as every output (API, webhooks, console, admin command, audit texts) writes them."""

from datetime import datetime, timezone
from typing import Any


def iso(value: Any) -> str | None:
    """A timestamp as ISO 8601 UTC, whether the database gave a datetime (PostgreSQL) or text (SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
