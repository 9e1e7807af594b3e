"""
Searching an organisation's messages by text without reading all of them
(issue 28): the SQL each engine's search index answers, and the step that
keeps SQLite's index up to date (L{index_step}).

The promise is the console's: the text is found anywhere in the subject,
the sender or the Message-ID, case-insensitively. Both indexes are made of
trigrams, so a text of fewer than 3 characters cannot use them: it is
matched by reading the organisation's messages, as before the index.

SQLite: the FTS5 trigram table C{message_search}, in a file of its own
(migration 018), whose rowids run by organisation, then newest first
(L{SEARCH_ORG_SPAN}): a search seeks to its organisation's stretch of each
trigram's list, never walks another organisation's matches, and stops at
the end of the page. Its own connection fills it behind intake, a batch at
a time (L{index_step}), so its merges never hold a message insert; a
search reads the few newest messages it does not hold yet. PostgreSQL: pg_trgm GIN indexes over the three columns
joined by newlines (L{SEARCH_TEXT}), built with C{CREATE INDEX CONCURRENTLY}
so writes go on meanwhile; without the pg_trgm extension (the contrib
package missing) search keeps reading the organisation's rows. A GIN index
hands over all of a text's candidates at once, in no order: what it reads
is the posting lists of the text's trigrams across all it covers. So there
is one partial index per L{PG_SEARCH_BUCKETS}th of the organisations
(C{org_id % 16}): a search reads the lists of its own share, not of every
organisation's mail, at no cost to intake (each row is in one index).
"""

from dataclasses import dataclass

from mailingest.storage.engines import IDatabaseTransaction
from mailingest.storage.engines.sqlite import SEARCH_ORG_SPAN, search_row, search_rowid

# Trigram indexes know nothing shorter.
MIN_INDEXED = 3
# What one search may cost. A text whose every trigram is common (a phrase
# of everyday words, "order for") or too short for the index makes the index
# hand over most of the organisation's messages to be read and rechecked:
# 0.1-0.6 s for 200,000 messages, on the connection intake also needs. So the
# whole history is searched for at most WHOLE_SECONDS; when the database
# stops that, the search reads the organisation's messages newest first, in
# windows, until the page is full or another window would end past
# SEARCH_SECONDS, and says how far back it looked (L{SearchRows.searched_to}).
# A window is WINDOW_MESSAGES when its rows are read one by one (PostgreSQL,
# a short text: 15-20 ms at worst), INDEX_WINDOW_MESSAGES through SQLite's
# index (about 12 ms at worst).
WHOLE_SECONDS = 0.04
SEARCH_SECONDS = 0.06
WINDOW_MESSAGES = 5_000
INDEX_WINDOW_MESSAGES = 20_000
# TextSearch's kind for reading the rows, whatever index the engine has.
READ_ROWS = "rows"
# Rows SQLite's index takes per transaction of its own connection, of each
# kind (new, changed or gone, older): a search waits behind at most one.
INDEX_BATCH = 2000
PG_SEARCH_INDEX = "inbound_message_search"
# Organisations per partial index: one in 16 (a search reads 1/16 of the lists, and the planner 16 indexes).
PG_SEARCH_BUCKETS = 16
PG_SEARCH_INDEXES = tuple(f"{PG_SEARCH_INDEX}_{bucket}" for bucket in range(PG_SEARCH_BUCKETS))
# The text the PostgreSQL index holds; the query must spell it the same.
SEARCH_TEXT = "LOWER(COALESCE(m.subject, '') || E'\\n' || m.mail_from || E'\\n' || m.source_message_id)"
_SCAN = (
    "(LOWER(m.subject) LIKE ? ESCAPE '\\' OR LOWER(m.mail_from) LIKE ? ESCAPE '\\'"
    " OR LOWER(m.source_message_id) LIKE ? ESCAPE '\\')"
)


_NOT_STALE = "m.id NOT IN (SELECT message_id FROM message_search_stale)"


def like_pattern(text: str) -> str:
    """C{%text%}, lower case, with LIKE's own characters escaped."""
    return "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def fts_query(text: str) -> str:
    """The FTS5 query for C{text} as a substring of one column (a phrase of its trigrams)."""
    return '"' + text.replace('"', '""') + '"'


class TextSearch:
    """
    How one query finds C{text}: the rows to read (C{source}), the extra
    conditions and their arguments, the order newest first (C{order}) and
    the cursor's condition (L{cursor}), both in the terms of what delivers
    the rows in that order; C{indexed} when the search index finds the rows.
    """

    def __init__(self, kind: str, org_id: int, text: str | None, indexed: bool):
        self.source, self.where, self.args = "inbound_message m", [], []
        self.order, self._after = "m.id DESC", "m.id < ?"
        self.indexed, self._top = False, None
        if not text:
            return
        if len(text) < MIN_INDEXED or kind == READ_ROWS or (kind == "fts5" and not indexed):
            self.where, self.args = [_SCAN], [like_pattern(text)] * 3
            return
        self.indexed = True
        if kind == "fts5":
            # Rowid (org_id + 1) * SEARCH_ORG_SPAN - id: the organisation's stretch, newest first.
            self._top = (int(org_id) + 1) * SEARCH_ORG_SPAN
            self.source = "search.message_search s CROSS JOIN inbound_message m"
            # A message changed (an erasure's redaction) is not found by the text it had, before the index forgets it.
            self.where = [f"m.id = {self._top} - s.rowid", "message_search MATCH ?", _NOT_STALE]
            self.args = [fts_query(text)]
            self.order, self._after = "s.rowid", f"s.rowid > {self._top} - ?"
            return
        self.where, self.args = [SEARCH_TEXT + " LIKE ? ESCAPE '\\'"], [like_pattern(text)]
        if indexed:
            # The partial index's own condition, spelled as it is, so the planner can use that index
            # (not before they are all built: the planner would misjudge a common text meanwhile).
            self.where.append(f"m.org_id % {PG_SEARCH_BUCKETS} = {int(org_id) % PG_SEARCH_BUCKETS}")

    def cursor(self, before_id: int | None) -> tuple[list[str], list]:
        """
        The condition for rows older than C{before_id}. The SQLite search
        table always has one: its lower bound on the rowid, where FTS5 starts
        (the start of the organisation's stretch without a cursor).
        """
        return self._bounds(before_id, None)

    def window(self, before_id: int | None, floor: int | None) -> tuple[list[str], list, str]:
        """
        The conditions for rows older than C{before_id} down to the message
        C{floor} (None: to the first), and the order to read them in: oldest
        first from SQLite's index (FTS5 walks a list forward past its upper
        bound when nothing matches, 0.1 s for a common text; backwards it
        reads only the stretch), else newest first.
        """
        where, args = self._bounds(before_id, floor)
        return where, args, ("s.rowid DESC" if self._top is not None else "m.id DESC")

    def _bounds(self, before_id: int | None, floor: int | None) -> tuple[list[str], list]:
        if self._top is not None:
            # FTS5 takes one bound on each side: given two upper bounds, it may
            # keep the looser one, so the stretch's end is given only without a floor.
            where = [self._after, f"s.rowid < {self._top}" if floor is None else f"s.rowid <= {self._top} - ?"]
            args = [SEARCH_ORG_SPAN if before_id is None else before_id]
        else:
            where, args = ([self._after], [before_id]) if before_id is not None else ([], [])
            if floor is not None:
                where.append("m.id >= ?")
        return where, args + ([] if floor is None else [floor])


async def window_floor(txn: IDatabaseTransaction, org_id: int, before_id: int | None, size: int) -> int | None:
    """
    Where the next window of a windowed search ends: the organisation's
    C{size}-th message below C{before_id}, from the (org_id, id) index
    alone; None when fewer are left (the window goes down to its first).
    """
    below, args = ("AND id < ? ", (before_id,)) if before_id is not None else ("", ())
    await txn.execute(
        f"SELECT id FROM inbound_message WHERE org_id = ? {below}ORDER BY org_id DESC, id DESC LIMIT 1 OFFSET ?",
        (org_id, *args, size - 1),
    )
    row = txn.fetchone()
    return row["id"] if row else None


class SearchRows(list):
    """
    A page of a text search's rows. C{searched_to} is None when the search
    looked through all of the organisation's messages the page could come
    from; else it stopped short of a full page (see L{SEARCH_SECONDS}) and
    it is the oldest message it looked at (C{id}, C{received_at}): searching
    again with that id as the cursor goes on from there.
    """

    searched_to: dict | None = None


@dataclass
class IndexStep:
    """
    What one L{index_step} did: C{below}, the id below which older messages
    are still to index (0 when none); C{stale_done},
    the last row of C{message_search_stale} dealt with (the database may
    forget it and those before, L{forget_stale}); C{filled}, the older
    messages it indexed; C{more} when a batch was full.
    """

    below: int
    stale_done: int
    filled: int = 0
    more: bool = False


async def index_state(txn: IDatabaseTransaction, org_id: int, most: int) -> dict:
    """
    In a read of the database (the index attached as C{search}): C{low} and
    C{high} of the index (see the engine); C{behind}, how many of the
    organisation's messages it does not hold yet from C{high} on; and
    C{changed}, how many changes are queued for it (L{_NOT_STALE}); each
    counted up to C{most}.
    """
    await txn.execute(
        "SELECT p.low, p.high, (SELECT COUNT(*) FROM (SELECT 1 FROM inbound_message"
        " WHERE org_id = ? AND id >= p.high LIMIT ?)) AS behind,"
        " (SELECT COUNT(*) FROM (SELECT 1 FROM message_search_stale LIMIT ?)) AS changed FROM search.search_progress p",
        (org_id, most, most),
    )
    return txn.fetchone()


def changed_search(org_id: int, text: str) -> TextSearch:
    """
    How a search reads the organisation's messages queued as changed, by
    what they now say: the index leaves them out until it has dealt with
    them (L{_NOT_STALE}), so they are read one by one, from the queue, which
    is short whenever the index serves (L{index_state}).
    """
    found = TextSearch(READ_ROWS, org_id, text, False)
    found.source = "(SELECT DISTINCT message_id FROM message_search_stale) q CROSS JOIN inbound_message m"
    found.where = ["m.id = q.message_id", *found.where]
    return found


# What the database has issued: message ids, and rows of its queue of changes (the first still queued).
_ISSUED = (
    "SELECT (SELECT COALESCE(MAX(seq), 0) FROM mail.sqlite_sequence WHERE name = 'inbound_message') AS messages,"
    " (SELECT COALESCE(MAX(seq), 0) FROM mail.sqlite_sequence WHERE name = 'message_search_stale') AS changes,"
    " (SELECT MIN(seq) FROM mail.message_search_stale) AS first_queued"
)


def _in_step(high: int, stale_done: int, issued: dict) -> bool:
    """
    Whether the index and its database belong together. It is ahead when it
    holds messages or has dealt with changes the database never issued (the
    database restored from a backup); behind when the database has forgotten
    changes it has not dealt with (its file restored from a backup): it
    would hold the old text, an erased one included, of messages still there.
    The queue is forgotten from its start, and only up to what the index has
    dealt with, so its first row left is at most the one after that.
    """
    first_queued = issued["first_queued"] or issued["changes"] + 1
    return high - 1 <= issued["messages"] and stale_done <= issued["changes"] and first_queued <= stale_done + 1


# FTS5 keeps a deleted row's entries in its segments, behind a marker, until a merge reaches them: an
# erased text would stay in the file, readable by anyone who reads the file. Merging the whole index into
# one segment drops them (the pages it frees are zeroed: the engine's secure_delete). FTS5's 'merge' with
# a negative count does that a part at a time, about that many pages per transaction, keeping each
# transaction, and the WAL, small: REWRITE_PAGES is about a quarter of a second's work.
_MERGE = "INSERT INTO message_search (message_search, rank) VALUES ('merge', ?)"
REWRITE_PAGES = 4000
# The queue's rows in (seq, seq]: the messages changed or gone.
_CHANGED_IDS = "SELECT message_id FROM mail.message_search_stale WHERE seq > ? AND seq <= ?"
# The next batch of message ids from a bound up, and from below a bound down: the edge reached, and how many.
_NEWER = "SELECT MAX(id) AS edge, COUNT(*) AS n FROM (SELECT id FROM mail.inbound_message WHERE id >= ? ORDER BY id LIMIT ?)"
_OLDER = "SELECT MIN(id) AS edge, COUNT(*) AS n FROM (SELECT id FROM mail.inbound_message WHERE id < ? ORDER BY id DESC LIMIT ?)"


async def index_step(txn: IDatabaseTransaction) -> IndexStep:
    """
    One transaction of SQLite's search index (its file's connection, the
    database attached as C{mail}), each part at most L{INDEX_BATCH} rows:
    forget the messages changed or gone since the last step (their rows go,
    and are indexed again from the message if it is still there); index the
    messages that came since; index the next older ones, highest ids first.
    The step that deals with the last change queued, or that empties an
    index that does not belong with its database, starts a rewrite of the
    whole index (L{_rewrite}), which the next steps make before anything
    else: about 7 s at a million messages, so erasures coming together
    share one.
    """
    progress = await _progress(txn)
    if progress.rewrite:
        return await _rewrite(txn, progress)
    low, high, stale_done = progress.low, progress.high, progress.stale_done
    stale_last, forgotten, changes_left = await _forget_changed(txn, stale_done)
    newest, came = await _batch(txn, _NEWER, high)
    new_high = newest + 1 if came else high
    if not (forgotten or came or low or progress.restarted):
        # Nothing came, changed or is left to fill: a commit without a write (no sync to disk every run).
        return IndexStep(below=0, stale_done=stale_done)
    new_low, filled = low, 0
    if low > 0:
        oldest, filled = await _batch(txn, _OLDER, low)
        new_low = oldest if filled == INDEX_BATCH else 0
    # The new, the older and the changed ones still there, in one statement in rowid order: FTS5
    # writes out what it holds whenever a rowid is lower than the one before.
    await txn.execute(
        f"INSERT INTO message_search (rowid, subject, mail_from, message_id) SELECT {search_row('m.')}"
        " FROM mail.inbound_message m WHERE (m.id >= ? AND m.id < ?) OR (m.id >= ? AND m.id < ?)"
        f" OR (m.id >= ? AND m.id < ? AND m.id IN ({_CHANGED_IDS})) ORDER BY m.org_id, m.id DESC",
        (high, new_high, new_low, low, low, high, stale_done, stale_last),
    )
    rewrite = progress.emptied or bool(forgotten and not changes_left)
    await txn.execute(
        "UPDATE search_progress SET low = ?, high = ?, stale_done = ?, rewrite = ?", (new_low, new_high, stale_last, int(rewrite))
    )
    return IndexStep(below=new_low, stale_done=stale_last, filled=filled, more=rewrite or INDEX_BATCH in (forgotten, came, filled))


async def _rewrite(txn: IDatabaseTransaction, progress: "_Progress") -> IndexStep:
    """
    A part of the index's rewrite (L{_MERGE}). The index takes nothing else
    until FTS5 finds nothing left to merge (it makes fewer than 2 changes),
    so the rewrite ends: with messages coming in, each part would merge them
    too and start on the whole again.
    """
    await txn.execute("SELECT total_changes() AS n")
    before = txn.fetchone()["n"]
    await txn.execute(_MERGE, (-REWRITE_PAGES,))
    await txn.execute("SELECT total_changes() AS n")
    if txn.fetchone()["n"] - before < 2:
        await txn.execute("UPDATE search_progress SET rewrite = 0")
    return IndexStep(below=progress.low, stale_done=progress.stale_done, more=True)


@dataclass
class _Progress:
    """
    Where the index is: C{low}, C{high}, C{stale_done} (see the engine);
    C{restarted} when it starts over, new or C{emptied} (it did not belong
    with its database: what it held may have been erased since, so a
    rewrite follows); C{rewrite} while a rewrite is under way.
    """

    low: int
    high: int
    stale_done: int
    restarted: bool = False
    emptied: bool = False
    rewrite: bool = False


async def _progress(txn: IDatabaseTransaction) -> _Progress:
    """
    The index's progress for this step. An index that starts over takes
    everything stored so far as older messages to fill, and what changed
    before as dealt with (in rows not yet indexed).
    """
    await txn.execute("SELECT low, high, stale_done, rewrite FROM search_progress")
    state = txn.fetchone()
    await txn.execute(_ISSUED)
    issued = txn.fetchone()
    if state["high"] >= 0 and _in_step(state["high"], state["stale_done"], issued):
        return _Progress(state["low"], state["high"], state["stale_done"], rewrite=bool(state["rewrite"]))
    if state["high"] >= 0:
        # One file was restored from a backup and not the other.
        await txn.execute("DELETE FROM message_search")
    start = issued["messages"] + 1
    return _Progress(start, start, issued["changes"], restarted=True, emptied=state["high"] >= 0)


async def _forget_changed(txn: IDatabaseTransaction, stale_done: int) -> tuple[int, int, bool]:
    """
    The rows of the messages changed or gone after queue row C{stale_done}
    deleted, at most L{INDEX_BATCH} of the queue's: the last row dealt
    with, how many, and whether more are queued after it.
    """
    await txn.execute(
        "SELECT COALESCE(MAX(seq), ?) AS last, COUNT(*) AS n FROM"
        " (SELECT seq FROM mail.message_search_stale WHERE seq > ? ORDER BY seq LIMIT ?)",
        (stale_done, stale_done, INDEX_BATCH),
    )
    stale = txn.fetchone()
    if stale["n"]:
        changed = (stale_done, stale["last"])
        # By the rowid each was indexed with, and by its present one (a message still there is indexed again).
        await txn.execute(
            f"DELETE FROM message_search WHERE rowid IN (SELECT {search_rowid('org_id', 'message_id')}"
            " FROM mail.message_search_stale WHERE seq > ? AND seq <= ?)",
            changed,
        )
        await txn.execute(
            f"DELETE FROM message_search WHERE rowid IN (SELECT {search_rowid('org_id', 'id')}"
            f" FROM mail.inbound_message WHERE id IN ({_CHANGED_IDS}))",
            changed,
        )
    if stale["n"] < INDEX_BATCH:
        # Fewer than a batch: none are queued after them (in this step's snapshot).
        return stale["last"], stale["n"], False
    await txn.execute("SELECT EXISTS (SELECT 1 FROM mail.message_search_stale WHERE seq > ?) AS more", (stale["last"],))
    return stale["last"], stale["n"], bool(txn.fetchone()["more"])


async def _batch(txn: IDatabaseTransaction, query: str, bound: int) -> tuple[int | None, int]:
    """L{_NEWER} or L{_OLDER} from C{bound}: the edge id of the batch, and how many."""
    await txn.execute(query, (bound, INDEX_BATCH))
    row = txn.fetchone()
    return row["edge"], row["n"]


async def forget_stale(txn: IDatabaseTransaction, done: int) -> None:
    """In the database: the queue of changes the search index has dealt with, up to C{done}, emptied."""
    await txn.execute("DELETE FROM message_search_stale WHERE seq <= ?", (done,))


async def pg_index_built(txn: IDatabaseTransaction) -> bool:
    """
    Whether PostgreSQL's search indexes are all there and usable (a CREATE
    INDEX CONCURRENTLY may have been cut short), and the single index of
    before them gone.
    """
    names = ", ".join(f"'{name}'" for name in PG_SEARCH_INDEXES)
    await txn.execute(
        "SELECT COUNT(*) AS valid, to_regclass(?) IS NULL AS replaced FROM pg_index x"
        f" JOIN pg_class c ON c.oid = x.indexrelid WHERE c.relname IN ({names}) AND x.indisvalid",
        (PG_SEARCH_INDEX,),
    )
    row = txn.fetchone()
    return row["valid"] == PG_SEARCH_BUCKETS and bool(row["replaced"])


def _partial_index(name: str, bucket: int) -> str:
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON inbound_message USING gin (("
        + SEARCH_TEXT.replace("m.", "") + f") gin_trgm_ops) WHERE org_id % {PG_SEARCH_BUCKETS} = {bucket}"
    )


PG_STEPS = (
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    # An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index behind: drop it and build again.
    "DO $$ DECLARE broken text; BEGIN FOR broken IN SELECT c.relname FROM pg_index x"
    " JOIN pg_class c ON c.oid = x.indexrelid WHERE c.relname LIKE '" + PG_SEARCH_INDEX + "_%' AND NOT x.indisvalid"
    " LOOP EXECUTE 'DROP INDEX ' || quote_ident(broken); END LOOP; END $$",
    # Statistics of the searched text: how common a text is tells the planner
    # whether to read the organisation's newest rows until a page is full (a
    # common text) or the index's matches (a rare one). PostgreSQL takes none
    # from a partial index's expression.
    "CREATE STATISTICS IF NOT EXISTS inbound_message_search_text ON (" + SEARCH_TEXT.replace("m.", "") + ") FROM inbound_message",
    # That the bucket follows from the organisation: else the planner takes its
    # condition for a second filter and every text for a rare one.
    f"CREATE STATISTICS IF NOT EXISTS inbound_message_search_bucket (dependencies)"
    f" ON org_id, (org_id % {PG_SEARCH_BUCKETS}) FROM inbound_message",
    "ANALYZE inbound_message",
    *(_partial_index(name, bucket) for bucket, name in enumerate(PG_SEARCH_INDEXES)),
    # The single index over every organisation, from before the partial ones.
    "DROP INDEX CONCURRENTLY IF EXISTS " + PG_SEARCH_INDEX,
)


def describe_progress(below: int | None) -> str:
    """A line about the index: complete (C{below} 0 or None), or how far the filling of older messages got."""
    return "search index: complete" if not below else f"search index: messages below id {below} still to index"

