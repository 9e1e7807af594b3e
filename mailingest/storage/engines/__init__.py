"""
What differs between SQLite and PostgreSQL, and nothing else.

An engine runs an interaction: a function written once that receives an
L{IDatabaseTransaction} whose C{execute} returns a Deferred, and returns a
Deferred (the store's are C{async def}, run with C{Deferred.fromCoroutine}). On PostgreSQL those Deferreds are really asynchronous
(txpostgres); on SQLite the whole interaction runs in the adbapi thread and
every Deferred has already fired. SQL is written with C{?} placeholders.

L{IEngine} is the contract both engines fulfil, L{Engine} what they share;
L{create_engine} picks one from a C{--database} URL. The engine modules are
imported only when chosen: PostgreSQL's driver need not be installed for SQLite.
"""

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from mailingest.errors import ConfigError
from mailingest.ops.secrets import redact_url
from mailingest.storage.urls import sqlite_path, url_scheme


class IDatabaseTransaction(Interface):
    """One database transaction as an interaction sees it (not L{mailingest.delivery.transaction.Transaction}, an SMTP one)."""

    def execute(sql: str, args: tuple = ()) -> Any:
        """Run one statement; returns a Deferred."""

    def read_within(seconds: float, sql: str, args: tuple = ()) -> Any:
        """
        Run one SELECT, stopped by the database if it takes longer than
        C{seconds}; a Deferred firing with its rows (dicts), or None when it
        was stopped (the transaction goes on). For a read whose cost the
        data decides, so that it cannot hold a connection others wait for.
        """

    def fetchall() -> list[dict]:
        """Rows of the last statement, as dicts."""

    def fetchone() -> dict | None:
        """The next row of the last statement, as a dict, or None."""


@implementer(IDatabaseTransaction)
class CursorTransaction:
    """An L{IDatabaseTransaction} over a cursor whose rows map column names to values; engines add C{execute}."""

    def __init__(self, cursor):
        self._cursor = cursor

    def fetchall(self) -> list[dict]:
        return [dict(row) for row in self._cursor.fetchall()]

    def fetchone(self) -> dict | None:
        row = self._cursor.fetchone()
        return None if row is None else dict(row)


class IEngine(Interface):
    """
    A database the store runs on (the stores' only way to it).

    C{skip_locked} ends a claiming SELECT (row locks where the database has
    them); C{integrity_errors} are what a violated constraint raises;
    C{schema_terms} fills the placeholders of the schema files (see
    L{mailingest.storage.stores.schema.migrations}); C{exclusive} is True when one
    daemon at a time uses the database (SQLite: one daemon per file), so
    what it finds claimed at start-up its own previous run left;
    C{session_locks} is True when L{claiming} runs on one connection that
    lives as long as the engine, so locks held by its session end when the
    daemon's connection does (PostgreSQL's advisory locks).
    """

    skip_locked = Attribute("SQL that ends a claiming SELECT (str)")
    indexed_by = Attribute(
        "what follows a table's name to make a query read the index named by {} (str): SQLite's INDEXED BY,"
        " where the planner without statistics takes an index that reads every row of a status; empty on PostgreSQL"
    )
    integrity_errors = Attribute("what a violated constraint raises (tuple of exception types)")
    schema_terms = Attribute("values of the schema files' {placeholders} (mapping)")
    text_search = Attribute(
        'how messages are searched by text (str): "fts5" (SQLite, whose engine then also runs the transactions'
        " of the search index's own file with search_index(fn, *args)), or \"pg_trgm\" (PostgreSQL, whose engine"
        " then also runs a statement outside any transaction with autocommit(sql), for CREATE INDEX CONCURRENTLY)"
    )
    exclusive = Attribute("one daemon at a time uses the database (bool)")
    session_locks = Attribute("claims run on one connection that lives as long as the engine (bool)")

    def interaction(fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """Run C{fn(txn, *args, **kwargs)} in one transaction."""

    def background(fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """An interaction for work nobody waits on: it must not hold up L{interaction}s."""

    def reading(fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """
        An interaction that only reads (a write in it fails), for the pages
        people and applications ask for: however long such reads take, and
        however many come at once, none is queued in front of an
        L{interaction}, so a tenant's console cannot hold another tenant's
        mail.
        """

    def claiming(fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """An interaction that claims work, or lets go of claims."""

    def notify(txn: IDatabaseTransaction, channel: str, payload: str = "") -> defer.Deferred:
        """Wake the listeners of C{channel} (in every daemon) when C{txn} commits."""

    def listen(channel: str, callback: Callable[[str], object]) -> defer.Deferred:
        """Call C{callback(payload)} for each notification on C{channel}; fires once listening."""

    def script(sql: str) -> list[str]:
        """Split a migration file into statements."""

    def close() -> defer.Deferred:
        """Release connections and threads."""


def _without_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


class Engine:
    """What both L{IEngine}s do alike; each engine module declares and completes the rest."""

    session_locks = False

    def claiming(self, fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """A L{background} interaction, unless the engine has L{session_locks}."""
        return self.background(fn, *args, **kwargs)

    def script(self, sql: str) -> list[str]:
        """Split a migration file into statements (ours hold no literal ';'); comments alone are none."""
        return [s.strip() for s in sql.split(";") if _without_comments(s).strip()]


def create_engine(url: str) -> IEngine:
    """The engine for C{--database}: C{sqlite:///path} or C{postgresql://...}."""
    scheme = url_scheme(url)
    if scheme == "sqlite":
        from mailingest.storage.engines.sqlite import SqliteEngine

        return SqliteEngine(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        try:
            from mailingest.storage.engines.postgresql import PostgresqlEngine
        except ImportError:
            raise ConfigError(
                "PostgreSQL support is not available in this version (--database " + redact_url(url) + ")"
            ) from None
        return PostgresqlEngine(url)
    raise ConfigError(f"unsupported database URL {redact_url(url)!r}: use sqlite:///... or postgresql://...")
