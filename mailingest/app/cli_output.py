"""
How the admin command prints what it found: aligned tables for people, JSON
for programs (keyed as README's Data section names the columns).
"""

import json
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timezone
from typing import Any

# Longer cells are cut in tables (never in JSON or a single record's lines).
CELL_WIDTH = 64


def _timestamp(value: Any, short: bool) -> str:
    """The same ISO 8601 whether the database gave a datetime (PostgreSQL) or text (SQLite)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not short:
        return value.isoformat()
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return value.strftime("%Y-%m-%d %H:%M:%S")


def cell(column: str, value: Any, short: bool = True) -> str:
    """One value as a table or record shows it: C{-} for none, timestamps in UTC, unprintable characters as spaces."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_at"):
        text = _timestamp(value, short)
    else:
        text = str(value)
    text = "".join(c if c.isprintable() else " " for c in text)
    if short and len(text) > CELL_WIDTH:
        text = text[: CELL_WIDTH - 3] + "..."
    return text


def table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """Aligned columns headed by the column names, for people reading a terminal."""
    cells = [list(columns)] + [[cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
        for line in cells
    )


def _json_value(value: Any, column: str = "") -> Any:
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v, k) for k, v in value.items()}
    if isinstance(value, (datetime, date)) or (column.endswith("_at") and value is not None):
        return _timestamp(value, short=False)
    return value


def to_json(value: Any) -> str:
    """JSON keyed by the column names of README's Data section, timestamps as ISO 8601 strings."""
    return json.dumps(_json_value(value), indent=2, ensure_ascii=False)
