"""
The one store API over SQLite and PostgreSQL.

Every query is written once here; the engine (L{mailingest.storage.engines})
supplies the connection pool, the placeholder style and the few clauses the two
databases spell differently.
"""

import importlib.resources
import re
import uuid
from datetime import datetime, timedelta, timezone

from twisted.internet import defer
from zope.interface import implementer

from mailingest.errors import NoSuchEvent, NoSuchMessage, NoSuchOrg, NotQuarantined, OrgExists
from mailingest.storage.engines import Engine, create_engine
from mailingest.storage.group_commit import GroupCommit
from mailingest.interfaces import Collision, Duplicate, IStore

MESSAGE_COLUMNS = (
    "id, org_id, source, source_message_id, mail_from, rcpt_to, subject, raw_key,"
    " raw_size, raw_sha256, status, attempts, last_error, received_at, parsed_at,"
    " content_sha256, message_id_collision"
    ", client_ip, helo, tls, spf, spf_domain, dkim, dkim_domain, dmarc, dmarc_domain,"
    " dmarc_policy, arc, arc_domain, authentication_results, quarantine_reason, released_at"
    ", warnings"
)
_MESSAGE_SELECT = (
    "SELECT "
    + ", ".join("m." + c.strip() for c in MESSAGE_COLUMNS.split(","))
    + ", o.slug AS org_slug FROM inbound_message m JOIN organization o ON o.id = m.org_id"
)
DOCUMENT_COLUMNS = (
    "id, org_id, inbound_message_id, filename, content_type, size, sha256,"
    " storage_key, created_at"
    ", original_filename, content_type_raw, disposition, content_id"
)
# What extraction records per document, beside the message, ordinal and time.
_EXTRACTED_COLUMNS = (
    "org_id", "filename", "content_type", "size", "sha256", "storage_key",
    "original_filename", "content_type_raw", "disposition", "content_id",
)
_DOCUMENT_SELECT = (
    "SELECT "
    + ", ".join("d." + c.strip() for c in DOCUMENT_COLUMNS.split(","))
    + ", o.slug AS org_slug FROM document d JOIN organization o ON o.id = d.org_id"
)
_ORG_SELECT = "SELECT id, slug, name, active, created_at FROM organization"
# A claimed message comes with its organisation's sender policy.
_CLAIM_SELECT = _MESSAGE_SELECT.replace(
    " FROM inbound_message", ", o.sender_allow_domains, o.sender_require FROM inbound_message", 1
)
# What the sender checks give (L{mailingest.verification.results.verdict_columns}).
VERDICT_COLUMNS = (
    "spf", "spf_domain", "dkim", "dkim_domain", "dmarc", "dmarc_domain", "dmarc_policy",
    "arc", "arc_domain", "authentication_results",
)


# Blob keys looked up per statement (twice: messages and documents), well
# under SQLite's and PostgreSQL's limits on bound parameters.
KEY_BATCH = 500

# Other daemons sharing the database are told of new messages on this channel.
RECEIVED_CHANNEL = "mailingest_received"
# ... and of new webhook events on this one.
EVENTS_CHANNEL = "mailingest_events"

# The message statuses that raise a webhook event, and the event's type.
EVENT_TYPES = {
    "parsed": "message.parsed",
    "failed": "message.failed",
    "quarantined": "message.quarantined",
}
EVENT_STATUSES = ("pending", "delivered", "dead")
MESSAGE_STATUSES = ("received", "parsed", "failed", "quarantined")
EVENT_COLUMNS = (
    "id, event_id, event_type, org_id, inbound_message_id, message_status, message_error,"
    " status, attempts, last_status, last_error, created_at, retry_from, next_attempt_at, delivered_at"
)
_EVENT_SELECT = (
    "SELECT "
    + ", ".join("e." + c.strip() for c in EVENT_COLUMNS.split(","))
    + ", o.slug AS org_slug FROM webhook_event e JOIN organization o ON o.id = e.org_id"
)


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


def _conditions(**equal) -> tuple[str, tuple]:
    """A WHERE clause (or nothing) of C{column = ?} for each column given a value other than None."""
    given = {column: value for column, value in equal.items() if value is not None}
    return (" WHERE " + " AND ".join(f"{column} = ?" for column in given) if given else ""), tuple(given.values())


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
        self._event_listeners = []

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
            " message_id_collision, status, attempts, received_at, next_attempt_at,"
            " client_ip, helo, tls)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', 0, ?, ?, ?, ?, ?)"
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
                row.get("client_ip"),
                row.get("helo"),
                row.get("tls"),
            ),
        )
        inserted = txn.fetchone()
        if inserted is not None:
            yield self._record_status(txn, [inserted["id"]], "received")
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

    def count_messages(self, status=None, org_id=None):
        return self._background(self._count_messages, status, org_id)

    @defer.inlineCallbacks
    def _count_messages(self, txn, status, org_id):
        where, args = _conditions(status=status, org_id=org_id)
        yield txn.execute("SELECT COUNT(*) AS n FROM inbound_message" + where, args)
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
            " last_error = NULL, parsed_at = NULL, next_attempt_at = ?, claimed_until = NULL, warnings = NULL"
            " WHERE id = ? RETURNING id",
            (self._now(), message_id),
        )
        if txn.fetchone() is None:
            raise NoSuchMessage(f"no message {message_id}")
        yield self._record_status(txn, [message_id], "received")
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
        requeued = [row["id"] for row in txn.fetchall()]
        yield self._record_status(txn, requeued, "received")
        return len(requeued)

    def claim(self, lease_seconds, limit=1, per_org=None, skip_orgs=()):
        """
        Up to C{limit} due messages claimed for C{lease_seconds}. With
        C{per_org}, at most that many of one organisation, the organisations
        taking turns (each one's first due message, then each one's second...),
        and none of the organisations in C{skip_orgs} (ids, e.g. those whose
        messages the caller already has in hand): one organisation's backlog
        cannot fill the batch while another's message waits.
        """
        return self.engine.claiming(
            _storable_interaction, self._claim, lease_seconds, int(limit), per_org, [int(o) for o in skip_orgs]
        )

    @defer.inlineCallbacks
    def _claim(self, txn, lease_seconds, limit, per_org=None, skip_orgs=()):
        due = "status = 'received' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
        if per_org is not None or skip_orgs:
            turns = yield self._turns(txn, due, limit, per_org, skip_orgs)
            if not turns:
                return []
            due += " AND id IN (" + ", ".join(str(int(i)) for i in turns) + ")"
        ids = yield self._lease(txn, "inbound_message", due, lease_seconds, limit, session_locks=True)
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        yield txn.execute(_CLAIM_SELECT + f" WHERE m.id IN ({marks}) ORDER BY m.id", tuple(ids))
        return [_message(row) for row in txn.fetchall()]

    @defer.inlineCallbacks
    def _turns(self, txn, due, limit, per_org, skip_orgs):
        """The ids of the due, unclaimed messages to claim next, organisations in turn (see L{claim})."""
        now = self._now()
        free, args = self._free(now, True)
        skip = ""
        if skip_orgs:
            skip = " AND org_id NOT IN (" + ", ".join("?" for _ in skip_orgs) + ")"
        yield txn.execute(
            "SELECT id FROM (SELECT id, next_attempt_at,"
            " ROW_NUMBER() OVER (PARTITION BY org_id ORDER BY next_attempt_at, id) AS turn"
            f" FROM inbound_message e WHERE {due} AND ({free}){skip}) turns"
            " WHERE turn <= ? ORDER BY turn, next_attempt_at, id LIMIT ?",
            (now, *args, *skip_orgs, limit if per_org is None else per_org, limit),
        )
        return [row["id"] for row in txn.fetchall()]

    def _free(self, now, session_locks):
        """The condition (and its arguments) of a row no live claim holds."""
        free = "claimed_until IS NULL OR claimed_until < ?"
        args = [now]
        if session_locks and self.engine.session_locks:
            free += f" OR {_CLAIM_LOCK_KEY} NOT IN ({_HELD_CLAIM_LOCKS})"
            args.append(CLAIM_LOCKS)
        return free, args

    @defer.inlineCallbacks
    def _lease(self, txn, table, due, lease_seconds, limit, session_locks=False):
        """
        The ids of up to C{limit} rows of C{table} that are C{due} (a
        condition on the current time, one C{?}) and unclaimed, now claimed
        for C{lease_seconds}; rows another daemon is claiming are skipped.
        With C{session_locks} (message claims, on an engine that has them)
        each claim is also a session-level lock on the claiming connection,
        and a live lease whose lock no session holds is a dead daemon's.
        """
        now = self._now()
        free, args = self._free(now, session_locks)
        args = [now, *args]
        locks = session_locks and self.engine.session_locks
        yield txn.execute(
            f"SELECT id FROM {table} e WHERE {due} AND ({free})"
            " ORDER BY next_attempt_at, id LIMIT ?" + self.engine.skip_locked,
            (*args, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if not ids:
            return ids
        marks = ", ".join("?" for _ in ids)
        if locks:
            # Held until the outcome is recorded (unlock_claims). A lock another
            # session still holds means that daemon recorded the outcome and has
            # not let go yet, or its lease ran out: the lease decides, as before.
            yield txn.execute(
                f"SELECT pg_try_advisory_lock(?, {_CLAIM_LOCK_KEY}) AS locked FROM {table} WHERE id IN ({marks})",
                (CLAIM_LOCKS, *ids),
            )
        yield txn.execute(
            f"UPDATE {table} SET claimed_until = ? WHERE id IN ({marks})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        return ids

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

    def mark_parsed(self, message_id, documents=(), warnings=None, verdicts=None):
        return self._parsed.submit((int(message_id), list(documents), warnings, verdicts)).addCallback(self._events_written)

    @defer.inlineCallbacks
    def _mark_parsed_batch(self, txn, batch):
        wrote = []
        for message_id, documents, warnings, verdicts in batch:
            wrote.append((yield self._mark_parsed(txn, message_id, documents, warnings, verdicts)))
        return wrote

    @defer.inlineCallbacks
    def _mark_parsed(self, txn, message_id, documents, warnings, verdicts=None):
        # A document of the same (message, ordinal) is the same blob key: it is
        # brought up to this extraction, keeping its id; the ordinals this
        # extraction no longer has are removed (their blobs are swept).
        columns = ", ".join(_EXTRACTED_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _EXTRACTED_COLUMNS)
        for row in documents:
            yield txn.execute(
                f"INSERT INTO document (inbound_message_id, ordinal, created_at, {columns})"
                f" VALUES (?, ?, ?, {', '.join('?' for _ in _EXTRACTED_COLUMNS)})"
                f" ON CONFLICT (inbound_message_id, ordinal) DO UPDATE SET {updates}",
                (message_id, row["ordinal"], self._now(), *(row.get(c) for c in _EXTRACTED_COLUMNS)),
            )
        ordinals = [row["ordinal"] for row in documents]
        sql = "DELETE FROM document WHERE inbound_message_id = ?"
        if ordinals:
            sql += " AND ordinal NOT IN (" + ", ".join("?" for _ in ordinals) + ")"
        yield txn.execute(sql, (message_id, *ordinals))
        return (yield self._finish(txn, message_id, "parsed", None, None, verdicts, warnings=warnings or None))

    def mark_failed(self, message_id, error, attempts, verdicts=None):
        return self._run(self._mark_failed, int(message_id), error, attempts, verdicts).addCallback(self._events_written)

    @defer.inlineCallbacks
    def _mark_failed(self, txn, message_id, error, attempts, verdicts):
        return (yield self._finish(txn, message_id, "failed", error, attempts, verdicts))

    @defer.inlineCallbacks
    def _finish(self, txn, message_id, status, error, attempts, verdicts=None, **columns):
        """
        The end of an extraction, in one statement: its status, the sender
        checks' columns (L{VERDICT_COLUMNS}; None: nothing to record) and
        C{columns}; then its history row and event.
        """
        if verdicts is not None:
            columns.update((name, verdicts.get(name)) for name in VERDICT_COLUMNS)
        extra = "".join(f", {name} = ?" for name in columns)
        yield txn.execute(
            "UPDATE inbound_message SET status = ?, last_error = ?,"
            " attempts = COALESCE(?, attempts + 1), parsed_at = ?, claimed_until = NULL" + extra +
            " WHERE id = ?",
            (status, error, attempts, self._now() if status == "parsed" else None, *columns.values(), message_id),
        )
        yield self._record_status(txn, [message_id], status, error)
        return (yield self._write_event(txn, message_id, status, error))

    def schedule_retry(self, message_id, error, attempts, delay):
        return self._run(self._schedule_retry, int(message_id), error, attempts, delay)

    @defer.inlineCallbacks
    def _schedule_retry(self, txn, message_id, error, attempts, delay):
        yield txn.execute(
            "UPDATE inbound_message SET last_error = ?, attempts = ?,"
            " next_attempt_at = ?, claimed_until = NULL WHERE id = ?",
            (error, attempts, self._now() + timedelta(seconds=delay), message_id),
        )
        yield self._record_status(txn, [message_id], "retrying", error)

    @defer.inlineCallbacks
    def _record_status(self, txn, message_ids, status, error=None):
        """A history row per message whose status changed, in the transaction of the change."""
        now = self._now()
        for message_id in message_ids:
            yield txn.execute(
                "INSERT INTO message_status_history (inbound_message_id, status, error, at) VALUES (?, ?, ?, ?)",
                (message_id, status, error, now),
            )

    def status_history(self, message_id):
        """A message's status changes, oldest first: (status, error, at)."""
        return self._run(self._status_history, int(message_id))

    @defer.inlineCallbacks
    def _status_history(self, txn, message_id):
        yield txn.execute(
            "SELECT status, error, at FROM message_status_history WHERE inbound_message_id = ? ORDER BY id",
            (message_id,),
        )
        return txn.fetchall()

    # sender verdicts, policy and quarantine (issue 15)

    @defer.inlineCallbacks
    def _record_verdicts(self, txn, message_id, verdicts):
        """Store the sender checks' columns (L{VERDICT_COLUMNS}); None: nothing to record."""
        if verdicts is None:
            return
        assignments = ", ".join(f"{name} = ?" for name in VERDICT_COLUMNS)
        yield txn.execute(
            f"UPDATE inbound_message SET {assignments} WHERE id = ?",
            (*(verdicts.get(name) for name in VERDICT_COLUMNS), message_id),
        )

    def mark_quarantined(self, message_id, reason, verdicts=None):
        return self._run(self._mark_quarantined, int(message_id), reason, verdicts).addCallback(self._events_written)

    @defer.inlineCallbacks
    def _mark_quarantined(self, txn, message_id, reason, verdicts):
        """
        The one status change to C{quarantined}: what else must happen with
        it (an event for the application, say) belongs in this transaction.
        """
        yield self._record_verdicts(txn, message_id, verdicts)
        yield txn.execute(
            "UPDATE inbound_message SET status = 'quarantined', quarantine_reason = ?,"
            " last_error = NULL, attempts = attempts + 1, claimed_until = NULL WHERE id = ?",
            (reason, message_id),
        )
        yield self._record_status(txn, [message_id], "quarantined", reason)
        return (yield self._write_event(txn, message_id, "quarantined", reason))

    def release(self, message_id):
        return self._run(self._release, int(message_id))

    @defer.inlineCallbacks
    def _release(self, txn, message_id):
        """Queue a quarantined message for extraction, past its policy (its verdicts are kept)."""
        now = self._now()
        yield txn.execute(
            "UPDATE inbound_message SET status = 'received', released_at = ?, attempts = 0,"
            " next_attempt_at = ?, claimed_until = NULL WHERE id = ? AND status = 'quarantined' RETURNING id",
            (now, now, message_id),
        )
        if txn.fetchone() is None:
            yield txn.execute("SELECT status FROM inbound_message WHERE id = ?", (message_id,))
            row = txn.fetchone()
            if row is None:
                raise NoSuchMessage(f"no message {message_id}")
            raise NotQuarantined(f"message {message_id} is {row['status']}, not quarantined")
        yield self._record_status(txn, [message_id], "received")
        yield txn.execute(_MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return _message(txn.fetchone())

    def set_sender_policy(self, slug, allow_domains=None, require=None):
        return self._run(self._set_sender_policy, slug.lower(), allow_domains, require)

    @defer.inlineCallbacks
    def _set_sender_policy(self, txn, slug, allow_domains, require):
        """Change what is given (None: keep); the organisation with its policy."""
        if allow_domains is not None:
            yield txn.execute(
                "UPDATE organization SET sender_allow_domains = ? WHERE slug = ?",
                (" ".join(allow_domains), slug),
            )
        if require is not None:
            yield txn.execute("UPDATE organization SET sender_require = ? WHERE slug = ?", (require, slug))
        yield txn.execute(
            "SELECT id, slug, name, active, created_at, sender_allow_domains, sender_require"
            " FROM organization WHERE slug = ?",
            (slug,),
        )
        row = txn.fetchone()
        if row is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return _org(row)

    # the webhook outbox

    def on_event(self, callback) -> defer.Deferred:
        """Call C{callback()} when this store, or any daemon sharing the database, may have written an event."""
        self._event_listeners.append(callback)
        return self.engine.listen(EVENTS_CHANNEL, lambda payload: callback())

    def _events_written(self, wrote: bool) -> None:
        """After a status change: wake the webhook senders if it wrote an event (most organisations have no webhook)."""
        if wrote:
            for callback in self._event_listeners:
                callback()

    @defer.inlineCallbacks
    def _write_event(self, txn, message_id, status, error):
        """The event of a status change, in its transaction: only for organisations with a webhook. Whether it wrote one."""
        if status not in EVENT_TYPES:
            return False
        now = self._now()
        yield txn.execute(
            "INSERT INTO webhook_event (event_id, event_type, org_id, inbound_message_id,"
            " message_status, message_error, status, attempts, created_at, retry_from, next_attempt_at)"
            " SELECT ?, ?, m.org_id, m.id, ?, ?, 'pending', 0, ?, ?, ?"
            " FROM inbound_message m JOIN org_webhook w ON w.org_id = m.org_id WHERE m.id = ?"
            " RETURNING id",
            ("evt_" + uuid.uuid4().hex, EVENT_TYPES[status], status, error, now, now, now, message_id),
        )
        if not txn.fetchall():
            return False
        yield self.engine.notify(txn, EVENTS_CHANNEL)
        return True

    def set_webhook(self, slug, url, secret):
        return self._run(self._set_webhook, slug.lower(), url, secret)

    @defer.inlineCallbacks
    def _set_webhook(self, txn, slug, url, secret):
        org = yield self._require_org(txn, slug)
        yield txn.execute(
            "INSERT INTO org_webhook (org_id, url, secret, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (org_id) DO UPDATE SET url = excluded.url, secret = excluded.secret,"
            " failures = 0, paused_until = NULL",
            (org["id"], url, secret, self._now()),
        )

    def remove_webhook(self, slug):
        return self._run(self._remove_webhook, slug.lower())

    @defer.inlineCallbacks
    def _remove_webhook(self, txn, slug):
        org = yield self._require_org(txn, slug)
        yield txn.execute("DELETE FROM org_webhook WHERE org_id = ? RETURNING org_id", (org["id"],))
        return bool(txn.fetchall())

    def get_webhook(self, slug):
        return self._run(self._get_webhook, slug.lower())

    @defer.inlineCallbacks
    def _get_webhook(self, txn, slug):
        yield txn.execute(
            "SELECT w.url, w.secret, w.created_at FROM org_webhook w JOIN organization o ON o.id = w.org_id"
            " WHERE o.slug = ?",
            (slug,),
        )
        return txn.fetchone()

    @defer.inlineCallbacks
    def _require_org(self, txn, slug):
        yield txn.execute(_ORG_SELECT + " WHERE slug = ?", (slug,))
        org = txn.fetchone()
        if org is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return org

    def claim_events(self, lease_seconds, limit=8, per_org=4):
        """
        Due events, each with its webhook, message and documents, claimed for
        C{lease_seconds}. An event waits while an earlier event of its message
        is pending: events reach the application in order per message. At most
        C{per_org} events of an organisation are claimed at a time (counting
        those still claimed), taken in turns across organisations, and none
        while its receiver is paused (L{pause_receiver}): one organisation's
        backlog or dead receiver cannot take every attempt.
        """
        return self._background(self._claim_events, lease_seconds, int(limit), int(per_org))

    @defer.inlineCallbacks
    def _claim_events(self, txn, lease_seconds, limit, per_org):
        now = self._now()
        # Each organisation's due events numbered by turn; the locking SELECT
        # around it (row locks cannot go with a window function) checks the
        # claim again, for a row another daemon claimed meanwhile.
        yield txn.execute(
            "SELECT id FROM webhook_event WHERE (claimed_until IS NULL OR claimed_until < ?) AND id IN ("
            " SELECT id FROM ("
            "  SELECT e.id, e.org_id, e.next_attempt_at,"
            "   ROW_NUMBER() OVER (PARTITION BY e.org_id ORDER BY e.next_attempt_at, e.id) AS turn"
            "  FROM webhook_event e LEFT JOIN org_webhook w ON w.org_id = e.org_id"
            "  WHERE e.status = 'pending' AND e.next_attempt_at <= ? AND (e.claimed_until IS NULL OR e.claimed_until < ?)"
            "  AND (w.paused_until IS NULL OR w.paused_until <= ?)"
            "  AND NOT EXISTS (SELECT 1 FROM webhook_event p WHERE p.inbound_message_id = e.inbound_message_id"
            "  AND p.status = 'pending' AND p.id < e.id)"
            " ) due WHERE turn <= ? - (SELECT COUNT(*) FROM webhook_event c WHERE c.org_id = due.org_id"
            "  AND c.status = 'pending' AND c.claimed_until >= ?)"
            " ORDER BY turn, next_attempt_at, id LIMIT ?"
            ")" + self.engine.skip_locked,
            (now, now, now, now, per_org, now, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        yield txn.execute(
            f"UPDATE webhook_event SET claimed_until = ? WHERE id IN ({marks})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        yield txn.execute(
            "SELECT e.id, e.event_id, e.event_type, e.message_status, e.message_error, e.attempts,"
            " e.retry_from, e.org_id, o.slug AS org_slug, w.url, w.secret,"
            " m.id AS message_id, m.source_message_id, m.mail_from, m.rcpt_to, m.subject, m.received_at"
            " FROM webhook_event e JOIN organization o ON o.id = e.org_id"
            " JOIN inbound_message m ON m.id = e.inbound_message_id"
            " LEFT JOIN org_webhook w ON w.org_id = e.org_id"
            f" WHERE e.id IN ({marks}) ORDER BY e.id",
            tuple(ids),
        )
        events = txn.fetchall()
        for event in events:
            yield txn.execute(
                "SELECT id, filename, content_type, size, sha256 FROM document"
                " WHERE inbound_message_id = ? ORDER BY ordinal",
                (event["message_id"],),
            )
            event["documents"] = txn.fetchall()
        return events

    def event_delivered(self, event_id, http_status):
        return self._run(self._event_delivered, int(event_id), http_status)

    @defer.inlineCallbacks
    def _event_delivered(self, txn, event_id, http_status):
        yield txn.execute(
            "UPDATE webhook_event SET status = 'delivered', attempts = attempts + 1, last_status = ?,"
            " last_error = NULL, delivered_at = ?, claimed_until = NULL WHERE id = ? RETURNING org_id",
            (http_status, self._now(), event_id),
        )
        delivered = txn.fetchone()
        if delivered is not None:
            # The receiver answers again: it starts afresh (a write only when it had failed).
            yield txn.execute(
                "UPDATE org_webhook SET failures = 0, paused_until = NULL WHERE org_id = ? AND failures > 0",
                (delivered["org_id"],),
            )

    def event_failed(self, event_id, http_status, error, delay):
        """
        One failed attempt: retried after C{delay} seconds, or C{dead} when
        C{delay} is None. Fires with the failures in a row of the event's
        receiver, this one counted, or None when it is not counted: the
        receiver was paused (the attempt began before the pause) or is gone.
        """
        return self._run(self._event_failed, int(event_id), http_status, error, delay)

    @defer.inlineCallbacks
    def _event_failed(self, txn, event_id, http_status, error, delay):
        now = self._now()
        yield txn.execute(
            "UPDATE webhook_event SET status = ?, attempts = attempts + 1, last_status = ?,"
            " last_error = ?, next_attempt_at = ?, claimed_until = NULL WHERE id = ? RETURNING org_id",
            (
                "dead" if delay is None else "pending",
                http_status,
                error,
                now if delay is None else now + timedelta(seconds=delay),
                event_id,
            ),
        )
        failed = txn.fetchone()
        if failed is None:
            return None
        yield txn.execute(
            "UPDATE org_webhook SET failures = failures + 1"
            " WHERE org_id = ? AND (paused_until IS NULL OR paused_until <= ?) RETURNING failures",
            (failed["org_id"], now),
        )
        counted = txn.fetchone()
        return None if counted is None else counted["failures"]

    def pause_receiver(self, org_id, seconds):
        """Try none of the organisation's events for C{seconds}: its receiver keeps failing."""
        return self._run(self._pause_receiver, int(org_id), float(seconds))

    @defer.inlineCallbacks
    def _pause_receiver(self, txn, org_id, seconds):
        yield txn.execute(
            "UPDATE org_webhook SET paused_until = ? WHERE org_id = ?",
            (self._now() + timedelta(seconds=seconds), org_id),
        )

    def count_paused_receivers(self):
        return self._background(self._count_paused_receivers)

    @defer.inlineCallbacks
    def _count_paused_receivers(self, txn):
        yield txn.execute("SELECT COUNT(*) AS n FROM org_webhook WHERE paused_until > ?", (self._now(),))
        return txn.fetchone()["n"]

    def release_event_claims(self, event_ids=None):
        """Give up claims: these events', or (None) every event's."""
        return self._run(self._release_event_claims, None if event_ids is None else [int(i) for i in event_ids])

    @defer.inlineCallbacks
    def _release_event_claims(self, txn, event_ids):
        sql, args = "UPDATE webhook_event SET claimed_until = NULL WHERE status = 'pending'", ()
        if event_ids is not None:
            if not event_ids:
                return
            sql += " AND id IN (" + ", ".join("?" for _ in event_ids) + ")"
            args = tuple(event_ids)
        yield txn.execute(sql, args)

    def list_events(self, org_slug=None, status=None, limit=50):
        return self._run(self._list_events, org_slug, status, limit)

    @defer.inlineCallbacks
    def _list_events(self, txn, org_slug, status, limit):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if status is not None:
            where.append("e.status = ?")
            args.append(status)
        sql = _EVENT_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id DESC LIMIT ?"
        yield txn.execute(sql, (*args, int(limit)))
        return txn.fetchall()

    def redeliver(self, event_id):
        """Send an event again, now, with a fresh retry horizon (a dead one, or a delivered one the application lost)."""
        return self._run(self._redeliver, int(event_id))

    @defer.inlineCallbacks
    def _redeliver(self, txn, event_id):
        now = self._now()
        yield txn.execute(
            "UPDATE webhook_event SET status = 'pending', attempts = 0, retry_from = ?, next_attempt_at = ?,"
            " claimed_until = NULL, delivered_at = NULL WHERE id = ? RETURNING id",
            (now, now, event_id),
        )
        if txn.fetchone() is None:
            raise NoSuchEvent(f"no event {event_id}")
        yield self.engine.notify(txn, EVENTS_CHANNEL)
        yield txn.execute(_EVENT_SELECT + " WHERE e.id = ?", (event_id,))
        return txn.fetchone()

    def count_events(self, status="pending", org_id=None):
        return self._background(self._count_events, status, org_id)

    @defer.inlineCallbacks
    def _count_events(self, txn, status, org_id):
        where, args = _conditions(status=status, org_id=org_id)
        yield txn.execute("SELECT COUNT(*) AS n FROM webhook_event" + where, args)
        return txn.fetchone()["n"]

    # API tokens and the API's reads

    def add_token(self, slug, sha256):
        return self._run(self._add_token, slug.lower(), sha256)

    @defer.inlineCallbacks
    def _add_token(self, txn, slug, sha256):
        org = yield self._require_org(txn, slug)
        yield txn.execute(
            "INSERT INTO api_token (org_id, sha256, created_at) VALUES (?, ?, ?) RETURNING id",
            (org["id"], sha256, self._now()),
        )
        return txn.fetchone()["id"]

    def revoke_tokens(self, slug):
        return self._run(self._revoke_tokens, slug.lower())

    @defer.inlineCallbacks
    def _revoke_tokens(self, txn, slug):
        org = yield self._require_org(txn, slug)
        yield txn.execute(
            "UPDATE api_token SET revoked_at = ? WHERE org_id = ? AND revoked_at IS NULL RETURNING id",
            (self._now(), org["id"]),
        )
        return len(txn.fetchall())

    def token_org(self, sha256):
        """The organisation (id, slug) of a live token by its hash, or None."""
        return self._run(self._token_org, sha256)

    @defer.inlineCallbacks
    def _token_org(self, txn, sha256):
        yield txn.execute(
            "SELECT o.id, o.slug FROM api_token t JOIN organization o ON o.id = t.org_id"
            " WHERE t.sha256 = ? AND t.revoked_at IS NULL",
            (sha256,),
        )
        return txn.fetchone()

    def page_messages(self, org_id=None, status=None, since=None, before_id=None, limit=50):
        """Newest first by id, for cursor pagination: the messages with ids below C{before_id}."""
        return self._run(self._page_messages, org_id, status, since, before_id, int(limit))

    @defer.inlineCallbacks
    def _page_messages(self, txn, org_id, status, since, before_id, limit):
        where, args = [], []
        for clause, value in (("m.org_id = ?", org_id), ("m.status = ?", status), ("m.received_at >= ?", since), ("m.id < ?", before_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = _MESSAGE_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY m.id DESC LIMIT ?"
        yield txn.execute(sql, (*args, limit))
        return [_message(row) for row in txn.fetchall()]

    # the console's reads

    def org_summaries(self, since, org_id=None):
        """Each organisation (or the one C{org_id}) with its messages by status since C{since} and its last message time."""
        return self._run(self._org_summaries, since, org_id)

    @defer.inlineCallbacks
    def _org_summaries(self, txn, since, org_id):
        sql, args = _ORG_SELECT, ()
        if org_id is not None:
            sql, args = sql + " WHERE id = ?", (org_id,)
        yield txn.execute(sql + " ORDER BY slug", args)
        orgs = [_org(row) for row in txn.fetchall()]
        for org in orgs:
            # Per organisation, so each count walks the (org_id, received_at) index.
            yield txn.execute(
                "SELECT status, COUNT(*) AS n FROM inbound_message WHERE org_id = ? AND received_at >= ? GROUP BY status",
                (org["id"], since),
            )
            org["counts"] = {row["status"]: row["n"] for row in txn.fetchall()}
            yield txn.execute("SELECT MAX(received_at) AS last FROM inbound_message WHERE org_id = ?", (org["id"],))
            org["last_received_at"] = txn.fetchone()["last"]
        return orgs

    def search_messages(self, org_id, status=None, since=None, until=None, sender=None, text=None, before_id=None, limit=50):
        """
        One page of an organisation's messages, newest first by id (C{before_id}
        is the cursor), each with its number of documents. C{text} matches
        subject, sender or Message-ID anywhere, case-insensitively.
        """
        return self._run(self._search_messages, org_id, status, since, until, sender, text, before_id, int(limit))

    @defer.inlineCallbacks
    def _search_messages(self, txn, org_id, status, since, until, sender, text, before_id, limit):
        where, args = ["m.org_id = ?"], [org_id]
        for clause, value in (
            ("m.status = ?", status),
            ("m.received_at >= ?", since),
            ("m.received_at < ?", until),
            ("LOWER(m.mail_from) = ?", sender.lower() if sender else None),
            ("m.id < ?", before_id),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        if text:
            pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(
                "(LOWER(m.subject) LIKE ? ESCAPE '\\' OR LOWER(m.mail_from) LIKE ? ESCAPE '\\'"
                " OR LOWER(m.source_message_id) LIKE ? ESCAPE '\\')"
            )
            args += [pattern] * 3
        yield txn.execute(
            "SELECT m.id, m.status, m.mail_from, m.subject, m.source_message_id, m.received_at,"
            " (SELECT COUNT(*) FROM document d WHERE d.inbound_message_id = m.id) AS documents"
            " FROM inbound_message m WHERE " + " AND ".join(where) + " ORDER BY m.id DESC LIMIT ?",
            (*args, limit),
        )
        return txn.fetchall()

    def message_events(self, message_id):
        """A message's webhook events, oldest first, with their attempts."""
        return self._run(self._message_events, int(message_id))

    @defer.inlineCallbacks
    def _message_events(self, txn, message_id):
        yield txn.execute(_EVENT_SELECT + " WHERE e.inbound_message_id = ? ORDER BY e.id", (message_id,))
        return txn.fetchall()

    def get_event(self, event_id):
        return self._run(self._get_event, int(event_id))

    @defer.inlineCallbacks
    def _get_event(self, txn, event_id):
        yield txn.execute(_EVENT_SELECT + " WHERE e.id = ?", (event_id,))
        return txn.fetchone()
