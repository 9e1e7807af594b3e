"""The read model: the pages of messages, documents and events the API, the console and the admin command show (its text search: L{mailingest.storage.stores.message_search})."""

from twisted.internet import defer
from zope.interface import implementer

from mailingest.interfaces import IReadStore
from mailingest.storage.stores.base import (
    EVENT_SELECT, MESSAGE_SELECT, StoreBase, conditions, message_row, org_row, select_with_org,
)

DOCUMENT_COLUMNS = (
    "id, org_id, inbound_message_id, filename, content_type, size, sha256,"
    " storage_key, created_at"
    ", original_filename, content_type_raw, disposition, content_id, virus, virus_detail, deleted_at, deleted_reason"
)
_DOCUMENT_SELECT = select_with_org("document", "d", DOCUMENT_COLUMNS)


async def _org_condition(txn, alias: str, org_slug: str | None) -> tuple[list[str], list]:
    """
    C{alias.org_id = ?} for the organisation C{org_slug} (its id looked up
    first, so the query filters on the indexed column rather than on the
    joined slug), or no condition for None.
    """
    if org_slug is None:
        return [], []
    await txn.execute("SELECT id FROM organization WHERE slug = ?", (org_slug.lower(),))
    row = txn.fetchone()
    return [f"{alias}.org_id = ?"], [row["id"] if row else -1]


# The organisations page looks for each organisation's last message among
# the newest messages, this many per organisation (see _org_summaries).
NEWEST_PER_ORG = 5

# Newest first: by id (the order of arrival), or for a page filtered by
# received date or by sender, by received time then id, the order of the
# (org_id, received_at, id) and (org_id, LOWER(mail_from), received_at, id)
# indexes (on SQLite the id is the rowid every entry ends with), so the rows
# are read in order and reading stops at the end of the page.
BY_ID = "m.id DESC"
BY_TIME = "m.received_at DESC, m.id DESC"


async def rows_after(txn, order: str, before_id: int | None) -> tuple[list[str], list]:
    """
    The cursor's conditions: the rows after the message C{before_id} in
    C{order}. By time, the cursor's received time is looked up (one row by
    its key); a cursor naming no message is read as an id.
    """
    if before_id is None:
        return [], []
    if order == BY_TIME:
        await txn.execute("SELECT received_at FROM inbound_message WHERE id = ?", (before_id,))
        row = txn.fetchone()
        if row is not None:
            at = row["received_at"]
            return ["m.received_at <= ?", "(m.received_at < ? OR m.id < ?)"], [at, at, before_id]
    return ["m.id < ?"], [before_id]


class OrgTurns:
    """
    One read at a time per organisation: its pages and searches wait for
    each other, not another organisation's for them, however many it asks
    for at once (the read connections are few; see L{IEngine.reading}).
    """

    def __init__(self):
        self._locks: dict[int, defer.DeferredLock] = {}

    def run(self, org_id: int, f, *args) -> defer.Deferred:
        lock = self._locks.setdefault(org_id, defer.DeferredLock())
        return lock.run(f, *args).addBoth(self._forget, org_id, lock)

    def _forget(self, result, org_id: int, lock: defer.DeferredLock):
        if not lock.locked and not lock.waiting:
            self._locks.pop(org_id, None)
        return result

    def __len__(self) -> int:
        return len(self._locks)


class OrgReads(StoreBase):
    """What the read roles share: one organisation's reads take their turns (one L{OrgTurns} per store)."""

    _read_turns: OrgTurns | None = None

    def _org_read(self, org_id: int | None, fn, *args) -> defer.Deferred:
        """A read of one organisation's messages, in its turn (L{OrgTurns}); without an organisation, at once."""
        if org_id is None:
            return self._read(fn, *args)
        if self._read_turns is None:
            self._read_turns = OrgTurns()
        return self._read_turns.run(int(org_id), self._read, fn, *args)


@implementer(IReadStore)
class ReadStore(OrgReads):

    def list_messages(self, org_slug=None, status=None, limit=50):
        return self._read(self._list_messages, org_slug, status, limit)

    async def _list_messages(self, txn, org_slug, status, limit):
        # Newest first by id, like the API and the console: an index holds each filter in that order.
        where, args = await _org_condition(txn, "m", org_slug)
        if status is not None:
            where.append("m.status = ?")
            args.append(status)
        sql = MESSAGE_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.id DESC LIMIT ?"
        await txn.execute(sql, (*args, int(limit)))
        return [message_row(row) for row in txn.fetchall()]

    def get_message(self, message_id):
        return self._read(self._get_message, int(message_id))

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
        return self._read(self._list_documents, org_slug, message_id, limit)

    async def _list_documents(self, txn, org_slug, message_id, limit):
        where, args = await _org_condition(txn, "d", org_slug)
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
        return self._read(self._get_document, int(document_id))

    async def _get_document(self, txn, document_id):
        await txn.execute(_DOCUMENT_SELECT + " WHERE d.id = ?", (document_id,))
        return txn.fetchone()

    def page_messages(self, org_id=None, status=None, since=None, before_id=None, limit=50):
        """
        Newest first, for cursor pagination: the messages after C{before_id}.
        By id; with C{since}, by received time (then id), so the range is read
        from an index in that order.
        """
        return self._org_read(org_id, self._page_messages, org_id, status, since, before_id, int(limit))

    async def _page_messages(self, txn, org_id, status, since, before_id, limit):
        order = BY_ID if since is None else BY_TIME
        where, args = await rows_after(txn, order, before_id)
        for clause, value in (("m.org_id = ?", org_id), ("m.status = ?", status), ("m.received_at >= ?", since)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = MESSAGE_SELECT + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {order} LIMIT ?"
        await txn.execute(sql, (*args, limit))
        return [message_row(row) for row in txn.fetchall()]

    def org_summaries(self, since, org_id=None):
        """Each organisation (or the one C{org_id}) with its messages by status since C{since} and its last message time."""
        return self._read(self._org_summaries, since, org_id)

    async def _org_summaries(self, txn, since, org_id):
        # Two queries whatever the number of organisations. The last message
        # time of an organisation is one step back along (org_id,
        # received_at) (ORDER BY ... LIMIT 1: SQLite would read the
        # organisation's whole range for a MAX): a page of that index each,
        # read from disk when cold (1,000 took 145 ms). So for the page of
        # every organisation it is first taken from the newest messages
        # (NEWEST_PER_ORG per organisation, one stretch of the received_at
        # index), and only an organisation with none among them takes the
        # step. The counts are one range of that index (MATERIALIZED: else
        # SQLite reads a whole index to group in order).
        last = "(SELECT m.received_at FROM inbound_message m WHERE m.org_id = o.id ORDER BY m.received_at DESC LIMIT 1)"
        columns = "SELECT o.id, o.slug, o.name, o.active, o.created_at, "
        if org_id is None:
            await txn.execute(
                "WITH newest AS MATERIALIZED (SELECT org_id, received_at FROM inbound_message"
                " ORDER BY received_at DESC LIMIT (SELECT ? * COUNT(*) FROM organization)),"
                " latest AS MATERIALIZED (SELECT org_id, MAX(received_at) AS at FROM newest GROUP BY org_id)"
                f" {columns}COALESCE(l.at, {last}) AS last_received_at"
                " FROM organization o LEFT JOIN latest l ON l.org_id = o.id ORDER BY o.slug",
                (NEWEST_PER_ORG,),
            )
        else:
            await txn.execute(f"{columns}{last} AS last_received_at FROM organization o WHERE o.id = ?", (org_id,))
        orgs = [org_row(row) for row in txn.fetchall()]
        recent, recent_args = "SELECT org_id, status FROM inbound_message WHERE received_at >= ?", [since]
        if org_id is not None:
            recent += " AND org_id = ?"
            recent_args.append(org_id)
        await txn.execute(
            f"WITH recent AS MATERIALIZED ({recent}) SELECT org_id, status, COUNT(*) AS n FROM recent GROUP BY org_id, status",
            tuple(recent_args),
        )
        counts: dict = {}
        for row in txn.fetchall():
            counts.setdefault(row["org_id"], {})[row["status"]] = row["n"]
        for org in orgs:
            org["counts"] = counts.get(org["id"], {})
        return orgs

    def message_events(self, message_id):
        """A message's webhook events, oldest first, with their attempts."""
        return self._read(self._message_events, int(message_id))

    async def _message_events(self, txn, message_id):
        await txn.execute(EVENT_SELECT + " WHERE e.inbound_message_id = ? ORDER BY e.id", (message_id,))
        return txn.fetchall()

    def get_event(self, event_id):
        return self._read(self._get_event, int(event_id))

    async def _get_event(self, txn, event_id):
        await txn.execute(EVENT_SELECT + " WHERE e.id = ?", (event_id,))
        return txn.fetchone()

    def list_events(self, org_slug=None, status=None, limit=50):
        return self._read(self._list_events, org_slug, status, limit)

    async def _list_events(self, txn, org_slug, status, limit):
        where, args = await _org_condition(txn, "e", org_slug)
        if status is not None:
            where.append("e.status = ?")
            args.append(status)
        sql = EVENT_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.id DESC LIMIT ?"
        await txn.execute(sql, (*args, int(limit)))
        return txn.fetchall()
