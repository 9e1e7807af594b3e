"""
SQLite's search index in a file of its own (issue 28): written behind
intake by its own connection, so its merges never hold a message insert;
searches find what it does not hold yet; what is erased leaves it; a lost or
stale file is filled again. The daemon's loop that keeps it up to date, on a
Clock.
"""

import os
import random
import sqlite3
import threading

from twisted.internet import defer, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage import search_indexing
from mailingest.storage.engines import sqlite as sqlite_engine
from mailingest.storage.engines.sqlite import SqliteEngine, damaged_search_path
from mailingest.storage.store import Store
from mailingest.storage.stores.base import StorableTransaction
from mailingest.storage.stores import search
from tests.store_contract import message


class SearchIndexCase(TestCase):
    """A SQLite store of ten indexed messages of the organisation acme, and ways to look at its index."""

    @defer.inlineCallbacks
    def setUp(self):
        self.path = self.mktemp() + ".db"
        self.open_engines = set()
        self.store = yield self.open_store()
        self.acme = (yield self.store.add_org("acme", "Acme"))["id"]
        self.ids = yield self.store.insert_messages(
            [message(self.acme, f"<m{n}@x>", n, subject=f"Order {n} for Widgets") for n in range(10)]
        )
        yield self.store.index_search()

    @defer.inlineCallbacks
    def open_store(self, migrate=True):
        engine = SqliteEngine(self.path)
        self.open_engines.add(engine)
        self.addCleanup(lambda: engine in self.open_engines and engine.close())
        store = Store(engine, MESSAGE_EVENTS)
        if migrate:
            yield store.migrate()
        return store

    def found(self, text, store=None, **kwargs):
        d = (store or self.store).search_messages(self.acme, text=text, limit=100, **kwargs)
        return d.addCallback(lambda rows: [row["id"] for row in rows])

    def indexed(self, text):
        """The message ids the index's own file holds for C{text} (read there, not through a search)."""

        def read(txn):
            return txn.execute(
                "SELECT rowid FROM message_search WHERE message_search MATCH ? ORDER BY rowid", (search.fts_query(text),)
            ).addCallback(lambda _: [search.SEARCH_ORG_SPAN * (self.acme + 1) - row["rowid"] for row in txn.fetchall()])

        return self.store.engine.search_index(read)

    def stale(self):
        def read(txn):
            return txn.execute("SELECT COUNT(*) AS n FROM message_search_stale").addCallback(lambda _: txn.fetchone()["n"])

        return self.store.engine.interaction(read)

    @defer.inlineCallbacks
    def secret_indexed(self):
        """A parsed message that says "Secret Merger Plans", in the index; its id."""
        [secret] = yield self.store.insert_messages(
            [message(self.acme, "<merger@x>", 40, subject="Secret Merger Plans", mail_from="ceo@rival.example")]
        )

        def parsed(txn):
            return txn.execute("UPDATE inbound_message SET status = 'parsed' WHERE id = ?", (secret,))

        yield self.store.engine.interaction(parsed)
        yield self.store.index_search()
        self.assertEqual((yield self.indexed("merger plans")), [secret])
        return secret

    def close_store(self) -> defer.Deferred:
        self.open_engines.remove(self.store.engine)
        return self.store.engine.close()

    @defer.inlineCallbacks
    def files_restored(self, suffixes, change):
        """
        The files of the database (suffix "") or of the index ("-search")
        copied with the store closed, C{change} made, then the copies put
        back: a backup restored. The store is open again.
        """
        yield self.close_store()
        saved = {}
        for suffix in suffixes:
            for extra in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix + extra):
                    with open(self.path + suffix + extra, "rb") as f:
                        saved[suffix + extra] = f.read()
        self.store = yield self.open_store()
        yield change()
        yield self.close_store()
        for suffix in suffixes:
            for extra in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix + extra):
                    os.remove(self.path + suffix + extra)
        for name, data in saved.items():
            with open(self.path + name, "wb") as f:
                f.write(data)
        self.store = yield self.open_store()


class SearchIndexFileTests(SearchIndexCase):
    @defer.inlineCallbacks
    def test_index_lives_in_its_own_file(self):
        self.assertTrue(os.path.exists(self.path + "-search"))
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)

        def tables(txn):
            return txn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'message_search%'").addCallback(
                lambda _: [row["name"] for row in txn.fetchall()]
            )

        self.assertEqual((yield self.store.engine.interaction(tables)), ["message_search_stale"])

    @defer.inlineCallbacks
    def test_insert_not_held_by_the_index(self):
        """
        While a transaction of the index is open (FTS5 merging its segments
        for a second, say), messages are stored: the index holds its own
        file's lock only, and reads the database at a snapshot.
        """
        inside, release = threading.Event(), threading.Event()

        def long_step(txn):
            # The engine took the index file's write lock as the transaction began; it holds it meanwhile.
            inside.set()
            release.wait(10)
            return defer.succeed(None)

        step = self.store.engine.search_index(long_step)
        finished = []
        step.addBoth(lambda result: finished.append(True) or result)
        self.addCleanup(release.set)
        yield threads.deferToThread(inside.wait, 5)
        self.assertTrue(inside.is_set())
        stored = yield self.store.insert_messages([message(self.acme, "<during@x>", 50, subject="Widgets meanwhile")])
        self.assertFalse(release.is_set(), "the insert waited for the index")
        self.assertEqual(finished, [])
        release.set()
        yield step
        self.assertIn(stored[0], (yield self.found("widgets meanwhile")))

    @defer.inlineCallbacks
    def test_another_process_holding_the_index_file_holds_no_insert(self):
        holder = sqlite3.connect(self.path + "-search", isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        yield self.store.insert_messages([message(self.acme, "<held@x>", 60, subject="Held Widgets")])
        holder.execute("ROLLBACK")

    @defer.inlineCallbacks
    def test_search_finds_what_the_index_does_not_hold_yet(self):
        """The newest messages are read until the index takes them; with filters and a cursor, in the order of the whole."""
        new = yield self.store.insert_messages(
            [message(self.acme, f"<n{n}@x>", 30 + n, subject=f"New widgets {n}", mail_from=f"b{n % 2}@x") for n in range(4)]
        )
        self.assertEqual((yield self.indexed("new widgets")), [])
        everything = new[::-1] + self.ids[::-1]
        self.assertEqual((yield self.found("widgets")), everything)
        page = yield self.store.search_messages(self.acme, text="widgets", limit=3)
        self.assertEqual([row["id"] for row in page], everything[:3])
        self.assertEqual((yield self.found("widgets", before_id=everything[2])), everything[3:])
        self.assertEqual((yield self.found("widgets", sender="B1@x")), [new[3], new[1]])
        yield self.store.index_search()
        self.assertEqual(sorted((yield self.indexed("new widgets"))), new)
        self.assertEqual((yield self.found("widgets")), everything)

    @defer.inlineCallbacks
    def test_index_far_behind_an_organisation_reads_its_rows(self):
        self.patch(search, "WINDOW_MESSAGES", 3)
        new = yield self.store.insert_messages([message(self.acme, f"<n{n}@x>", 30 + n, subject="More widgets") for n in range(3)])
        self.assertEqual((yield self.found("widgets")), new[::-1] + self.ids[::-1])

    @defer.inlineCallbacks
    def test_erased_text_leaves_the_index(self):
        """
        An erasure replaces a message's sender, subject and Message-ID: a
        search for what they were finds nothing, at once (before the index
        has dealt with it) and after, and the index no longer holds it.
        """
        secret = yield self.secret_indexed()
        self.assertEqual((yield self.found("merger plans")), [secret])
        yield self.store.erase_message(secret, "test")
        self.assertGreater((yield self.stale()), 0)
        self.assertEqual((yield self.found("merger plans")), [])
        self.assertEqual((yield self.found("rival.example")), [])
        yield self.store.index_search()
        self.assertEqual((yield self.indexed("merger plans")), [])
        self.assertEqual((yield self.indexed("rival.example")), [])
        self.assertEqual((yield self.stale()), 0)
        self.assertEqual((yield self.found("widgets")), self.ids[::-1])

    def file_holds(self, suffix, texts):
        """Which of C{texts} the file of the database (suffix "") or of the index ("-search") holds, byte for byte, the store closed."""
        with open(self.path + suffix, "rb") as f:
            data = f.read()
        return [text for text in texts if text.encode() in data]

    @defer.inlineCallbacks
    def secret_texts(self):
        """
        What L{secret_indexed}'s message leaves in the files: its subject and
        sender, and the trigrams of both the index's file does not hold yet
        (the other messages', the schema's own text tell nothing).
        """
        trigrams = sorted({text[n:n + 3] for text in ("secret merger plans", "ceo@rival.example") for n in range(len(text) - 2)})
        yield self.close_store()
        held = self.file_holds("-search", trigrams)
        self.store = yield self.open_store()
        return ["Secret Merger Plans", "rival.example", *(t for t in trigrams if t not in held)]

    def test_erased_text_leaves_the_files(self):
        """
        What an erasure replaces is gone from both files, not only from what
        a search finds: FTS5 keeps a deleted row's entries (here, the
        trigrams of its subject and sender) in its segments until a merge
        reaches them, and SQLite the bytes of what it deletes.
        """
        return self.erased_text_leaves_the_files()

    def test_erased_text_leaves_the_files_whatever_the_batch(self):
        """The erasure queues two changes: the index deals with them in full batches of one, then with none left."""
        self.patch(search, "INDEX_BATCH", 1)
        return self.erased_text_leaves_the_files()

    @defer.inlineCallbacks
    def erased_text_leaves_the_files(self):
        texts = yield self.secret_texts()
        secret = yield self.secret_indexed()
        yield self.close_store()
        held = self.file_holds("-search", texts)
        self.assertIn("Secret Merger Plans", held)
        self.assertGreater(len(held), 10, held)
        self.assertIn("Secret Merger Plans", self.file_holds("", texts))
        self.store = yield self.open_store()
        yield self.store.erase_message(secret, "test")
        yield self.store.index_search()
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        yield self.close_store()
        self.assertEqual(self.file_holds("-search", texts), [])
        self.assertEqual(self.file_holds("", texts[:2]), [])

    @defer.inlineCallbacks
    def test_erased_fields_zeroed_in_the_database_file(self):
        """
        SQLite leaves what an UPDATE replaces in the page's free space; the
        engine's connections overwrite it (secure_delete), so the bytes of
        an erased subject and sender are not in the file after the erasure.
        """
        [secret] = yield self.store.insert_messages(
            [message(self.acme, "<quokka@x>", 41, subject="Zanzibar Quokka Takeover " * 12, mail_from="cfo@quokka.example")]
        )

        def parsed(txn):
            return txn.execute("UPDATE inbound_message SET status = 'parsed' WHERE id = ?", (secret,))

        yield self.store.engine.interaction(parsed)
        yield self.close_store()
        self.assertEqual(self.file_holds("", ["Zanzibar Quokka", "quokka.example"]), ["Zanzibar Quokka", "quokka.example"])
        self.store = yield self.open_store()
        yield self.store.erase_message(secret, "test")
        yield self.close_store()
        self.assertEqual(self.file_holds("", ["Zanzibar Quokka", "quokka.example"]), [])

    def rewriting(self):
        def read(txn):
            return txn.execute("SELECT rewrite FROM search_progress").addCallback(lambda _: txn.fetchone()["rewrite"])

        return self.store.engine.search_index(read)

    @defer.inlineCallbacks
    def test_rewrite_in_parts_taking_nothing_else_meanwhile(self):
        """
        The rewrite after an erasure is made a part at a time, one
        transaction each, and the index takes no new message until it ends
        (a search finds it meanwhile); a daemon stopped halfway goes on with
        it at its next start.
        """
        self.patch(search, "REWRITE_PAGES", 1)
        for batch in range(3):
            # Segments of their own, for the rewrite to merge.
            yield self.store.insert_messages(
                [message(self.acme, f"<b{batch}.{n}@x>", 20, subject=f"Widgets {batch * 1000 + n:x} {n * 7919 % 1000:x}") for n in range(300)]
            )
            yield self.store.index_search()
        texts = yield self.secret_texts()
        secret = yield self.secret_indexed()
        yield self.store.erase_message(secret, "test")
        step = yield self.store.engine.search_index(search.index_step)
        self.assertTrue(step.more)
        self.assertEqual((yield self.rewriting()), 1)
        [during] = yield self.store.insert_messages([message(self.acme, "<during@x>", 60, subject="Fresh gadgets")])
        yield self.store.engine.search_index(search.index_step)
        self.assertEqual((yield self.rewriting()), 1)
        yield self.close_store()
        self.store = yield self.open_store()
        # The daemon's loop, stopping: one transaction, and the rest at the next start.
        yield self.store.index_search(lambda: False)
        self.assertEqual((yield self.rewriting()), 1)
        parts = 2
        while (yield self.rewriting()):
            self.assertEqual((yield self.indexed("fresh gadgets")), [])
            self.assertEqual((yield self.found("fresh gadgets")), [during])
            yield self.store.engine.search_index(search.index_step)
            parts += 1
        self.assertGreater(parts, 2)
        yield self.store.index_search()
        self.assertEqual((yield self.indexed("fresh gadgets")), [during])
        yield self.close_store()
        self.assertEqual(self.file_holds("-search", texts), [])

    @defer.inlineCallbacks
    def test_search_file_of_before_the_rewrite_used(self):
        """A search file made before the rewrite after erasures had its column gets it, and is kept."""
        yield self.close_store()
        older = sqlite3.connect(self.path + "-search")
        older.execute("ALTER TABLE search_progress DROP COLUMN rewrite")
        older.close()
        self.store = yield self.open_store()
        self.assertEqual((yield self.rewriting()), 0)
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        secret = yield self.secret_indexed()
        yield self.store.erase_message(secret, "test")
        yield self.store.index_search()
        self.assertEqual((yield self.found("merger plans")), [])

    @defer.inlineCallbacks
    def test_search_wal_shrinks_after_the_rewrite(self):
        """The rewrite after an erasure passes the whole index through the WAL, which does not keep that size."""
        self.patch(sqlite_engine, "SEARCH_WAL_LIMIT", 0)
        yield self.close_store()
        self.store = yield self.open_store()
        yield self.store.insert_messages([message(self.acme, f"<w{n}@x>", 50 + n, subject=f"Widgets {n} " * 20) for n in range(200)])
        yield self.store.index_search()
        secret = yield self.secret_indexed()
        wal = self.path + "-search-wal"
        before = os.path.getsize(wal)
        yield self.store.erase_message(secret, "test")
        yield self.store.index_search()
        rewritten = os.path.getsize(wal)
        self.assertGreater(rewritten, before)
        # The checkpoint SQLite makes once the WAL holds 1,000 pages (at a million messages, within the rewrite).
        checkpoint = sqlite3.connect(self.path + "-search")
        self.addCleanup(checkpoint.close)
        self.assertEqual(checkpoint.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0], 0)
        yield self.store.insert_messages([message(self.acme, "<after@x>", 300)])
        yield self.store.index_search()
        self.assertLess(os.path.getsize(wal), rewritten / 2)

    @defer.inlineCallbacks
    def test_index_emptied_leaves_nothing_of_before(self):
        """An index that did not belong with its database is emptied: what it held leaves the file too."""
        texts = yield self.secret_texts()
        secret = yield self.secret_indexed()

        @defer.inlineCallbacks
        def erase():
            yield self.store.erase_message(secret, "test")
            # The index deals with it, and the database forgets the change.
            yield self.store.index_search()

        yield self.files_restored(["-search"], erase)
        yield self.close_store()
        self.assertGreater(len(self.file_holds("-search", texts)), 10)
        self.store = yield self.open_store()
        yield self.store.index_search()
        self.assertEqual((yield self.found("merger plans")), [])
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        yield self.close_store()
        self.assertEqual(self.file_holds("-search", texts), [])

    @defer.inlineCallbacks
    def test_changed_message_indexed_with_what_it_now_says(self):
        def retitle(txn):
            return txn.execute("UPDATE inbound_message SET subject = 'Renamed Gadgets' WHERE id = ?", (self.ids[3],))

        yield self.store.engine.interaction(retitle)
        yield self.store.index_search()
        self.assertEqual((yield self.indexed("renamed gadgets")), [self.ids[3]])
        self.assertNotIn(self.ids[3], (yield self.indexed("widgets")))
        self.assertEqual((yield self.found("renamed gadgets")), [self.ids[3]])

    def retitle(self, ids, subject):
        def change(txn):
            return txn.execute(
                f"UPDATE inbound_message SET subject = ? WHERE id IN ({', '.join('?' * len(ids))})", (subject, *ids)
            )

        return self.store.engine.interaction(change)

    @defer.inlineCallbacks
    def test_changed_message_found_by_what_it_now_says_at_once(self):
        """
        Before the index has dealt with a change, the changed messages are
        found by what they now say, not by what they said, in the order of
        the whole, with a cursor, a filter and a short page.
        """
        changed = [self.ids[3], self.ids[7]]
        yield self.retitle(changed, "Renamed Gadgets")
        self.assertGreater((yield self.stale()), 0)
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        unchanged = [id for id in self.ids[::-1] if id not in changed]
        for when in ("queued", "dealt with"):
            self.assertEqual((yield self.found("renamed gadgets")), changed[::-1], when)
            self.assertEqual((yield self.found("gadgets", before_id=changed[1])), [changed[0]], when)
            self.assertEqual((yield self.found("gadgets", status="received")), changed[::-1], when)
            self.assertEqual((yield self.found("gadgets", status="parsed")), [], when)
            page = yield self.store.search_messages(self.acme, text="e", limit=3)
            self.assertEqual([row["id"] for row in page], self.ids[::-1][:3], when)
            page = yield self.store.search_messages(self.acme, text="gets", limit=5)
            self.assertEqual([row["id"] for row in page], self.ids[::-1][:5], when)
            self.assertEqual((yield self.found("widgets")), unchanged, when)
            yield self.store.index_search()
        self.assertEqual((yield self.stale()), 0)

    @defer.inlineCallbacks
    def test_changed_messages_found_by_a_windowed_search(self):
        """The search index stopped by the time limit reads windows: the changed messages come in their window."""
        self.patch(search, "INDEX_WINDOW_MESSAGES", 4)
        yield self.retitle([self.ids[1], self.ids[8]], "Order Gadgets")
        self.patch(StorableTransaction, "read_within", lambda txn, seconds, sql, args=(): defer.succeed(None))
        got, cursor = [], None
        while True:
            rows = yield self.store.search_messages(self.acme, text="order", before_id=cursor, limit=3)
            got += [row["id"] for row in rows]
            if rows.searched_to is None and len(rows) < 3:
                break
            cursor = rows.searched_to["id"] if rows.searched_to is not None else rows[-1]["id"]
        self.assertEqual(got, self.ids[::-1])
        self.assertEqual((yield self.found("gadgets")), [self.ids[8], self.ids[1]])

    @defer.inlineCallbacks
    def test_many_changes_queued_reads_the_rows(self):
        """As many changes queued as a window of messages: the search reads the organisation's messages instead."""
        self.patch(search, "WINDOW_MESSAGES", 3)
        yield self.retitle(self.ids[:3], "Renamed Gadgets")
        self.assertEqual((yield self.stale()), 3)
        self.assertEqual((yield self.found("renamed gadgets")), self.ids[:3][::-1])
        self.assertEqual((yield self.found("widgets")), self.ids[3:][::-1])

    @defer.inlineCallbacks
    def test_lost_index_file_filled_again(self):
        for suffix in ("-search", "-search-wal", "-search-shm"):
            if os.path.exists(self.path + suffix):
                os.remove(self.path + suffix)
        store = yield self.open_store()
        self.assertEqual((yield self.found("widgets", store)), self.ids[::-1])
        yield store.build_indexes()
        self.assertEqual(sorted((yield store.engine.search_index(lambda txn: txn.execute(
            "SELECT rowid FROM message_search").addCallback(lambda _: [r["rowid"] for r in txn.fetchall()])))), sorted(
            search.SEARCH_ORG_SPAN * (self.acme + 1) - i for i in self.ids))
        self.assertEqual((yield self.found("widgets", store)), self.ids[::-1])

    @defer.inlineCallbacks
    def test_index_ahead_of_the_database_filled_again(self):
        """An index newer than its database (the database restored from a backup) is emptied and filled from the database."""

        def ahead(txn):
            txn.execute("INSERT INTO message_search (rowid, subject, mail_from, message_id) VALUES (?, 'Ghost widgets', '', '')",
                        (search.SEARCH_ORG_SPAN * (self.acme + 1) - 500,))
            return txn.execute("UPDATE search_progress SET high = 501")

        yield self.store.engine.search_index(ahead)
        self.assertIn(500, (yield self.indexed("ghost")))
        yield self.store.build_indexes()
        self.assertEqual((yield self.indexed("ghost")), [])
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        [late] = yield self.store.insert_messages([message(self.acme, "<late@x>", 70, subject="Late widgets")])
        yield self.store.index_search()
        self.assertIn(late, (yield self.indexed("late widgets")))


    @defer.inlineCallbacks
    def test_index_behind_its_databases_changes_filled_again(self):
        """
        The index's file restored from before an erasure whose queue the
        database has since forgotten: it would still hold the erased text at
        the message's rowid, so it is emptied and filled from the database.
        """
        secret = yield self.secret_indexed()

        @defer.inlineCallbacks
        def erase():
            yield self.store.erase_message(secret, "test")
            yield self.store.index_search()
            yield self.store.build_indexes()
            self.assertEqual((yield self.stale()), 0)

        yield self.files_restored(["-search"], erase)
        self.assertEqual((yield self.indexed("merger plans")), [secret])
        yield self.store.index_search()
        self.assertEqual((yield self.indexed("merger plans")), [])
        self.assertEqual((yield self.found("merger plans")), [])
        yield self.store.build_indexes()
        self.assertEqual((yield self.indexed("merger plans")), [])
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)

    @defer.inlineCallbacks
    def test_index_ahead_of_the_databases_changes_filled_again(self):
        """
        The database restored from before an erasure, no message having come
        since: the index, which took the erased text out, is emptied and
        filled, and the restored message is found by what it says again.
        """
        secret = yield self.secret_indexed()

        @defer.inlineCallbacks
        def erase():
            yield self.store.erase_message(secret, "test")
            yield self.store.index_search()
            self.assertEqual((yield self.indexed("merger plans")), [])

        yield self.files_restored([""], erase)
        yield self.store.index_search()
        yield self.store.build_indexes()
        self.assertEqual((yield self.indexed("merger plans")), [secret])
        self.assertEqual((yield self.found("merger plans")), [secret])


class UnreadableSearchFileTests(SearchIndexCase):
    """
    A search file SQLite cannot read (damaged, or not a database) is moved
    aside and made again, at start-up or when a read or the index's loop
    meets it; mail and every other read go on meanwhile.
    """

    def warnings(self):
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        return logged

    def damage(self, path):
        """Every page of C{path} but the first (the schema) overwritten with noise, its WAL moved into it first."""
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        size = os.path.getsize(path)
        self.assertGreater(size, 8192)
        with open(path, "r+b") as f:
            f.seek(4096)
            f.write(random.Random(7).randbytes(size - 4096))

    def aside(self):
        return damaged_search_path(self.store.engine.search_path)

    def remade(self, logged):
        return [e for e in logged if "could not be read" in e.get("log_format", "")]

    @defer.inlineCallbacks
    def test_not_a_database_at_start_moved_aside_and_made_again(self):
        yield self.close_store()
        with open(self.path + "-search", "wb") as f:
            f.write(b"not a database, and longer than SQLite's header" * 100)
        logged = self.warnings()
        self.store = yield self.open_store()
        self.assertEqual(len(self.remade(logged)), 1)
        with open(self.aside(), "rb") as f:
            self.assertTrue(f.read().startswith(b"not a database"))
        self.assertEqual((yield self.found("widgets")), self.ids[::-1])
        [late] = yield self.store.insert_messages([message(self.acme, "<late@x>", 70, subject="Late widgets")])
        yield self.store.build_indexes()
        self.assertEqual(sorted((yield self.indexed("widgets"))), sorted([*self.ids, late]))

    @defer.inlineCallbacks
    def test_damaged_file_met_by_a_search_made_again(self):
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        self.damage(self.store.engine.search_path)
        logged = self.warnings()
        # The search that meets it waits for the check and the new file, and reads again: the messages, as the index is empty.
        self.assertEqual((yield self.found("widgets")), self.ids[::-1])
        self.assertEqual(len(self.remade(logged)), 1)
        self.assertTrue(os.path.exists(self.aside()))
        self.assertEqual((yield self.indexed("widgets")), [])
        yield self.store.build_indexes()
        self.assertEqual(sorted((yield self.indexed("widgets"))), self.ids)
        self.assertEqual((yield self.found("order 3 for")), [self.ids[3]])

    @defer.inlineCallbacks
    def test_damaged_file_met_by_the_index_made_again(self):
        self.damage(self.store.engine.search_path)
        [late] = yield self.store.insert_messages([message(self.acme, "<late@x>", 70, subject="Late widgets")])
        logged = self.warnings()
        yield self.assertFailure(self.store.index_search(), sqlite3.DatabaseError)
        self.assertEqual(len(self.remade(logged)), 1)
        yield self.store.build_indexes()
        self.assertEqual(sorted((yield self.indexed("widgets"))), sorted([*self.ids, late]))

    @defer.inlineCallbacks
    def test_damaged_database_leaves_the_search_file_alone(self):
        """It is the database SQLite cannot read: the search file passes its check and stays; checked once a minute at most."""
        yield self.close_store()
        self.damage(self.path)
        self.store = yield self.open_store(migrate=False)
        logged = self.warnings()
        checks = []
        check = sqlite_engine._search_file_problem
        self.patch(sqlite_engine, "_search_file_problem", lambda path: checks.append(path) or check(path))
        for _ in range(3):
            yield self.assertFailure(self.found("widgets"), sqlite3.DatabaseError)
        # The index's own transaction cannot attach the database either; it comes after the check.
        yield self.assertFailure(self.store.engine.search_index(lambda txn: txn.execute("SELECT 1")), sqlite3.DatabaseError)
        self.assertEqual(checks, [self.store.engine.search_path])
        self.assertEqual(self.remade(logged), [])
        self.assertFalse(os.path.exists(self.aside()))
        conn = sqlite3.connect(self.store.engine.search_path)
        try:
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM message_search").fetchone()[0], len(self.ids))
        finally:
            conn.close()


class FakeSchemaStore:
    def __init__(self):
        self.calls = 0
        self.failing = False

    def index_search(self, keep_going=lambda: True):
        self.calls += 1
        self.keep_going = keep_going
        if self.failing:
            return defer.fail(OSError("disk full"))
        return defer.succeed(None)


class SearchIndexServiceTests(TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.store = FakeSchemaStore()
        self.service = search_indexing.SearchIndexService(self.store, clock=self.clock)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def lines(self):
        return [event["log_format"] for event in self.logged if event.get("log_namespace", "").endswith("search_indexing")]

    def test_runs_every_interval(self):
        self.service.startService()
        self.assertEqual(self.store.calls, 1)
        self.clock.advance(search_indexing.INTERVAL)
        self.clock.advance(search_indexing.INTERVAL)
        self.assertEqual(self.store.calls, 3)
        self.service.stopService()
        self.clock.advance(10)
        self.assertEqual(self.store.calls, 3)

    def test_a_stop_ends_the_run_between_transactions(self):
        self.service.startService()
        self.assertTrue(self.store.keep_going())
        self.service.stopService()
        self.assertFalse(self.store.keep_going())

    def test_failures_logged_once_a_spell(self):
        self.store.failing = True
        self.service.startService()
        self.addCleanup(self.service.stopService)
        for _ in range(3):
            self.clock.advance(search_indexing.INTERVAL)
        self.assertEqual(self.store.calls, 4)
        self.assertEqual(self.lines(), ["search index: not kept up to date: {error}"])
        self.store.failing = False
        self.clock.advance(search_indexing.INTERVAL)
        self.assertEqual(self.lines()[1:], ["search index: kept up to date again"])
