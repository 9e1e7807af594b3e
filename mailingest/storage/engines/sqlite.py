"""
The embedded database: one SQLite file through L{twisted.enterprise.adbapi}.

One connection (SQLite has one writer anyway), WAL with C{synchronous=FULL} so
a commit is durable when it returns, and C{BEGIN IMMEDIATE} so an interaction
that reads then writes is not overtaken by another process (the admin command).

While another process holds the database locked, an interaction waits for it
(SQLite's busy timeout), and interactions run one after another on the one
connection. Background work (extraction claims, the organisation refresh, the
blob sweeper, readiness and metrics) must not put its own long waits in front of the message inserts
an SMTP client is waiting for: it runs through L{SqliteEngine.background},
which waits BACKGROUND_BUSY_TIMEOUT_MS at most and then fails (its callers
poll again later), so a queued insert gets the connection next.
"""

import os
import sqlite3
from datetime import datetime, timezone

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailingest.storage.engines import CursorTransaction, Engine, IEngine

BUSY_TIMEOUT_MS = 10000
BACKGROUND_BUSY_TIMEOUT_MS = 50


def _adapt_datetime(value: datetime) -> str:
    """Fixed-width ISO 8601, so SQLite compares timestamps as text correctly."""
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


sqlite3.register_adapter(datetime, _adapt_datetime)


def _open(conn: sqlite3.Connection) -> None:
    conn.isolation_level = None
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


class _SqliteTransaction(CursorTransaction):
    def execute(self, sql: str, args: tuple = ()):
        self._cursor.execute(sql, args)
        return defer.succeed(None)


def _result_of(d: defer.Deferred):
    """The result of a Deferred that has already fired (no reactor in this thread)."""
    box = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("a SQLite interaction waited on something asynchronous")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@implementer(IEngine)
class SqliteEngine(Engine):
    skip_locked = ""
    integrity_errors = (sqlite3.IntegrityError,)
    # Timestamps are fixed-width ISO 8601 text (see _adapt_datetime).
    schema_terms = {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "timestamp": "TEXT",
        "now": "strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')",
    }
    exclusive = True

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open,
        )

    def __repr__(self) -> str:
        return f"<SqliteEngine {self.path}>"

    def interaction(self, fn, *args, **kwargs) -> defer.Deferred:
        return self._interaction(BUSY_TIMEOUT_MS, fn, args, kwargs)

    def background(self, fn, *args, **kwargs) -> defer.Deferred:
        """An interaction that gives way: it fails rather than wait long for a lock held elsewhere."""
        return self._interaction(BACKGROUND_BUSY_TIMEOUT_MS, fn, args, kwargs)

    def _interaction(self, busy_timeout_ms: int, fn, args, kwargs) -> defer.Deferred:
        def run(txn):
            txn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            txn.execute("BEGIN IMMEDIATE")
            return _result_of(
                defer.maybeDeferred(fn, _SqliteTransaction(txn), *args, **kwargs)
            )

        return self._pool.runInteraction(run)

    def notify(self, txn, channel: str, payload: str = "") -> defer.Deferred:
        """One daemon per SQLite file: its own wake-up is a direct call, nothing to send."""
        return defer.succeed(None)

    def listen(self, channel: str, callback) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        self._pool.close()
        return defer.succeed(None)
