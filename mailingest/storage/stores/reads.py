"""The read model: the pages of messages, documents and events the API, the console and the admin command show."""

from zope.interface import implementer

from mailingest.interfaces import IReadStore
from mailingest.storage.stores.base import (
    EVENT_SELECT, MESSAGE_SELECT, ORG_SELECT, StoreBase, conditions, message_row, org_row, select_with_org,
)

DOCUMENT_COLUMNS = (
    "id, org_id, inbound_message_id, filename, content_type, size, sha256,"
    " storage_key, created_at"
    ", original_filename, content_type_raw, disposition, content_id, virus, virus_detail"
)
_DOCUMENT_SELECT = select_with_org("document", "d", DOCUMENT_COLUMNS)


@implementer(IReadStore)
class ReadStore(StoreBase):
    def list_messages(self, org_slug=None, status=None, limit=50):
        return self._run(self._list_messages, org_slug, status, limit)

    async def _list_messages(self, txn, org_slug, status, limit):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if status is not None:
            where.append("m.status = ?")
            args.append(status)
        sql = MESSAGE_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.received_at DESC, m.id DESC LIMIT ?"
        await txn.execute(sql, (*args, int(limit)))
        return [message_row(row) for row in txn.fetchall()]

    def get_message(self, message_id):
        return self._run(self._get_message, int(message_id))

    async def _get_message(self, txn, message_id):
        await txn.execute(MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return message_row(txn.fetchone())

    def count_messages(self, status=None, org_id=None):
        return self._background(self._count_messages, status, org_id)

    async def _count_messages(self, txn, status, org_id):
        where, args = conditions(status=status, org_id=org_id)
        await txn.execute("SELECT COUNT(*) AS n FROM inbound_message" + where, args)
        return txn.fetchone()["n"]

    def list_documents(self, org_slug=None, message_id=None, limit=None):
        return self._run(self._list_documents, org_slug, message_id, limit)

    async def _list_documents(self, txn, org_slug, message_id, limit):
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
        await txn.execute(sql, tuple(args))
        return txn.fetchall()

    def get_document(self, document_id):
        return self._run(self._get_document, int(document_id))

    async def _get_document(self, txn, document_id):
        await txn.execute(_DOCUMENT_SELECT + " WHERE d.id = ?", (document_id,))
        return txn.fetchone()

    def page_messages(self, org_id=None, status=None, since=None, before_id=None, limit=50):
        """Newest first by id, for cursor pagination: the messages with ids below C{before_id}."""
        return self._run(self._page_messages, org_id, status, since, before_id, int(limit))

    async def _page_messages(self, txn, org_id, status, since, before_id, limit):
        where, args = [], []
        for clause, value in (("m.org_id = ?", org_id), ("m.status = ?", status), ("m.received_at >= ?", since), ("m.id < ?", before_id)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = MESSAGE_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY m.id DESC LIMIT ?"
        await txn.execute(sql, (*args, limit))
        return [message_row(row) for row in txn.fetchall()]

    def org_summaries(self, since, org_id=None):
        """Each organisation (or the one C{org_id}) with its messages by status since C{since} and its last message time."""
        return self._run(self._org_summaries, since, org_id)

    async def _org_summaries(self, txn, since, org_id):
        sql, args = ORG_SELECT, ()
        if org_id is not None:
            sql, args = sql + " WHERE id = ?", (org_id,)
        await txn.execute(sql + " ORDER BY slug", args)
        orgs = [org_row(row) for row in txn.fetchall()]
        for org in orgs:
            # Per organisation, so each count walks the (org_id, received_at) index.
            await txn.execute(
                "SELECT status, COUNT(*) AS n FROM inbound_message WHERE org_id = ? AND received_at >= ? GROUP BY status",
                (org["id"], since),
            )
            org["counts"] = {row["status"]: row["n"] for row in txn.fetchall()}
            await txn.execute("SELECT MAX(received_at) AS last FROM inbound_message WHERE org_id = ?", (org["id"],))
            org["last_received_at"] = txn.fetchone()["last"]
        return orgs

    def search_messages(self, org_id, status=None, since=None, until=None, sender=None, text=None, before_id=None, limit=50):
        """
        One page of an organisation's messages, newest first by id (C{before_id}
        is the cursor), each with its number of documents. C{text} matches
        subject, sender or Message-ID anywhere, case-insensitively.
        """
        return self._run(self._search_messages, org_id, status, since, until, sender, text, before_id, int(limit))

    async def _search_messages(self, txn, org_id, status, since, until, sender, text, before_id, limit):
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
        await txn.execute(
            "SELECT m.id, m.status, m.mail_from, m.subject, m.source_message_id, m.received_at,"
            " (SELECT COUNT(*) FROM document d WHERE d.inbound_message_id = m.id) AS documents"
            " FROM inbound_message m WHERE " + " AND ".join(where) + " ORDER BY m.id DESC LIMIT ?",
            (*args, limit),
        )
        return txn.fetchall()

    def message_events(self, message_id):
        """A message's webhook events, oldest first, with their attempts."""
        return self._run(self._message_events, int(message_id))

    async def _message_events(self, txn, message_id):
        await txn.execute(EVENT_SELECT + " WHERE e.inbound_message_id = ? ORDER BY e.id", (message_id,))
        return txn.fetchall()

    def get_event(self, event_id):
        return self._run(self._get_event, int(event_id))

    async def _get_event(self, txn, event_id):
        await txn.execute(EVENT_SELECT + " WHERE e.id = ?", (event_id,))
        return txn.fetchone()

    def list_events(self, org_slug=None, status=None, limit=50):
        return self._run(self._list_events, org_slug, status, limit)

    async def _list_events(self, txn, org_slug, status, limit):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if status is not None:
            where.append("e.status = ?")
            args.append(status)
        sql = EVENT_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id DESC LIMIT ?"
        await txn.execute(sql, (*args, int(limit)))
        return txn.fetchall()
