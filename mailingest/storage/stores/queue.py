"""
The extraction queue role: claims (with PostgreSQL's session locks),
outcomes, retries, reprocessing and each message's status history.
"""

from datetime import timedelta

from twisted.internet import defer
from zope.interface import implementer

from mailingest.errors import ContentGone, NoSuchMessage
from mailingest.interfaces import IExtractionQueue
from mailingest.storage.group_commit import GroupCommit
from mailingest.storage.stores.base import MESSAGE_SELECT, RECEIVED_CHANNEL, StoreBase, message_row
from mailingest.storage.stores.quarantine import CONTENT_COLUMNS, VERDICT_COLUMNS

# A claimed message comes with its organisation's sender and content policy.
_CLAIM_SELECT = MESSAGE_SELECT.replace(
    " FROM inbound_message",
    ", o.sender_allow_domains, o.sender_require, o.on_virus, o.spam_threshold, o.unscanned AS unscanned_policy FROM inbound_message",
    1,
)
# What extraction records per document, beside the message, ordinal and time.
_EXTRACTED_COLUMNS = (
    "org_id", "filename", "content_type", "size", "sha256", "storage_key",
    "original_filename", "content_type_raw", "disposition", "content_id", "virus", "virus_detail",
)

# The due index: received messages by organisation, then due time.
_DUE_INDEX = "inbound_message_org_due"

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


@implementer(IExtractionQueue)
class ExtractionQueueStore(StoreBase):
    """An outcome's event is the outbox's (C{_write_event_txn}), written in the outcome's transaction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parsed = GroupCommit(lambda batch: self._run(self._mark_parsed_batch, batch))

    def on_received(self, callback) -> defer.Deferred:
        """Call C{callback()} when any daemon sharing this database stores a message."""
        return self.engine.listen(RECEIVED_CHANNEL, lambda payload: callback())

    def claim(self, lease_seconds, limit=1, per_org=None, skip_orgs=()):
        """
        Up to C{limit} due messages claimed for C{lease_seconds}. With
        C{per_org}, at most that many of one organisation, the organisations
        taking turns (each one's first due message, then each one's second...),
        and none of the organisations in C{skip_orgs} (ids, e.g. those whose
        messages the caller already has in hand): one organisation's backlog
        cannot fill the batch while another's message waits.
        """
        return self._claiming(self._claim, lease_seconds, int(limit), per_org, [int(o) for o in skip_orgs]
        )

    async def _claim(self, txn, lease_seconds, limit, per_org=None, skip_orgs=()):
        due = "status = 'received' AND next_attempt_at <= ?"
        if per_org is not None or skip_orgs:
            turns = await self._turns(txn, limit, per_org, skip_orgs)
            if not turns:
                return []
            due += " AND id IN (" + ", ".join(str(int(i)) for i in turns) + ")"
        ids = await self._lease(txn, "inbound_message", due, lease_seconds, limit, session_locks=True)
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        await txn.execute(_CLAIM_SELECT + f" WHERE m.id IN ({marks}) ORDER BY m.id", tuple(ids))
        return [message_row(row) for row in txn.fetchall()]

    async def _turns(self, txn, limit, per_org, skip_orgs):
        """
        The ids of the due, unclaimed messages to claim next, organisations in
        turn (see L{claim}). Its cost is that of the organisations with
        received mail, not of their backlog: the organisations are found by
        skipping through the due index (C{orgs}), and each one's first
        C{per_org} due messages are read from it, the K-th by a probe of its
        own (C{turn} K; neither engine has one spelling of a per-row LIMIT).
        """
        now = self._now()
        free, free_args = self._free(now, True)
        per_org = limit if per_org is None else min(int(per_org), limit)
        skip = ""
        if skip_orgs:
            skip = " AND org_id NOT IN (" + ", ".join("?" for _ in skip_orgs) + ")"
        due_index = "inbound_message m" + self.engine.indexed_by.format(_DUE_INDEX)
        next_org = (
            f"SELECT m.org_id FROM {due_index} WHERE m.status = 'received'{{after}}"
            " ORDER BY m.org_id, m.next_attempt_at, m.id LIMIT 1"
        )
        probe = (
            f"SELECT (SELECT m.id FROM {due_index} WHERE m.status = 'received' AND m.org_id = orgs.org_id"
            f" AND m.next_attempt_at <= ? AND ({free}) ORDER BY m.next_attempt_at, m.id LIMIT 1 OFFSET {{turn}})"
            f" AS id, {{turn}} AS turn FROM orgs WHERE org_id IS NOT NULL{skip}"
        )
        await txn.execute(
            "WITH RECURSIVE orgs(org_id) AS ("
            f" SELECT ({next_org.format(after='')})"
            f" UNION ALL SELECT ({next_org.format(after=' AND m.org_id > orgs.org_id')})"
            " FROM orgs WHERE orgs.org_id IS NOT NULL),"
            " picked AS (" + " UNION ALL ".join(probe.format(turn=turn) for turn in range(per_org)) + ")"
            " SELECT id FROM picked WHERE id IS NOT NULL ORDER BY turn,"
            " (SELECT e.next_attempt_at FROM inbound_message e WHERE e.id = picked.id), id LIMIT ?",
            (*[a for _ in range(per_org) for a in (now, *free_args, *skip_orgs)], limit),
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

    async def _lease(self, txn, table, due, lease_seconds, limit, session_locks=False):
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
        await txn.execute(
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
            await txn.execute(
                f"SELECT pg_try_advisory_lock(?, {_CLAIM_LOCK_KEY}) AS locked FROM {table} WHERE id IN ({marks})",
                (CLAIM_LOCKS, *ids),
            )
        await txn.execute(
            f"UPDATE {table} SET claimed_until = ? WHERE id IN ({marks})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        return ids

    def unlock_claims(self, message_ids):
        if not self.engine.session_locks or not message_ids:
            return defer.succeed(None)
        return self._claiming(self._unlock_claims, [int(i) for i in message_ids])

    async def _unlock_claims(self, txn, message_ids):
        marks = ", ".join("(?)" for _ in message_ids)
        await txn.execute(
            f"SELECT pg_advisory_unlock(?, {_CLAIM_LOCK_KEY}) AS unlocked FROM (VALUES {marks}) AS claimed (id)",
            (CLAIM_LOCKS, *message_ids),
        )

    def renew_claims(self, message_ids, lease_seconds):
        return self._background(self._set_claims, list(message_ids), lease_seconds)

    def release_claims(self, message_ids=None):
        return self._run(self._set_claims, message_ids, None)

    async def _set_claims(self, txn, message_ids, lease_seconds):
        until = None if lease_seconds is None else self._now() + timedelta(seconds=lease_seconds)
        sql = "UPDATE inbound_message SET claimed_until = ? WHERE status = 'received'"
        args = [until]
        if message_ids is not None:
            if not message_ids:
                return
            sql += " AND id IN (" + ", ".join("?" for _ in message_ids) + ")"
            args += [int(i) for i in message_ids]
        await txn.execute(sql, tuple(args))

    def reprocess(self, message_id):
        return self._run(self._reprocess, int(message_id))

    async def _reprocess(self, txn, message_id):
        await txn.execute(
            "UPDATE inbound_message SET status = 'received', attempts = 0,"
            " last_error = NULL, parsed_at = NULL, next_attempt_at = ?, claimed_until = NULL, warnings = NULL"
            " WHERE id = ? AND status <> 'incinerated' AND NOT EXISTS (SELECT 1 FROM document d"
            " WHERE d.inbound_message_id = inbound_message.id AND d.deleted_at IS NOT NULL) RETURNING id",
            (self._now(), message_id),
        )
        if txn.fetchone() is None:
            await txn.execute("SELECT 1 AS found FROM inbound_message WHERE id = ?", (message_id,))
            if txn.fetchone() is None:
                raise NoSuchMessage(f"no message {message_id}")
            # Extracting it again would put back what retention or erasure deleted.
            raise ContentGone(f"message {message_id} has had its content deleted (retention or erasure): nothing to extract")
        await self._record_status_txn(txn, [message_id], "received")
        await txn.execute(MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return message_row(txn.fetchone())

    def reprocess_failed(self, org_slug=None):
        return self._run(self._reprocess_failed, org_slug)

    async def _reprocess_failed(self, txn, org_slug):
        sql = (
            "UPDATE inbound_message SET status = 'received', attempts = 0,"
            " last_error = NULL, next_attempt_at = ?, claimed_until = NULL"
            " WHERE status = 'failed'"
        )
        args = [self._now()]
        if org_slug is not None:
            sql += " AND org_id IN (SELECT id FROM organization WHERE slug = ?)"
            args.append(org_slug.lower())
        await txn.execute(sql + " RETURNING id", tuple(args))
        requeued = [row["id"] for row in txn.fetchall()]
        await self._record_status_txn(txn, requeued, "received")
        return len(requeued)

    def mark_parsed(self, message_id, documents=(), warnings=None, verdicts=None, content=None):
        submitted = (int(message_id), list(documents), warnings, verdicts, content)
        return self._parsed.submit(submitted).addCallback(self._events_written)

    async def _mark_parsed_batch(self, txn, batch):
        wrote = []
        for message_id, documents, warnings, verdicts, content in batch:
            wrote.append((await self._mark_parsed(txn, message_id, documents, warnings, verdicts, content)))
        return wrote

    async def _mark_parsed(self, txn, message_id, documents, warnings, verdicts=None, content=None):
        await self._store_documents_txn(txn, message_id, documents)
        columns = {name: content.get(name) for name in CONTENT_COLUMNS} if content is not None else {}
        return (await self._finish_txn(txn, message_id, "parsed", None, None, verdicts, warnings=warnings or None, **columns))

    async def _store_documents_txn(self, txn, message_id, documents):
        """A message's documents, as its extraction (parsed, or quarantined for its content) found them."""
        # A document of the same (message, ordinal) is the same blob key: it is
        # brought up to this extraction, keeping its id; the ordinals this
        # extraction no longer has are removed (their blobs are swept).
        columns = ", ".join(_EXTRACTED_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _EXTRACTED_COLUMNS)
        for row in documents:
            await txn.execute(
                f"INSERT INTO document (inbound_message_id, ordinal, created_at, {columns})"
                f" VALUES (?, ?, ?, {', '.join('?' for _ in _EXTRACTED_COLUMNS)})"
                f" ON CONFLICT (inbound_message_id, ordinal) DO UPDATE SET {updates}",
                (message_id, row["ordinal"], self._now(), *(row.get(c) for c in _EXTRACTED_COLUMNS)),
            )
        ordinals = [row["ordinal"] for row in documents]
        sql = "DELETE FROM document WHERE inbound_message_id = ?"
        if ordinals:
            sql += " AND ordinal NOT IN (" + ", ".join("?" for _ in ordinals) + ")"
        await txn.execute(sql, (message_id, *ordinals))

    def mark_failed(self, message_id, error, attempts, verdicts=None):
        return self._run(self._mark_failed, int(message_id), error, attempts, verdicts).addCallback(self._events_written)

    async def _mark_failed(self, txn, message_id, error, attempts, verdicts):
        return (await self._finish_txn(txn, message_id, "failed", error, attempts, verdicts))

    async def _finish_txn(self, txn, message_id, status, error, attempts, verdicts=None, **columns):
        """
        The end of an extraction, in one statement: its status, the sender
        checks' columns (L{VERDICT_COLUMNS}; None: nothing to record) and
        C{columns}; then its history row and event.
        """
        if verdicts is not None:
            columns.update((name, verdicts.get(name)) for name in VERDICT_COLUMNS)
        extra = "".join(f", {name} = ?" for name in columns)
        await txn.execute(
            "UPDATE inbound_message SET status = ?, last_error = ?,"
            " attempts = COALESCE(?, attempts + 1), parsed_at = ?, claimed_until = NULL" + extra +
            " WHERE id = ?",
            (status, error, attempts, self._now() if status == "parsed" else None, *columns.values(), message_id),
        )
        await self._record_status_txn(txn, [message_id], status, error)
        return (await self._write_event_txn(txn, message_id, status, error))

    def schedule_retry(self, message_id, error, attempts, delay):
        return self._run(self._schedule_retry, int(message_id), error, attempts, delay)

    async def _schedule_retry(self, txn, message_id, error, attempts, delay):
        await txn.execute(
            "UPDATE inbound_message SET last_error = ?, attempts = ?,"
            " next_attempt_at = ?, claimed_until = NULL WHERE id = ?",
            (error, attempts, self._now() + timedelta(seconds=delay), message_id),
        )
        await self._record_status_txn(txn, [message_id], "retrying", error)

    def status_history(self, message_id):
        """A message's status changes, oldest first: (status, error, at)."""
        return self._run(self._status_history, int(message_id))

    async def _status_history(self, txn, message_id):
        await txn.execute(
            "SELECT status, error, at FROM message_status_history WHERE inbound_message_id = ? ORDER BY id",
            (message_id,),
        )
        return txn.fetchall()
