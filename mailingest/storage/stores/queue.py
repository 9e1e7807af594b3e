"""
The extraction queue role: its claims (L{mailingest.storage.stores.claims}),
outcomes, retries, reprocessing and each message's status history.
"""

from datetime import timedelta

from twisted.internet import defer
from zope.interface import implementer

from mailingest.errors import ContentGone, NoSuchMessage
from mailingest.interfaces import IExtractionQueue
from mailingest.storage.group_commit import GroupCommit
from mailingest.storage.stores.base import MESSAGE_SELECT, RECEIVED_CHANNEL, message_row
from mailingest.storage.stores.claims import MessageClaims
from mailingest.storage.stores.quarantine import CONTENT_COLUMNS, VERDICT_COLUMNS

# What extraction records per document, beside the message, ordinal and time.
_EXTRACTED_COLUMNS = (
    "org_id", "filename", "content_type", "size", "sha256", "storage_key",
    "original_filename", "content_type_raw", "disposition", "content_id", "virus", "virus_detail",
)


@implementer(IExtractionQueue)
class ExtractionQueueStore(MessageClaims):
    """An outcome's event is the outbox's (C{_write_event_txn}), written in the outcome's transaction."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parsed = GroupCommit(lambda batch: self._run(self._mark_parsed_batch, batch))

    def on_received(self, callback) -> defer.Deferred:
        """Call C{callback()} when any daemon sharing this database stores a message."""
        return self.engine.listen(RECEIVED_CHANNEL, lambda payload: callback())

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
