"""
The one store API over SQLite and PostgreSQL.

Every query is written once here; the engine (L{mailingest.storage.engines})
supplies the connection pool, the placeholder style and the few clauses the two
databases spell differently.
"""

import importlib.resources
import re
from datetime import datetime, timedelta, timezone

from twisted.internet import defer
from zope.interface import implementer

from mailingest.errors import NoSuchMessage, NoSuchOrg, OrgExists
from mailingest.storage.engines import Engine, create_engine
from mailingest.storage.group_commit import GroupCommit
from mailingest.interfaces import Collision, Duplicate, IStore

MESSAGE_COLUMNS = (
    "id, org_id, source, source_message_id, mail_from, rcpt_to, subject, raw_key,"
    " raw_size, raw_sha256, status, attempts, last_error, received_at, parsed_at,"
    " content_sha256, message_id_collision"
)
_MESSAGE_SELECT = (
    "SELECT "
    + ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    + ", o.slug AS org_slug FROM inbound_message m JOIN organization o ON o.id = m.org_id"
)
DOCUMENT_COLUMNS = (
    "id, org_id, inbound_message_id, filename, content_type, size, sha256,"
    " storage_key, created_at"
)
_DOCUMENT_SELECT = (
    "SELECT "
    + ", ".join("d." + c.strip() for c in DOCUMENT_COLUMNS.split(","))
    + ", o.slug AS org_slug FROM document d JOIN organization o ON o.id = d.org_id"
)
_ORG_SELECT = "SELECT id, slug, name, active, created_at FROM organization"


# Blob keys looked up per statement (twice: messages and documents), well
# under SQLite's and PostgreSQL's limits on bound parameters.
KEY_BATCH = 500

# Other daemons sharing the database are told of new messages on this channel.
RECEIVED_CHANNEL = "mailingest_received"


# On PostgreSQL a claim is also a session-level advisory lock (this first key,
# the message id modulo 2^31 the second) held on the engine's claiming
# connection: when a daemon dies its session ends, the server drops its locks,
# and its messages are claimed again at once instead of when their lease runs out.
CLAIM_LOCKS = 1835100524
_CLAIM_LOCK_KEY = "(id % 2147483648)::int"
_HELD_CLAIM_LOCKS = (
    "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = ?"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


# PostgreSQL refuses NUL in text; neither driver can encode a lone surrogate.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value):
    """A text value as both databases hold it: each NUL or lone surrogate becomes U+FFFD."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    return value


class _StorableTransaction:
    """
    The one place where text meets the database: every value bound to a
    statement goes through L{storable}, so sender-controlled text (a Subject
    decoding to NUL, a Content-Type with one) is stored the same on both
    engines instead of failing on PostgreSQL only.
    """

    def __init__(self, txn):
        self._txn = txn
        self.fetchall = txn.fetchall
        self.fetchone = txn.fetchone

    def execute(self, sql: str, args: tuple = ()):
        return self._txn.execute(sql, tuple(storable(value) for value in args))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _org(row: dict | None) -> dict | None:
    if row is not None:
        row["active"] = bool(row["active"])
    return row


def _message(row: dict | None) -> dict | None:
    if row is not None:
        row["message_id_collision"] = bool(row["message_id_collision"])
    return row


_SCHEMA_TERM = re.compile(r"\{(\w+)\}")


def migrations(engine: Engine) -> list[tuple[int, str, str]]:
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


def _storable_interaction(txn, fn, *args, **kwargs):
    return fn(_StorableTransaction(txn), *args, **kwargs)


def open_store(url: str) -> "Store":
    """The store on the database of C{--database}."""
    return Store(create_engine(url))


@implementer(IStore)
class Store:
    def __init__(self, engine: Engine, clock=utcnow):
        self.engine = engine
        self.exclusive = engine.exclusive
        self._now = clock
        self._inserts = GroupCommit(lambda batches: self._run(self._insert_batches, batches))
        self._parsed = GroupCommit(lambda batch: self._run(self._mark_parsed_batch, batch))

    def __repr__(self) -> str:
        return f"<Store {self.engine!r}>"

    def _run(self, fn, *args, **kwargs) -> defer.Deferred:
        return self.engine.interaction(_storable_interaction, fn, *args, **kwargs)

    def _background(self, fn, *args, **kwargs) -> defer.Deferred:
        """For work nobody waits on: it gives way to message inserts (see the SQLite engine)."""
        return self.engine.background(_storable_interaction, fn, *args, **kwargs)

    def close(self):
        return self.engine.close()

    def on_received(self, callback) -> defer.Deferred:
        """Call C{callback()} when any daemon sharing this database stores a message."""
        return self.engine.listen(RECEIVED_CHANNEL, lambda payload: callback())

    # schema

    def migrate(self):
        return self._run(self._migrate)

    @defer.inlineCallbacks
    def _migrate(self, txn):
        yield txn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        yield txn.execute("SELECT version FROM schema_version")
        done = {row["version"] for row in txn.fetchall()}
        applied = []
        for version, name, sql in migrations(self.engine):
            if version in done:
                continue
            for statement in self.engine.script(sql):
                yield txn.execute(statement)
            yield txn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, self._now().isoformat()),
            )
            applied.append(version)
        return applied

    def check(self):
        return self._background(self._check)

    @defer.inlineCallbacks
    def _check(self, txn):
        yield txn.execute("SELECT 1 AS ok FROM schema_version LIMIT 1")
        txn.fetchall()

    # organisations

    def add_org(self, slug, name):
        return self._run(self._add_org, slug.lower(), name)

    @defer.inlineCallbacks
    def _add_org(self, txn, slug, name):
        yield txn.execute(_ORG_SELECT + " WHERE slug = ?", (slug,))
        if txn.fetchone() is not None:
            raise OrgExists(f"organisation {slug!r} already exists")
        yield txn.execute(
            "INSERT INTO organization (slug, name, active, created_at)"
            " VALUES (?, ?, ?, ?) RETURNING id, slug, name, active, created_at",
            (slug, name, True, self._now()),
        )
        return _org(txn.fetchone())

    def list_orgs(self):
        return self._run(self._list_orgs)

    @defer.inlineCallbacks
    def _list_orgs(self, txn):
        yield txn.execute(_ORG_SELECT + " ORDER BY slug")
        return [_org(row) for row in txn.fetchall()]

    def get_org(self, slug):
        return self._run(self._get_org, slug.lower())

    @defer.inlineCallbacks
    def _get_org(self, txn, slug):
        yield txn.execute(_ORG_SELECT + " WHERE slug = ?", (slug,))
        return _org(txn.fetchone())

    def set_org_active(self, slug, active):
        return self._run(self._set_org_active, slug.lower(), active)

    @defer.inlineCallbacks
    def _set_org_active(self, txn, slug, active):
        yield txn.execute(
            "UPDATE organization SET active = ? WHERE slug = ?"
            " RETURNING id, slug, name, active, created_at",
            (bool(active), slug),
        )
        row = txn.fetchone()
        if row is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return _org(row)

    def active_orgs(self):
        return self._background(self._active_orgs)

    @defer.inlineCallbacks
    def _active_orgs(self, txn):
        yield txn.execute("SELECT id, slug FROM organization WHERE active = ?", (True,))
        return {row["slug"]: row["id"] for row in txn.fetchall()}

    # inbound messages

    def insert_messages(self, rows):
        return self._inserts.submit(rows)

    @defer.inlineCallbacks
    def _insert_batches(self, txn, batches):
        results = []
        for rows in batches:
            ids = []
            for row in rows:
                ids.append((yield self._insert_message(txn, row)))
            results.append(ids)
        if any(not isinstance(row_id, Duplicate) for ids in results for row_id in ids):
            yield self.engine.notify(txn, RECEIVED_CHANNEL)
        return results

    @defer.inlineCallbacks
    def _insert_message(self, txn, row, collision=False):
        """
        One statement when the Message-ID is new. When it is taken, the row
        holding it decides: same content digest (or none recorded), a
        duplicate; else this message is stored under a suffixed id, itself
        checked the same way, so a retry of it is a duplicate too.
        """
        yield txn.execute(
            "INSERT INTO inbound_message (org_id, source, source_message_id,"
            " mail_from, rcpt_to, subject, raw_key, raw_size, raw_sha256, content_sha256,"
            " message_id_collision, status, attempts, received_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', 0, ?, ?)"
            " ON CONFLICT (org_id, source, source_message_id) DO NOTHING RETURNING id",
            (
                row["org_id"],
                row["source"],
                row["source_message_id"],
                row["mail_from"],
                row["rcpt_to"],
                row["subject"],
                row["raw_key"],
                row["raw_size"],
                row["raw_sha256"],
                row.get("content_sha256"),
                collision,
                row["received_at"],
                row["received_at"],
            ),
        )
        inserted = txn.fetchone()
        if inserted is not None:
            return Collision(inserted["id"]) if collision else inserted["id"]
        yield txn.execute(
            "SELECT id, content_sha256 FROM inbound_message"
            " WHERE org_id = ? AND source = ? AND source_message_id = ?",
            (row["org_id"], row["source"], row["source_message_id"]),
        )
        holder = txn.fetchone()
        digest = row.get("content_sha256")
        if digest is None or holder["content_sha256"] in (None, digest):
            return Duplicate(holder["id"])
        suffixed = dict(row, source_message_id=f"{row['source_message_id']}#collision-{digest[:12]}")
        return (yield self._insert_message(txn, suffixed, collision=True))

    def raw_key_in_use(self, key):
        return self._run(self._raw_key_in_use, key)

    @defer.inlineCallbacks
    def _raw_key_in_use(self, txn, key):
        yield txn.execute("SELECT 1 AS used FROM inbound_message WHERE raw_key = ? LIMIT 1", (key,))
        return txn.fetchone() is not None

    def referenced_keys(self, keys):
        return self._background(self._referenced_keys, list(keys))

    @defer.inlineCallbacks
    def _referenced_keys(self, txn, keys):
        found = set()
        for start in range(0, len(keys), KEY_BATCH):
            batch = keys[start:start + KEY_BATCH]
            marks = ", ".join("?" for _ in batch)
            yield txn.execute(
                f"SELECT raw_key AS key FROM inbound_message WHERE raw_key IN ({marks})"
                f" UNION SELECT storage_key AS key FROM document WHERE storage_key IN ({marks})",
                (*batch, *batch),
            )
            found.update(row["key"] for row in txn.fetchall())
        # A message still to be extracted (a reprocess, a retry) may be
        # putting its documents again right now, before recording them: its
        # document keys count as referenced until it is parsed or failed.
        pending = {}
        for key in keys:
            if key not in found and key.startswith("documents/"):
                parts = key.split("/")
                if len(parts) == 4 and parts[2].isdigit():
                    pending.setdefault(int(parts[2]), []).append(key)
        ids = list(pending)
        for start in range(0, len(ids), KEY_BATCH):
            batch = ids[start:start + KEY_BATCH]
            marks = ", ".join("?" for _ in batch)
            yield txn.execute(
                f"SELECT id FROM inbound_message WHERE status = 'received' AND id IN ({marks})", batch
            )
            for row in txn.fetchall():
                found.update(pending[row["id"]])
        return found

    def list_messages(self, org_slug=None, status=None, limit=50):
        return self._run(self._list_messages, org_slug, status, limit)

    @defer.inlineCallbacks
    def _list_messages(self, txn, org_slug, status, limit):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if status is not None:
            where.append("m.status = ?")
            args.append(status)
        sql = _MESSAGE_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.received_at DESC, m.id DESC LIMIT ?"
        yield txn.execute(sql, (*args, int(limit)))
        return [_message(row) for row in txn.fetchall()]

    def get_message(self, message_id):
        return self._run(self._get_message, int(message_id))

    @defer.inlineCallbacks
    def _get_message(self, txn, message_id):
        yield txn.execute(_MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return _message(txn.fetchone())

    def count_messages(self, status=None):
        return self._background(self._count_messages, status)

    @defer.inlineCallbacks
    def _count_messages(self, txn, status):
        if status is None:
            yield txn.execute("SELECT COUNT(*) AS n FROM inbound_message")
        else:
            yield txn.execute(
                "SELECT COUNT(*) AS n FROM inbound_message WHERE status = ?", (status,)
            )
        return txn.fetchone()["n"]

    # documents

    def list_documents(self, org_slug=None, message_id=None, limit=None):
        return self._run(self._list_documents, org_slug, message_id, limit)

    @defer.inlineCallbacks
    def _list_documents(self, txn, org_slug, message_id, limit):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if message_id is not None:
            where.append("d.inbound_message_id = ?")
            args.append(int(message_id))
        sql = _DOCUMENT_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        if message_id is not None:
            sql += " ORDER BY d.ordinal"
        else:
            sql += " ORDER BY d.created_at DESC, d.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        yield txn.execute(sql, tuple(args))
        return txn.fetchall()

    def get_document(self, document_id):
        return self._run(self._get_document, int(document_id))

    @defer.inlineCallbacks
    def _get_document(self, txn, document_id):
        yield txn.execute(_DOCUMENT_SELECT + " WHERE d.id = ?", (document_id,))
        return txn.fetchone()

    # the extraction queue

    def reprocess(self, message_id):
        return self._run(self._reprocess, int(message_id))

    @defer.inlineCallbacks
    def _reprocess(self, txn, message_id):
        yield txn.execute(
            "UPDATE inbound_message SET status = 'received', attempts = 0,"
            " last_error = NULL, parsed_at = NULL, next_attempt_at = ?, claimed_until = NULL"
            " WHERE id = ? RETURNING id",
            (self._now(), message_id),
        )
        if txn.fetchone() is None:
            raise NoSuchMessage(f"no message {message_id}")
        yield txn.execute(_MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return _message(txn.fetchone())

    def reprocess_failed(self, org_slug=None):
        return self._run(self._reprocess_failed, org_slug)

    @defer.inlineCallbacks
    def _reprocess_failed(self, txn, org_slug):
        sql = (
            "UPDATE inbound_message SET status = 'received', attempts = 0,"
            " last_error = NULL, next_attempt_at = ?, claimed_until = NULL"
            " WHERE status = 'failed'"
        )
        args = [self._now()]
        if org_slug is not None:
            sql += " AND org_id IN (SELECT id FROM organization WHERE slug = ?)"
            args.append(org_slug.lower())
        yield txn.execute(sql + " RETURNING id", tuple(args))
        return len(txn.fetchall())

    def claim(self, lease_seconds, limit=1):
        return self.engine.claiming(_storable_interaction, self._claim, lease_seconds, int(limit))

    @defer.inlineCallbacks
    def _claim(self, txn, lease_seconds, limit):
        now = self._now()
        free = "claimed_until IS NULL OR claimed_until < ?"
        args = [now, now]
        if self.engine.session_locks:
            # A live lease whose lock no session holds is a dead daemon's.
            free += f" OR {_CLAIM_LOCK_KEY} NOT IN ({_HELD_CLAIM_LOCKS})"
            args.append(CLAIM_LOCKS)
        yield txn.execute(
            "SELECT id FROM inbound_message WHERE status = 'received'"
            f" AND (next_attempt_at IS NULL OR next_attempt_at <= ?) AND ({free})"
            " ORDER BY next_attempt_at, id LIMIT ?" + self.engine.skip_locked,
            (*args, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if ids and self.engine.session_locks:
            # Held until the outcome is recorded (unlock_claims). A lock another
            # session still holds means that daemon recorded the outcome and has
            # not let go yet, or its lease ran out: the lease decides, as before.
            marks = ", ".join("?" for _ in ids)
            yield txn.execute(
                f"SELECT pg_try_advisory_lock(?, {_CLAIM_LOCK_KEY}) AS locked FROM inbound_message WHERE id IN ({marks})",
                (CLAIM_LOCKS, *ids),
            )
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        yield txn.execute(
            f"UPDATE inbound_message SET claimed_until = ? WHERE id IN ({marks})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        yield txn.execute(_MESSAGE_SELECT + f" WHERE m.id IN ({marks}) ORDER BY m.id", tuple(ids))
        return [_message(row) for row in txn.fetchall()]

    def unlock_claims(self, message_ids):
        if not self.engine.session_locks or not message_ids:
            return defer.succeed(None)
        return self.engine.claiming(_storable_interaction, self._unlock_claims, [int(i) for i in message_ids])

    @defer.inlineCallbacks
    def _unlock_claims(self, txn, message_ids):
        marks = ", ".join("(?)" for _ in message_ids)
        yield txn.execute(
            f"SELECT pg_advisory_unlock(?, {_CLAIM_LOCK_KEY}) AS unlocked FROM (VALUES {marks}) AS claimed (id)",
            (CLAIM_LOCKS, *message_ids),
        )

    def renew_claims(self, message_ids, lease_seconds):
        return self._background(self._set_claims, list(message_ids), lease_seconds)

    def release_claims(self, message_ids=None):
        return self._run(self._set_claims, message_ids, None)

    @defer.inlineCallbacks
    def _set_claims(self, txn, message_ids, lease_seconds):
        until = None if lease_seconds is None else self._now() + timedelta(seconds=lease_seconds)
        sql = "UPDATE inbound_message SET claimed_until = ? WHERE status = 'received'"
        args = [until]
        if message_ids is not None:
            if not message_ids:
                return
            sql += " AND id IN (" + ", ".join("?" for _ in message_ids) + ")"
            args += [int(i) for i in message_ids]
        yield txn.execute(sql, tuple(args))

    def mark_parsed(self, message_id, documents=()):
        return self._parsed.submit((int(message_id), list(documents)))

    @defer.inlineCallbacks
    def _mark_parsed_batch(self, txn, batch):
        for message_id, documents in batch:
            yield self._mark_parsed(txn, message_id, documents)
        return [None] * len(batch)

    @defer.inlineCallbacks
    def _mark_parsed(self, txn, message_id, documents):
        for row in documents:
            yield txn.execute(
                "INSERT INTO document (org_id, inbound_message_id, ordinal, filename,"
                " content_type, size, sha256, storage_key, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (inbound_message_id, ordinal) DO NOTHING",
                (
                    row["org_id"],
                    message_id,
                    row["ordinal"],
                    row["filename"],
                    row["content_type"],
                    row["size"],
                    row["sha256"],
                    row["storage_key"],
                    self._now(),
                ),
            )
        yield self._finish(txn, message_id, "parsed", None, None)

    def mark_failed(self, message_id, error, attempts):
        return self._run(self._finish, int(message_id), "failed", error, attempts)

    @defer.inlineCallbacks
    def _finish(self, txn, message_id, status, error, attempts):
        yield txn.execute(
            "UPDATE inbound_message SET status = ?, last_error = ?,"
            " attempts = COALESCE(?, attempts + 1), parsed_at = ?, claimed_until = NULL"
            " WHERE id = ?",
            (status, error, attempts, self._now() if status == "parsed" else None, message_id),
        )

    def schedule_retry(self, message_id, error, attempts, delay):
        return self._run(self._schedule_retry, int(message_id), error, attempts, delay)

    @defer.inlineCallbacks
    def _schedule_retry(self, txn, message_id, error, attempts, delay):
        yield txn.execute(
            "UPDATE inbound_message SET last_error = ?, attempts = ?,"
            " next_attempt_at = ?, claimed_until = NULL WHERE id = ?",
            (error, attempts, self._now() + timedelta(seconds=delay), message_id),
        )
