"""
Searching an organisation's messages by text without reading all of them
(issue 28): the SQL each engine's search index answers, and the step that
fills that index for rows stored before migration 013.

The promise is the console's: the text is found anywhere in the subject,
the sender or the Message-ID, case-insensitively. Both indexes are made of
trigrams, so a text of fewer than 3 characters cannot use them: it is
matched by reading the organisation's messages, as before the index.

SQLite: the FTS5 trigram table C{message_search} (migration 013, kept in
step by triggers), whose rows also carry the organisation as a token of its
own, so a search walks only that organisation's matches, newest first, and
stops at the end of the page. PostgreSQL: a pg_trgm GIN index over the three
columns joined by newlines (L{SEARCH_TEXT}), built with C{CREATE INDEX
CONCURRENTLY} so writes go on meanwhile; without the pg_trgm extension (the
contrib package missing) search keeps reading the organisation's rows.
"""

from collections.abc import Callable

from mailingest.storage.engines import IDatabaseTransaction

# Trigram indexes know nothing shorter.
MIN_INDEXED = 3
# Rows indexed per SQLite transaction while filling the index: short enough
# that a message insert waiting behind one is not delayed noticeably.
BACKFILL_BATCH = 2000
PG_SEARCH_INDEX = "inbound_message_search"
# The text the PostgreSQL index holds; the query must spell it the same.
SEARCH_TEXT = "LOWER(COALESCE(m.subject, '') || E'\\n' || m.mail_from || E'\\n' || m.source_message_id)"
_SCAN = (
    "(LOWER(m.subject) LIKE ? ESCAPE '\\' OR LOWER(m.mail_from) LIKE ? ESCAPE '\\'"
    " OR LOWER(m.source_message_id) LIKE ? ESCAPE '\\')"
)


def like_pattern(text: str) -> str:
    """C{%text%}, lower case, with LIKE's own characters escaped."""
    return "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def fts_query(org_id: int, text: str) -> str:
    """The FTS5 query for C{text} as a substring of one column, in organisation C{org_id}."""
    phrase = '"' + text.replace('"', '""') + '"'
    return f'org : "~{int(org_id)}~" AND {{subject mail_from message_id}} : {phrase}'


class TextSearch:
    """
    How one query finds C{text}: the rows to read (C{source}), the extra
    conditions and their arguments, the order newest first (C{order}) and
    the cursor's condition (C{after}, taking the id of the last row shown),
    both in the terms of what delivers the rows in that order; C{indexed}
    when the search index finds the rows.
    """

    def __init__(self, kind: str, org_id: int, text: str | None, indexed: bool):
        self.source, self.where, self.args = "inbound_message m", [], []
        self.order, self.after = "m.id DESC", "m.id < ?"
        self.indexed = False
        if not text:
            return
        if len(text) < MIN_INDEXED or (kind == "fts5" and not indexed):
            self.where, self.args = [_SCAN], [like_pattern(text)] * 3
            return
        self.indexed = True
        if kind == "fts5":
            # The table's rowids are minus the ids (see the SQLite engine): ascending is newest first.
            self.source = "message_search s CROSS JOIN inbound_message m"
            self.where = ["m.id = -s.rowid", "message_search MATCH ?"]
            self.args = [fts_query(org_id, text)]
            self.order, self.after = "s.rowid", "s.rowid > -?"
        else:
            self.where, self.args = [SEARCH_TEXT + " LIKE ? ESCAPE '\\'"], [like_pattern(text)]


async def fts_ready(txn: IDatabaseTransaction) -> bool:
    """Whether every row is in SQLite's search table (its backfill is done)."""
    await txn.execute("SELECT next_below FROM message_search_backfill")
    row = txn.fetchone()
    return row is None or row["next_below"] <= 0


async def backfill_step(txn: IDatabaseTransaction) -> int | None:
    """
    Put the next batch of older rows into SQLite's search table, highest ids
    first; fires with the id below which rows are still to index (0 once
    the last batch is in, None when there was nothing left to do).
    """
    await txn.execute("SELECT next_below FROM message_search_backfill")
    below = txn.fetchone()["next_below"]
    if below <= 0:
        return None
    await txn.execute(
        "SELECT id FROM inbound_message WHERE id < ? ORDER BY id DESC LIMIT 1 OFFSET ?", (below, BACKFILL_BATCH - 1)
    )
    row = txn.fetchone()
    low = row["id"] if row else 0
    await txn.execute(
        "INSERT INTO message_search (rowid, org, subject, mail_from, message_id)"
        " SELECT -id, '~' || org_id || '~', subject, mail_from, source_message_id"
        " FROM inbound_message WHERE id >= ? AND id < ?",
        (low, below),
    )
    await txn.execute("UPDATE message_search_backfill SET next_below = ?", (low,))
    return low


async def pg_index_built(txn: IDatabaseTransaction) -> bool:
    """Whether PostgreSQL's search index is there and usable (a CREATE INDEX CONCURRENTLY may have been cut short)."""
    await txn.execute(
        "SELECT x.indisvalid AS valid FROM pg_index x WHERE x.indexrelid = to_regclass(?)", (PG_SEARCH_INDEX,)
    )
    row = txn.fetchone()
    return bool(row and row["valid"])


PG_STEPS = (
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    # An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index behind: drop it and build again.
    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('" + PG_SEARCH_INDEX + "')"
    " AND NOT indisvalid) THEN EXECUTE 'DROP INDEX " + PG_SEARCH_INDEX + "'; END IF; END $$",
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS " + PG_SEARCH_INDEX + " ON inbound_message USING gin (("
    + SEARCH_TEXT.replace("m.", "") + ") gin_trgm_ops)",
    # Statistics of the indexed text: how common a searched text is tells the
    # planner whether to read the organisation's newest rows until a page is
    # full (a common text) or the index's matches (a rare one).
    "ANALYZE inbound_message",
)


def describe_progress(below: int | None) -> str:
    return "search index: complete" if not below else f"search index: messages below id {below} still to index"


ProgressCallback = Callable[[str], object]
