"""The schema role: numbered migrations, readiness, closing the engine."""

import importlib.resources
import re

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailingest.interfaces import ISchemaStore
from mailingest.storage.engines import IEngine
from mailingest.storage.stores import search
from mailingest.storage.stores.base import StoreBase

log = Logger()
_SCHEMA_TERM = re.compile(r"\{(\w+)\}")
# A write of no row: it fails where the database can be read but not written (a read-only file
# or file system, a PostgreSQL standby or read-only transaction), where a read would answer.
_WRITE_NOTHING = "UPDATE schema_version SET version = version WHERE 1 = 0"


def migrations(engine: IEngine) -> list[tuple[int, str, str]]:
    """
    The schema deltas, in order, as C{engine} runs them: (version, name, sql).

    Each delta is written once, in C{schema/NNN_name.sql}, numbered once for
    both engines; its number and file name are what C{schema_version}
    records, so a database keeps its history whatever the layout of the
    files (until issue 13 each engine had its own tree of them). Where the
    engines spell a thing differently the file holds a term in braces:
    {id} (the primary key column), {timestamp} (a point in time) or {now}
    (the current time), which the engine's C{schema_terms} fill in.
    Everything else is SQL both engines read the same way; a delta that
    cannot be written so needs a new term, not a second file.
    """
    folder = importlib.resources.files("mailingest.storage") / "schema"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            sql = _SCHEMA_TERM.sub(lambda term: engine.schema_terms[term.group(1)], entry.read_text())
            found.append((int(entry.name.split("_", 1)[0]), entry.name, sql))
    return sorted(found)


@implementer(ISchemaStore)
class SchemaStore(StoreBase):
    def migrate(self):
        return self._run(self._migrate)

    async def _migrate(self, txn):
        await txn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        await txn.execute(_WRITE_NOTHING)
        await txn.execute("SELECT version FROM schema_version")
        done = {row["version"] for row in txn.fetchall()}
        applied = []
        for version, name, sql in migrations(self.engine):
            if version in done:
                continue
            for statement in self.engine.script(sql):
                await txn.execute(statement)
            await txn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, self._now().isoformat()),
            )
            applied.append(version)
        return applied

    def build_indexes(self, progress=lambda line: None, keep_going=lambda: True):
        """
        Build what a migration leaves to be built while the daemon runs (the
        search index), without holding the write lock for long: on SQLite
        its own file is filled by its own connection, 2,000 messages a
        transaction, until it holds them all; on PostgreSQL with CREATE INDEX
        CONCURRENTLY, outside any transaction. Calls C{progress} with a line
        now and then; stops early once C{keep_going()} is false. Running it
        again after it finished does nothing.
        """
        return defer.Deferred.fromCoroutine(self._build_indexes(progress, keep_going))

    async def _build_indexes(self, progress, keep_going) -> None:
        if self.engine.text_search == "pg_trgm":
            if await self._run(search.pg_index_built):
                return
            for statement in search.PG_STEPS:
                try:
                    await self.engine.autocommit(statement)
                except Exception as e:
                    reason = str(e).replace("\n", " ").strip()
                    progress(f"search index: not built ({reason}); search reads each organisation's messages")
                    return
            progress(search.describe_progress(None))
            return
        await self._index_all(keep_going, progress)

    def index_search(self, keep_going=lambda: True):
        """
        Bring SQLite's search index up to date with the messages (those that
        came, changed or went since, and a batch of older ones while it is
        being filled), one transaction of its own file at a time; fires when
        it holds them all, or once C{keep_going()} is false after one. Nothing
        to do on PostgreSQL, whose indexes the database keeps itself.
        """
        if self.engine.text_search != "fts5":
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._index_all(keep_going))

    async def _index_all(self, keep_going, progress=lambda line: None) -> None:
        """Index steps until none has more to do or C{keep_going()} is false; C{progress} told how far filling older messages got."""
        filled = 0
        while True:
            step = await self._index_search()
            filled += step.filled
            if not (step.more and keep_going()):
                break
            if step.below:
                progress(search.describe_progress(step.below))
        if filled and not step.below:
            progress(search.describe_progress(step.below))

    _stale_kept = 0

    async def _index_search(self) -> search.IndexStep:
        step = await self._index(search.index_step)
        if step.stale_done > self._stale_kept:
            # The queue of changes is only emptied once the index has dealt with them (its commit is durable).
            try:
                await self._background(search.forget_stale, step.stale_done)
            except Exception as e:
                # It gave way to intake (or failed): the next step tries again.
                log.debug("search index: changes dealt with kept for now: {error}", error=str(e))
            else:
                self._stale_kept = step.stale_done
        return step

    def check(self):
        return self._background(self._check)

    async def _check(self, txn):
        await txn.execute("SELECT 1 AS ok FROM schema_version LIMIT 1")
        txn.fetchall()
        await txn.execute(_WRITE_NOTHING)

    def close(self):
        return self.engine.close()
