"""
The embedded database: one SQLite file through L{twisted.enterprise.adbapi}.

One connection for the interactions that write (SQLite has one writer
anyway), WAL with C{synchronous=FULL} so a commit is durable when it returns,
and C{BEGIN IMMEDIATE} so an interaction that reads then writes is not
overtaken by another process (the admin command). The read model's pages and
searches run on READERS read-only connections of their own
(L{SqliteEngine.reading}): in WAL they read a snapshot while the writer
commits, so no read, however slow, is queued in front of a message insert.

The search index lives in a file of its own beside the database
(L{search_path}), written by one connection of its own
(L{SqliteEngine.search_index}) behind intake: FTS5 merges its segments
inside the transactions that write it, for tens to hundreds of
milliseconds at a million messages, and in a file of its own that holds
only its own lock, never a message insert's. The read connections attach it as C{search}.
A search file SQLite cannot read (damaged, or not a database) never keeps
mail or the database from being used: it is moved aside and made again
(L{SqliteEngine._search_file_unreadable}), at start-up or when a read or
the index's loop meets it.

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
import time
from datetime import datetime, timezone

from twisted.enterprise import adbapi
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailingest.storage.engines import CursorTransaction, Engine, IEngine

log = Logger()

BUSY_TIMEOUT_MS = 10000
# Read-only connections for the read model (two, so that one long read does not queue the pages behind it).
READERS = 2
# How often (in steps of SQLite's machine) a time-limited read looks at the clock: a fraction of a
# millisecond apart in plain SQL, a few milliseconds inside FTS5's reading (it stops about 6 ms late).
PROGRESS_STEPS = 1000

# The search index (issue 28): an FTS5 trigram table over subject, sender and
# Message-ID (substring, case-insensitive) whose rowid is the organisation
# first, then its newest message first: (org_id + 1) * 2^40 - id (ids below
# 2^40, organisations below 2^23: a 64-bit rowid). Every trigram's list is
# then in that order, and a search seeks to its organisation's stretch and
# walks it, newest first, only until the page is full (FTS5 walks a term's
# rows lazily in rowid order, but backwards only after reading all of them).
# It keeps its text (not contentless), so a row is deleted by its rowid
# alone whatever text it was indexed with. It holds the messages with ids
# in [low, high) of search_progress (low and high -1 until the first step);
# stale_done is the last row of the database's message_search_stale (what
# changed or went since) it has dealt with; rewrite is 1 while the index is
# being rewritten after an erasure. Derived data: a missing file, or
# one that does not belong with the database (restored from another time),
# is made again and filled (see mailingest.storage.stores.search).
SEARCH_ORG_SPAN = 1 << 40
SEARCH_FILE_SUFFIX = "-search"
SEARCH_WAL_LIMIT = 64 << 20
_SEARCH_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS message_search USING fts5(subject, mail_from, message_id, tokenize='trigram');
CREATE TABLE IF NOT EXISTS search_progress (
    low BIGINT NOT NULL, high BIGINT NOT NULL, stale_done BIGINT NOT NULL, rewrite INTEGER NOT NULL DEFAULT 0
);
"""


def search_rowid(org_id: str, message_id: str) -> str:
    """The SQL of the search table's rowid for the columns C{org_id} and C{message_id}."""
    return f"({org_id} + 1) * {SEARCH_ORG_SPAN} - {message_id}"


def search_row(side: str = "") -> str:
    """
    The search table's values (rowid, subject, mail_from, message_id) for
    the C{inbound_message} row C{side} (C{m.} in a SELECT from it).
    """
    return f"{search_rowid(side + 'org_id', side + 'id')}, {side}subject, {side}mail_from, {side}source_message_id"


def search_path(path: str) -> str:
    """The search index's file for the database file C{path}."""
    return path + SEARCH_FILE_SUFFIX


# Migration 018: the search table, its triggers and its backfill's progress
# (013's and 017's) leave the database; what changes or goes is queued for
# the search index instead.
_SEARCH_IN_OWN_FILE = """
DROP TRIGGER IF EXISTS message_search_insert;
DROP TRIGGER IF EXISTS message_search_delete;
DROP TRIGGER IF EXISTS message_search_update;
DROP TABLE IF EXISTS message_search;
DROP TABLE IF EXISTS message_search_backfill;
CREATE TABLE message_search_stale (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id BIGINT NOT NULL, org_id BIGINT NOT NULL);
CREATE TRIGGER message_search_stale_delete AFTER DELETE ON inbound_message BEGIN
    INSERT INTO message_search_stale (message_id, org_id) VALUES (old.id, old.org_id);
END;
CREATE TRIGGER message_search_stale_update AFTER UPDATE OF org_id, subject, mail_from, source_message_id ON inbound_message BEGIN
    INSERT INTO message_search_stale (message_id, org_id) VALUES (old.id, old.org_id);
END;
"""
BACKGROUND_BUSY_TIMEOUT_MS = 50
# A write that changes nothing: it takes the search file's write lock, and that file's alone.
_LOCK_SEARCH_FILE = "UPDATE search_progress SET low = low WHERE 0"


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
    # What a write replaces or deletes (an erased sender, subject or Message-ID) is overwritten with
    # zeros, in its page and in pages it frees, not left in the file; set before ATTACH, it covers both files.
    conn.execute("PRAGMA secure_delete = ON")


def _attach_search(conn: sqlite3.Connection, search_file: str) -> None:
    conn.execute("ATTACH DATABASE ? AS search", (search_file,))


def _open_reader(conn: sqlite3.Connection, search_file: str) -> None:
    _open(conn)
    _attach_search(conn, search_file)
    conn.execute("PRAGMA query_only = ON")


def _open_search(conn: sqlite3.Connection, database_file: str) -> None:
    _open(conn)
    # After a checkpoint the WAL goes back to this size, instead of keeping the size its largest
    # transactions gave it (a part of the rewrite after an erasure: mailingest.storage.stores.search)
    # and the older pages they held.
    conn.execute("PRAGMA journal_size_limit = %d" % SEARCH_WAL_LIMIT)
    conn.execute("ATTACH DATABASE ? AS mail", (database_file,))


def _create_search_file(path: str) -> None:
    """The search index's tables, in a new file or one that lacks them (it is derived data: made again when lost)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # This connection's own writes (the tables, once) need not wait for the disk: lost, they are made again.
        # The index's connection commits with synchronous=FULL, as every connection _open makes.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        # Statements that write (a CREATE, an INSERT even of no row) wait for the index's lock: only when needed.
        if conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'search_progress'").fetchone()[0] == 0:
            conn.executescript(_SEARCH_SCHEMA)
        if "rewrite" not in [row[1] for row in conn.execute("PRAGMA table_info(search_progress)")]:
            # A file made before the rewrite after erasures (mailingest.storage.stores.search).
            conn.execute("ALTER TABLE search_progress ADD COLUMN rewrite INTEGER NOT NULL DEFAULT 0")
        if conn.execute("SELECT COUNT(*) FROM search_progress").fetchone()[0] == 0:
            conn.execute(
                "INSERT INTO search_progress (low, high, stale_done)"
                " SELECT -1, -1, -1 WHERE NOT EXISTS (SELECT 1 FROM search_progress)"
            )
    finally:
        conn.close()


# What SQLite answers for a file it cannot read as a database: damaged, or not one at all.
_UNREADABLE = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
# A read that met an unreadable file checks the search file at most this often (it may be the database that is).
CHECK_INTERVAL = 60.0


def unreadable(error: BaseException) -> bool:
    """Whether SQLite raised C{error} for a file it cannot read as a database (its primary result code)."""
    return isinstance(error, sqlite3.DatabaseError) and (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _UNREADABLE


def damaged_search_path(path: str) -> str:
    """Where an unreadable search file C{path} is moved, for the operator to look at (one, the latest)."""
    return path + ".damaged"


def _set_aside(path: str) -> None:
    """The search file, its WAL and shared memory moved to L{damaged_search_path}, replacing those of before."""
    aside = damaged_search_path(path)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
        elif os.path.exists(aside + suffix):
            os.remove(aside + suffix)


def _search_file_problem(path: str) -> str | None:
    """What SQLite's quick check finds wrong with the search file, read from disk on a connection of its own; None when nothing."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        rows = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as e:
        if not unreadable(e):
            raise
        return str(e)
    finally:
        conn.close()
    return None if rows == ["ok"] else "; ".join(rows)


def _remake_search_file(path: str) -> None:
    """An unreadable search file set aside and a new one made in its place (to be filled from the database)."""
    _set_aside(path)
    _create_search_file(path)


class _SqliteTransaction(CursorTransaction):
    def execute(self, sql: str, args: tuple = ()):
        self._cursor.execute(sql, args)
        return defer.succeed(None)

    def read_within(self, seconds: float, sql: str, args: tuple = ()):
        # SQLite calls the handler every PROGRESS_STEPS steps of its machine,
        # FTS5's own reading included; a true answer stops the statement.
        deadline = time.monotonic() + seconds
        connection = self._cursor.connection
        connection.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
        try:
            self._cursor.execute(sql, args)
            rows = self._cursor.fetchall()
        except sqlite3.OperationalError as e:
            if str(e) != "interrupted":
                raise
            return defer.succeed(None)
        finally:
            connection.set_progress_handler(None, 0)
        return defer.succeed([dict(row) for row in rows])


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
    indexed_by = " INDEXED BY {}"
    integrity_errors = (sqlite3.IntegrityError,)
    # Timestamps are fixed-width ISO 8601 text (see _adapt_datetime).
    schema_terms = {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "timestamp": "TEXT",
        "now": "strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')",
        # The search tables of migrations 013 and 017, in the database: 018 drops them (the index has a file of its own).
        "message_search": "",
        "search_by_organisation": "",
        "search_in_own_file": _SEARCH_IN_OWN_FILE,
        # Migration 015: an index's entries end with the rowid, the id, already.
        "org_received_id": "",
        "then_id": "",
    }
    text_search = "fts5"
    exclusive = True

    def __init__(self, path: str):
        self.path = path
        self.search_path = search_path(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        try:
            _create_search_file(self.search_path)
        except sqlite3.Error as e:
            if not unreadable(e):
                # Which of the database's files it is (the error alone does not say).
                raise type(e)(f"search index {self.search_path}: {e}") from e
            _remake_search_file(self.search_path)
            self._log_remade(str(e))
        # Bumped each time the search file is made again; a read connection attached at an older one attaches again.
        self._search_generation = 0
        self._attached: dict[int, int] = {}
        self._indexing = defer.DeferredLock()
        self._checked_at: float | None = None
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open,
        )
        # WAL lets readers read while the one writer commits: the pages people
        # ask for are read on connections of their own (see IEngine.reading).
        self._readers = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=READERS,
            cp_openfun=self._open_read_connection,
        )
        self._indexer = self._indexer_pool()

    def _open_read_connection(self, conn: sqlite3.Connection) -> None:
        self._attached[id(conn)] = self._search_generation
        _open_reader(conn, self.search_path)

    def _indexer_pool(self) -> adbapi.ConnectionPool:
        """The search index's one writer: it reads the database (attached as mail) at one snapshot per transaction."""
        return adbapi.ConnectionPool(
            "sqlite3",
            self.search_path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=lambda conn: _open_search(conn, self.path),
        )

    def __repr__(self) -> str:
        return f"<SqliteEngine {self.path}>"

    def interaction(self, fn, *args, **kwargs) -> defer.Deferred:
        return self._interaction(BUSY_TIMEOUT_MS, fn, args, kwargs)

    def background(self, fn, *args, **kwargs) -> defer.Deferred:
        """An interaction that gives way: it fails rather than wait long for a lock held elsewhere."""
        return self._interaction(BACKGROUND_BUSY_TIMEOUT_MS, fn, args, kwargs)

    def reading(self, fn, *args, **kwargs) -> defer.Deferred:
        """An interaction on a read-only connection: one snapshot, no write lock."""
        return defer.Deferred.fromCoroutine(self._reading(fn, args, kwargs))

    async def _reading(self, fn, args, kwargs):
        def read():
            return self._interaction(BUSY_TIMEOUT_MS, fn, args, kwargs, self._readers, "BEGIN", attach=True)

        try:
            return await read()
        except sqlite3.DatabaseError as e:
            if not unreadable(e):
                raise
            # The search file is checked in the index's turn; made again, the read is tried once more on it.
            generation = self._search_generation
            try:
                await self._indexing.run(self._check_search_file, str(e))
            except Exception:
                log.failure("search index: cannot check its file or make it again")
            if self._search_generation == generation:
                raise
        return await read()

    async def _check_search_file(self, error: str) -> None:
        """
        After C{error}, from a read or the index (which read the database
        too): the search file checked, at most every L{CHECK_INTERVAL}
        seconds (when it is the database that is damaged, it stays so), and
        made again if SQLite cannot read it.
        """
        now = time.monotonic()
        if self._checked_at is not None and now - self._checked_at < CHECK_INTERVAL:
            return
        self._checked_at = now
        problem = await threads.deferToThread(_search_file_problem, self.search_path)
        if problem is not None:
            await self._search_file_unreadable(f"{error}: {problem}")

    async def _search_file_unreadable(self, error: str) -> None:
        """
        The search file moved aside and made again, to be filled from the
        database by the index's loop; each read connection attaches the new
        one at its next transaction (searches read rows until it is filled).
        """
        self._indexer.close()
        await threads.deferToThread(_remake_search_file, self.search_path)
        self._search_generation += 1
        self._indexer = self._indexer_pool()
        self._log_remade(error)

    def _log_remade(self, error: str) -> None:
        log.warn(
            "search index {path} could not be read ({error}): moved to {aside}, made again, filled from the database",
            path=self.search_path, error=error, aside=damaged_search_path(self.search_path),
        )

    def search_index(self, fn, *args, **kwargs) -> defer.Deferred:
        """
        An interaction on the search index's file, its write lock held from
        the start, the database (C{mail.}) read at one snapshot and never
        locked for writing (a BEGIN IMMEDIATE would lock it too).
        """
        return self._indexing.run(self._index_interaction, fn, args, kwargs)

    async def _index_interaction(self, fn, args, kwargs):
        try:
            return await self._interaction(BUSY_TIMEOUT_MS, fn, args, kwargs, self._indexer, "BEGIN", _LOCK_SEARCH_FILE)
        except sqlite3.DatabaseError as e:
            # Either file may be the one SQLite cannot read (the database is attached): the check tells.
            if unreadable(e):
                await self._check_search_file(str(e))
            raise

    def _interaction(
        self, busy_timeout_ms: int, fn, args, kwargs, pool=None, begin="BEGIN IMMEDIATE", first=None, attach=False
    ) -> defer.Deferred:
        def run(txn):
            txn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            if attach:
                self._attach_current(txn.connection)
            txn.execute(begin)
            if first:
                txn.execute(first)
            return _result_of(
                defer.maybeDeferred(fn, _SqliteTransaction(txn), *args, **kwargs)
            )

        return (pool or self._pool).runInteraction(run)

    def _attach_current(self, conn: sqlite3.Connection) -> None:
        """A read connection attached to the search file as it is now (made again since it attached it, say)."""
        generation = self._search_generation
        if self._attached.get(id(conn)) != generation:
            conn.execute("DETACH DATABASE search")
            _attach_search(conn, self.search_path)
            self._attached[id(conn)] = generation

    def script(self, sql: str) -> list[str]:
        """Split a migration file into statements; a trigger's body holds C{;} of its own."""
        statements, pending = [], ""
        for piece in sql.split(";"):
            pending += piece + ";"
            if sqlite3.complete_statement(pending):
                if pending.strip(" \n;"):
                    statements.append(pending.strip().rstrip(";"))
                pending = ""
        if pending.strip(" \n;"):
            statements.append(pending.strip().rstrip(";"))
        return statements

    def notify(self, txn, channel: str, payload: str = "") -> defer.Deferred:
        """One daemon per SQLite file: its own wake-up is a direct call, nothing to send."""
        return defer.succeed(None)

    def listen(self, channel: str, callback) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        self._pool.close()
        self._readers.close()
        self._indexer.close()
        return defer.succeed(None)
