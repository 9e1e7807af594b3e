"""
The retention role: each organisation's retention periods, incineration
(the tombstone of a message whose raw copy is deleted), documents deleted
when their period passes, erasure on request, and the queue of blobs to
delete that makes all of them crash-safe.

Every delete is two steps. The transaction that marks the rows (status
C{incinerated}, or a document's C{deleted_at}) checks the legal holds, writes
the audit row, the status history and the webhook event, and queues the
blob keys in C{blob_purge}; only after it commits are the blobs deleted
(L{mailingest.storage.retention.purge}), and each key leaves the queue once
its blob is gone. A daemon killed in between leaves rows that already say
what they are and keys still queued: the next pass deletes them. A row never
points at a deleted blob as if it were there. A raw copy shared by the
messages of several organisations is queued only once no live row refers
to it (the blob sweeper, which counts only live rows, agrees).
"""

import hashlib
from datetime import timedelta

from zope.interface import implementer

from mailingest.errors import MessageHeld, NoSuchMessage, NoSuchOrg, NotErasable
from mailingest.interfaces import IRetentionStore
from mailingest.storage.stores.base import MESSAGE_SELECT, StoreBase, marks, message_row

UNCHANGED = ...
# The messages an erasure by sender left (held, still being processed) it names at most.
REFUSALS_SHOWN = 100
# A message retention may incinerate, and erasure may erase: what an operator has acted on.
_ERASABLE = ("parsed", "failed", "quarantined", "incinerated")
# What erasure replaces in the row (None, or a fixed value): personal data the console and API would show.
_ERASED_MESSAGE = (
    "mail_from = '', subject = NULL, client_ip = NULL, helo = NULL, spf_domain = NULL, dkim_domain = NULL,"
    " dmarc_domain = NULL, arc_domain = NULL, authentication_results = NULL, quarantine_reason = NULL,"
    " last_error = NULL, warnings = NULL"
)
_ERASED_DOCUMENT = "filename = 'erased', original_filename = NULL, content_type_raw = NULL, content_id = NULL"


def held(alias: str) -> str:
    """The condition that a live legal hold covers the message row C{alias}."""
    return (
        "EXISTS (SELECT 1 FROM legal_hold h WHERE h.org_id = {a}.org_id AND h.removed_at IS NULL"
        " AND (h.scope = 'organization' OR h.inbound_message_id = {a}.id OR h.sender = LOWER({a}.mail_from)))"
    ).format(a=alias)


def erased_message_id(source_message_id: str) -> str:
    """What an erased row keeps of the Message-ID: its digest, which still keeps the row's key unique."""
    return "erased:" + hashlib.sha256(source_message_id.encode("utf-8", "surrogatepass")).hexdigest()


@implementer(IRetentionStore)
class RetentionStore(StoreBase):
    def set_retention(self, slug, raw=UNCHANGED, documents=UNCHANGED):
        return self._run(self._set_retention, slug.lower(), raw, documents)

    async def _set_retention(self, txn, slug, raw, documents):
        for column, value in (("retention_raw_seconds", raw), ("retention_documents_seconds", documents)):
            if value is not UNCHANGED:
                await txn.execute(f"UPDATE organization SET {column} = ? WHERE slug = ?", (value, slug))
        await txn.execute(
            "SELECT id, slug, retention_raw_seconds, retention_documents_seconds FROM organization WHERE slug = ?",
            (slug,),
        )
        row = txn.fetchone()
        if row is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return row

    async def _periods_txn(self, txn, column, limit):
        """
        Each organisation with a period in C{column}: (id, cutoff, share), its
        share of a batch of C{limit} rows, so one organisation's backlog
        cannot fill every batch of a pass while another's rows wait.
        """
        await txn.execute(f"SELECT id, {column} AS seconds FROM organization WHERE {column} IS NOT NULL ORDER BY id")
        rows = txn.fetchall()
        share = max(1, -(-limit // max(1, len(rows))))
        return [(row["id"], self._now() - _seconds(row["seconds"]), share) for row in rows]

    def incinerate_due(self, limit=100):
        """
        Incinerate up to C{limit} parsed messages past their organisation's
        raw period and not held, in one transaction; fires with what went
        (id, org_id, raw_size). Rows another daemon is marking are skipped.
        """
        return self._background(self._incinerate_due, int(limit)).addCallback(self._woken)

    async def _incinerate_due(self, txn, limit):
        ids = []
        for org_id, cutoff, share in await self._periods_txn(txn, "retention_raw_seconds", limit):
            await txn.execute(
                "SELECT m.id FROM inbound_message m WHERE m.org_id = ? AND m.status = 'parsed' AND m.received_at < ?"
                f" AND NOT {held('m')} ORDER BY m.id LIMIT ?" + self.engine.skip_locked,
                (org_id, cutoff, min(share, limit - len(ids))),
            )
            ids += [row["id"] for row in txn.fetchall()]
            if len(ids) >= limit:
                break
        return (await self._incinerate_txn(txn, ids, "retention", "retention", "status = 'parsed'"))

    async def _incinerate_txn(self, txn, ids, reason, actor, allowed, erase=False):
        """
        Mark C{ids} incinerated where C{allowed} still holds and no hold
        covers them (checked again here, in the marking statement); their
        history, audit rows and events, and their blobs queued. Erasure also
        replaces the personal fields and deletes the documents.
        """
        if not ids:
            return []
        now = self._now()
        sets = "status = 'incinerated', incinerated_at = ?, incinerated_reason = ?, claimed_until = NULL"
        if erase:
            sets += ", " + _ERASED_MESSAGE
        await txn.execute(
            f"UPDATE inbound_message SET {sets} WHERE id IN ({marks(ids)}) AND {allowed}"
            f" AND NOT {held('inbound_message')} RETURNING id, org_id, raw_key, raw_size, raw_sha256, source_message_id",
            (now, reason, *ids),
        )
        gone = sorted(txn.fetchall(), key=lambda row: row["id"])
        for row in gone:
            document_keys = []
            if erase:
                await txn.execute(
                    "UPDATE inbound_message SET source_message_id = ? WHERE id = ?",
                    (erased_message_id(row["source_message_id"]), row["id"]),
                )
                await txn.execute("UPDATE message_status_history SET error = NULL WHERE inbound_message_id = ?", (row["id"],))
                await txn.execute(
                    "UPDATE webhook_event SET message_error = NULL, last_error = NULL WHERE inbound_message_id = ?", (row["id"],)
                )
                size, document_keys = await self._delete_documents_txn(txn, row["id"], "erasure", actor, _ERASED_DOCUMENT)
                row["raw_size"] += size
            row["keys"] = document_keys + await self._queue_raw_txn(txn, row["raw_key"])
            await self._record_status_txn(txn, [row["id"]], "incinerated", reason)
            await self._audit_txn(txn, actor, "erase" if erase else "incinerate", row["org_id"], reason, row["raw_sha256"], message_id=row["id"])
            await self._write_event_txn(txn, row["id"], "incinerated", reason, event_status="erased" if erase else None)
        return [{"id": row["id"], "org_id": row["org_id"], "bytes": row["raw_size"], "reason": reason, "keys": row["keys"]} for row in gone]

    def _woken(self, result):
        """After a marking committed: wake this daemon's webhook senders (other daemons hear the notification)."""
        self._events_written(bool(result))
        return result

    async def _queue_raw_txn(self, txn, key):
        """Queue a raw copy once no live row refers to it (the messages of several organisations share one); the keys queued."""
        await txn.execute(
            "INSERT INTO blob_purge (key, created_at) SELECT ?, ? WHERE NOT EXISTS"
            " (SELECT 1 FROM inbound_message WHERE raw_key = ? AND status <> 'incinerated')"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            (key, self._now(), key),
        )
        return [row["key"] for row in txn.fetchall()]

    async def _delete_documents_txn(self, txn, message_id, reason, actor, erase="", document_ids=None):
        """Mark a message's documents (or C{document_ids}) deleted, audit and queue each; their bytes and keys."""
        sets = "deleted_at = ?, deleted_reason = ?" + (", " + erase if erase else "")
        where, args = "inbound_message_id = ?", [message_id]
        if document_ids is not None:
            where, args = f"id IN ({marks(document_ids)})", list(document_ids)
        await txn.execute(
            f"UPDATE document SET {sets} WHERE {where} AND deleted_at IS NULL"
            " RETURNING id, org_id, inbound_message_id, storage_key, sha256, size",
            (self._now(), reason, *args),
        )
        size, keys = 0, []
        for document in sorted(txn.fetchall(), key=lambda row: row["id"]):
            size += document["size"]
            keys.append(document["storage_key"])
            await txn.execute(
                "INSERT INTO blob_purge (key, created_at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (document["storage_key"], self._now()),
            )
            await self._audit_txn(
                txn, actor, "delete_document", document["org_id"], reason, document["sha256"],
                message_id=document["inbound_message_id"], document_id=document["id"],
            )
        return size, keys

    def delete_due_documents(self, limit=100):
        """
        Mark up to C{limit} documents past their organisation's documents
        period deleted (of parsed or incinerated messages not held), in one
        transaction; fires with their count and bytes.
        """
        return self._background(self._delete_due_documents, int(limit))

    async def _delete_due_documents(self, txn, limit):
        ids = []
        for org_id, cutoff, share in await self._periods_txn(txn, "retention_documents_seconds", limit):
            await txn.execute(
                "SELECT d.id FROM document d WHERE d.org_id = ? AND d.deleted_at IS NULL AND d.created_at < ?"
                " AND d.inbound_message_id IN (SELECT m.id FROM inbound_message m WHERE m.org_id = d.org_id"
                f" AND m.status IN ('parsed', 'incinerated') AND NOT {held('m')})"
                " ORDER BY d.id LIMIT ?" + self.engine.skip_locked,
                (org_id, cutoff, min(share, limit - len(ids))),
            )
            ids += [row["id"] for row in txn.fetchall()]
            if len(ids) >= limit:
                break
        if not ids:
            return 0, 0
        # Checked again in the marking statement: a hold added meanwhile wins.
        await txn.execute(
            f"SELECT d.id FROM document d JOIN inbound_message m ON m.id = d.inbound_message_id"
            f" WHERE d.id IN ({marks(ids)}) AND NOT {held('m')}",
            tuple(ids),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if not ids:
            return 0, 0
        size, _ = await self._delete_documents_txn(txn, None, "retention", "retention", document_ids=ids)
        return len(ids), size

    def erase_message(self, message_id, actor):
        return self._run(self._erase_message, int(message_id), actor).addCallback(self._woken)

    async def _erase_message(self, txn, message_id, actor):
        gone = await self._incinerate_txn(txn, [message_id], "erasure", actor, _erasable(), erase=True)
        if not gone:
            await txn.execute(f"SELECT m.status, m.incinerated_reason, {held('m')} AS held FROM inbound_message m WHERE m.id = ?", (message_id,))
            row = txn.fetchone()
            if row is None:
                raise NoSuchMessage(f"no message {message_id}")
            raise _refusal(message_id, row)
        await txn.execute(MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return dict(message_row(txn.fetchone()), bytes=gone[0]["bytes"], keys=gone[0]["keys"])

    def erase_sender(self, slug, sender, actor, limit=100):
        """
        Erase up to C{limit} messages of the organisation from C{sender} (the
        envelope sender, any case) in one transaction: fires with (erased,
        refused): the rows erased, and up to C{limit} of the sender's messages
        left as they are (held, or still being processed; the first L{REFUSALS_SHOWN}) with the reason.
        """
        return self._run(self._erase_sender, slug.lower(), sender.lower(), actor, int(limit)).addCallback(self._woken)

    async def _erase_sender(self, txn, slug, sender, actor, limit):
        org = await self._require_org_txn(txn, slug)
        mine = "m.org_id = ? AND LOWER(m.mail_from) = ? AND COALESCE(m.incinerated_reason, '') <> 'erasure'"
        await txn.execute(
            # No SKIP LOCKED: a row a retention batch holds is waited for (and then erased), never passed over.
            f"SELECT m.id FROM inbound_message m WHERE {mine} AND m.status <> 'received' AND NOT {held('m')}"
            " ORDER BY m.id LIMIT ?",
            (org["id"], sender, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        gone = await self._incinerate_txn(txn, ids, "erasure", actor, _erasable(), erase=True)
        await txn.execute(
            f"SELECT m.id, m.status, m.incinerated_reason, {held('m')} AS held FROM inbound_message m"
            f" WHERE {mine} AND (m.status = 'received' OR {held('m')}) ORDER BY m.id LIMIT ?",
            (org["id"], sender, REFUSALS_SHOWN),
        )
        refused = [{"id": row["id"], "reason": str(_refusal(row["id"], row))} for row in txn.fetchall()]
        return gone, refused

    def pending_purges(self, limit=100):
        """Fire with up to C{limit} blob keys whose rows are marked and whose blobs may still exist."""
        return self._background(self._pending_purges, int(limit))

    async def _pending_purges(self, txn, limit):
        await txn.execute("SELECT key FROM blob_purge ORDER BY created_at, key LIMIT ?", (limit,))
        return [row["key"] for row in txn.fetchall()]

    def purged(self, keys):
        """Their blobs are deleted: the keys leave the queue."""
        return self._run(self._purged, list(keys))

    async def _purged(self, txn, keys):
        if keys:
            await txn.execute(f"DELETE FROM blob_purge WHERE key IN ({marks(keys)})", tuple(keys))


def _erasable() -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in _ERASABLE) + ") AND COALESCE(incinerated_reason, '') <> 'erasure'"


def _refusal(message_id: int, row: dict) -> Exception:
    """Why a message was not erased, as the error that says so."""
    if row["held"]:
        return MessageHeld(f"message {message_id} is under a legal hold: remove the hold first (mailingest hold list)")
    if row["status"] == "received":
        return NotErasable(f"message {message_id} is still being processed (received): erase it once it is parsed, failed or quarantined")
    return NotErasable(f"message {message_id} is erased already")


def _seconds(value) -> timedelta:
    return timedelta(seconds=int(value))
