"""
What differs between SQLite and PostgreSQL, and nothing else.

An engine runs an interaction: a function written once, in the
C{inlineCallbacks} style, that receives a L{Transaction} whose C{execute}
returns a Deferred. On PostgreSQL those Deferreds are really asynchronous
(txpostgres); on SQLite the whole interaction runs in the adbapi thread and
every Deferred has already fired. SQL is written with C{?} placeholders.
"""

from typing import Any, Protocol


class Transaction(Protocol):
    def execute(self, sql: str, args: tuple = ()) -> Any:
        """Run one statement; returns a Deferred."""

    def fetchall(self) -> list[dict]:
        """Rows of the last statement, as dicts."""

    def fetchone(self) -> dict | None:
        """The next row of the last statement, as a dict, or None."""
