"""
The console's search of an organisation's messages (by text, status, date
range and sender), whose cost is bounded whatever the text: the search
index where it serves (L{mailingest.storage.stores.search}), else windows
of the organisation's messages within a time budget.
"""

import time

from zope.interface import implementer

from mailingest.interfaces import ISearchStore
from mailingest.storage.stores import search
from mailingest.storage.stores.base import marks
from mailingest.storage.stores.reads import BY_ID, BY_TIME, OrgReads, rows_after
from mailingest.storage.stores.search import READ_ROWS, SearchRows, TextSearch, index_state, pg_index_built, window_floor

# The console's page: a message's summary with its number of documents.
_PAGE_COLUMNS = (
    "SELECT m.id, m.status, m.mail_from, m.subject, m.source_message_id, m.received_at,"
    " (SELECT COUNT(*) FROM document d WHERE d.inbound_message_id = m.id) AS documents"
)


def _search_rows(found: TextSearch, org_id: int, where: list[str], args: list) -> tuple[str, tuple]:
    """C{FROM ... WHERE ...} of the organisation's rows C{found} reads, with C{where}; and the arguments."""
    return (
        f" FROM {found.source} WHERE " + " AND ".join(["m.org_id = ?", *found.where, *where]),
        (org_id, *found.args, *args),
    )


@implementer(ISearchStore)
class MessageSearchStore(OrgReads):
    def search_messages(self, org_id, status=None, since=None, until=None, sender=None, text=None, before_id=None, limit=50):
        """
        One page of an organisation's messages, newest first (C{before_id} is
        the cursor), each with its number of documents: by id, or for a date
        range (C{since}, C{until}) or a sender without an indexed text, by
        received time then id (the order of the index that reads them).
        C{text} matches
        subject, sender or Message-ID anywhere, case-insensitively: through
        the search index from 3 characters on, else by reading the
        organisation's messages (L{mailingest.storage.stores.search}).
        """
        return self._org_read(org_id, self._search_messages, org_id, status, since, until, sender, text, before_id, int(limit))

    async def _search_messages(self, txn, org_id, status, since, until, sender, text, before_id, limit):
        started = time.monotonic()
        indexed, unindexed_from, changed = await self._index_ready(txn, org_id) if text else (False, None, False)
        found = TextSearch(self.engine.text_search, org_id, text, indexed)
        changed = changed and found.indexed
        filters, filter_args = [], []
        for clause, value in (
            ("m.status = ?", status),
            ("m.received_at >= ?", since),
            ("m.received_at < ?", until),
            ("LOWER(m.mail_from) = ?", sender.lower() if sender else None),
        ):
            if value is not None:
                filters.append(clause)
                filter_args.append(value)
        # A sender's index is (org_id, LOWER(mail_from), received_at, id); an indexed text has its own order.
        dated = (since is not None or until is not None or bool(sender)) and not found.indexed
        order = BY_TIME if dated else found.order
        newest = []
        if found.indexed and unindexed_from is not None and (before_id is None or before_id > unindexed_from):
            # The newest messages, which SQLite's index does not hold yet (it is filled behind intake): read, few as they are.
            unindexed = TextSearch(READ_ROWS, org_id, text, False)
            after, after_args = unindexed.cursor(before_id)
            rows_sql, args = _search_rows(
                unindexed, org_id, [*filters, *after, "m.id >= ?"], [*filter_args, *after_args, unindexed_from]
            )
            await txn.execute(f"{_PAGE_COLUMNS}{rows_sql} ORDER BY m.id DESC LIMIT ?", (*args, limit))
            newest = txn.fetchall()
            if len(newest) >= limit:
                return SearchRows(newest)
            before_id, limit = unindexed_from, limit - len(newest)
        if dated:
            after, after_args = await rows_after(txn, order, before_id)
        else:
            after, after_args = found.cursor(before_id)
        rows_sql, args = _search_rows(found, org_id, [*filters, *after], [*filter_args, *after_args])
        sql, args = f"{_PAGE_COLUMNS}{rows_sql} ORDER BY {order} LIMIT ?", (*args, limit)
        if not text:
            await txn.execute(sql, args)
            return SearchRows(txn.fetchall())
        rows = await txn.read_within(search.WHOLE_SECONDS, sql, args)
        if rows is None:
            rows = await self._search_windows(
                txn, started, org_id, text, indexed, changed, filters, filter_args, before_id, limit
            )
        elif changed:
            # The index left the messages queued as changed out: read them by what they now say.
            rows = await self._with_changed(txn, rows, _PAGE_COLUMNS, org_id, text, filters, filter_args, before_id, None, limit)
        page = SearchRows(newest + rows)
        page.searched_to = getattr(rows, "searched_to", None)
        return page

    async def _search_windows(self, txn, started, org_id, text, indexed, changed, filters, filter_args, before_id, limit):
        """
        The text search the database stopped, again a window of messages at
        a time (see L{mailingest.storage.stores.search.WHOLE_SECONDS}):
        SQLite's index reads only the window's stretch of each trigram's
        list, PostgreSQL's would read all of them, so there the rows are read.
        """
        kind = self.engine.text_search
        found = TextSearch(kind if kind == "fts5" else READ_ROWS, org_id, text, indexed)
        rows = SearchRows()
        size = search.INDEX_WINDOW_MESSAGES if found.indexed else search.WINDOW_MESSAGES
        floor = await window_floor(txn, org_id, before_id, size)
        while True:
            began = time.monotonic()
            where, args, order = found.window(before_id, floor)
            newest_first = order == BY_ID
            rows_sql, args = _search_rows(found, org_id, [*filters, *where], [*filter_args, *args])
            if newest_first:
                await txn.execute(f"SELECT m.id{rows_sql} ORDER BY {order} LIMIT ?", (*args, limit - len(rows)))
                ids = [row["id"] for row in txn.fetchall()]
            else:
                await txn.execute(f"SELECT m.id{rows_sql} ORDER BY {order}", args)
                ids = [row["id"] for row in txn.fetchall()][::-1][:limit - len(rows)]
            if changed:
                merged = await self._with_changed(
                    txn, [{"id": id} for id in ids], "SELECT m.id", org_id, text, filters, filter_args, before_id, floor, limit - len(rows)
                )
                ids = [row["id"] for row in merged]
            if ids:
                await txn.execute(f"{_PAGE_COLUMNS} FROM inbound_message m WHERE m.id IN ({marks(ids)}) ORDER BY m.id DESC", ids)
                rows += txn.fetchall()
            if len(rows) >= limit or floor is None:
                return rows
            # Another window like this one would end past SEARCH_SECONDS: stop here.
            if 2 * time.monotonic() - began - started >= search.SEARCH_SECONDS:
                await txn.execute("SELECT id, received_at FROM inbound_message WHERE id = ?", (floor,))
                rows.searched_to = txn.fetchone()
                return rows
            before_id, floor = floor, await window_floor(txn, org_id, floor, size)

    async def _with_changed(self, txn, rows, columns, org_id, text, filters, filter_args, before_id, floor, limit):
        """
        C{rows} (newest first) with the organisation's messages queued as
        changed that match C{text} by what they now say, below C{before_id}
        and down to C{floor}: at most C{limit}, newest first.
        """
        changed = search.changed_search(org_id, text)
        where, args, _ = changed.window(before_id, floor)
        rows_sql, args = _search_rows(changed, org_id, [*filters, *where], [*filter_args, *args])
        await txn.execute(f"{columns}{rows_sql} ORDER BY {changed.order} LIMIT ?", (*args, limit))
        return sorted([*rows, *txn.fetchall()], key=lambda row: row["id"], reverse=True)[:limit]

    _pg_indexed = False

    async def _index_ready(self, txn, org_id: int) -> tuple[bool, int | None, bool]:
        """
        Whether the search index serves this search; on SQLite the id from
        which on it holds none of the organisation's messages yet (None when
        it holds them all), and whether changes are queued for it. SQLite's
        index serves once it holds every older message, trails the
        organisation by fewer than WINDOW_MESSAGES and has fewer changes
        queued than that (those are read one by one). PostgreSQL's once its
        partial indexes are all built (until then a search leaves out their
        condition and the planner keeps the index of before), remembered
        once true: it stays so.
        """
        if self.engine.text_search != "fts5":
            self._pg_indexed = self._pg_indexed or await pg_index_built(txn)
            return self._pg_indexed, None, False
        state = await index_state(txn, org_id, search.WINDOW_MESSAGES)
        if state["low"] != 0 or search.WINDOW_MESSAGES in (state["behind"], state["changed"]):
            return False, None, False
        return True, state["high"] if state["behind"] else None, bool(state["changed"])
