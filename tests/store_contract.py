"""
What every L{mailingest.interfaces.IStore} must do, whatever its database.

L{StoreContract} is mixed into one TestCase per engine (see C{test_store}),
so SQLite and PostgreSQL are held to the same behaviour by the same tests.
"""

import os
import time
from datetime import datetime, timedelta, timezone

from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailingest.errors import DomainTaken, NoSuchDomain, NoSuchMessage, NoSuchOrg, NotQuarantined, OrgExists
from mailingest.interfaces import (
    Collision, Duplicate, IBlobReferences, IDomainRoutes, IDomainStore, IExtractionQueue, IHoldStore, IIntakeStore, IOrgStore,
    IOutboxStore, IQuarantineStore, IReadStore, IRetentionStore, ISchemaStore, ISearchStore, IStore,
)
from mailingest.delivery.routing import POSTMASTER_SLUG
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.engines import IDatabaseTransaction, IEngine
from mailingest.storage.store import Store, migrations

ROLES = (
    ISchemaStore, IOrgStore, IIntakeStore, IBlobReferences, IExtractionQueue, IQuarantineStore, IOutboxStore, IReadStore,
    ISearchStore, IRetentionStore, IHoldStore, IDomainStore, IDomainRoutes,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

# The schema files as they were until issue 13, one tree per engine, kept to
# prove that a database they migrated is taken as it is.
FORMER_SCHEMA = os.path.join(os.path.dirname(__file__), "data", "schema_before_issue13")

# SPEC section 5: these tables and columns, these indexes (as column lists).
TABLES = {
    "organization": {"id", "slug", "name", "active", "created_at"},
    "inbound_message": {
        "id", "org_id", "source", "source_message_id", "mail_from", "rcpt_to", "subject",
        "raw_key", "raw_size", "raw_sha256", "status", "attempts", "last_error",
        "received_at", "parsed_at", "content_sha256", "message_id_collision",
    },
    "document": {
        "id", "org_id", "inbound_message_id", "filename", "content_type", "size", "sha256",
        "storage_key", "created_at",
    },
}
INDEXES = {
    "organization": [("slug",)],
    "inbound_message": [
        ("org_id", "source", "source_message_id"),
        ("org_id", "received_at"),
        # Issue 28: the pages of an organisation, unfiltered and by status, newest first by id.
        ("org_id", "id"),
        ("org_id", "status", "id"),
    ],
}


def message(org_id: int, message_id: str, minutes: int = 0, **fields) -> dict:
    """An C{inbound_message} row as the SMTP side hands it to the store."""
    row = {
        "org_id": org_id,
        "source": "smtp",
        "source_message_id": message_id,
        "mail_from": "buyer@example.net",
        "rcpt_to": "orders+acme@example.com",
        "subject": f"order {message_id}",
        "raw_key": f"raw/{message_id}",
        "raw_size": 123,
        "raw_sha256": "ab" * 32,
        "received_at": T0 + timedelta(minutes=minutes),
    }
    row.update(fields)
    return row


class StoreContract:
    """
    The contract tests. Subclasses provide L{make_store}, L{columns} and
    L{indexes}; each test gets a fresh, migrated store.
    """

    def make_store(self):
        """
        A migrated L{mailingest.storage.store.Store} on an empty database (or
        a Deferred of it), closed by a cleanup.
        """
        raise NotImplementedError

    def columns(self, txn, table: str):
        """In an interaction: a Deferred of the set of C{table}'s column names."""
        raise NotImplementedError

    def indexes(self, txn, table: str):
        """In an interaction: a Deferred of the set of C{table}'s indexes, as column tuples."""
        raise NotImplementedError

    former_schema = ""
    """The engine's folder in L{FORMER_SCHEMA}."""

    def read_only_store(self):
        """
        A store on this test's migrated database (or a Deferred of it) that
        reads it but cannot write to it, closed by a cleanup.
        """
        raise NotImplementedError

    def another_engine(self):
        """An engine on another empty database (or a Deferred of it), closed by a cleanup."""
        raise NotImplementedError

    def describe_schema(self, txn):
        """
        In an interaction: a Deferred of what the schema is, comparable
        between two databases: columns with their types as the engine treats
        them, nullability and defaults; indexes; constraints; the rows the
        migrations inserted.
        """
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.store = yield self.make_store()

    def test_roles(self):
        """The store provides each role, and the whole L{IStore}, as its callers name them."""
        for role in ROLES:
            self.assertTrue(verifyObject(role, self.store), role)
        self.assertTrue(verifyObject(IStore, self.store))

    def test_engine(self):
        """The engine under the store provides L{IEngine}, the stores' only way to the database."""
        self.assertTrue(verifyObject(IEngine, self.store.engine))

    @defer.inlineCallbacks
    def test_interactions_get_a_database_transaction(self):
        """What an interaction is given is the declared L{IDatabaseTransaction}, on every engine."""
        given = []

        def look(txn):
            given.append(verifyObject(IDatabaseTransaction, txn))
            return defer.succeed(None)

        yield self.store.engine.interaction(look)
        self.assertEqual(given, [True])

    @defer.inlineCallbacks
    def test_read_within_stops_a_slow_read_and_the_transaction_goes_on(self):
        """
        A read that takes longer than its limit is stopped by the database
        (seconds of counting, stopped at 0.05 s), what the transaction did
        before it is kept, and a read within its limit gives its rows.
        """
        slow = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000)"
            " SELECT MAX(x) AS top FROM c"
        )

        @defer.inlineCallbacks
        def run(txn):
            yield txn.execute("INSERT INTO organization (slug, name, created_at) VALUES (?, ?, ?)", ("slowpoke", "S", T0))
            started = time.monotonic()
            stopped = yield txn.read_within(0.05, slow)
            took = time.monotonic() - started
            quick = yield txn.read_within(5, "SELECT slug FROM organization WHERE slug = ?", ("slowpoke",))
            yield txn.execute("SELECT 1 AS one")
            return stopped, took, quick, txn.fetchall()

        stopped, took, quick, after = yield self.store.engine.interaction(run)
        self.assertIsNone(stopped)
        self.assertLess(took, 2.0)
        self.assertEqual(quick, [{"slug": "slowpoke"}])
        self.assertEqual(after, [{"one": 1}])
        self.assertIn("slowpoke", [o["slug"] for o in (yield self.added_orgs())])

    @defer.inlineCallbacks
    def test_reading_reads_and_refuses_to_write(self):
        @defer.inlineCallbacks
        def write(txn):
            yield txn.execute("INSERT INTO organization (slug, name, created_at) VALUES (?, ?, ?)", ("reader", "R", T0))

        @defer.inlineCallbacks
        def read(txn):
            yield txn.execute("SELECT slug FROM organization WHERE slug = ?", (POSTMASTER_SLUG,))
            return txn.fetchall()

        self.assertEqual((yield self.store.engine.reading(read)), [{"slug": POSTMASTER_SLUG}])
        yield self.assertFailure(self.store.engine.reading(write), Exception)
        self.assertNotIn("reader", [o["slug"] for o in (yield self.added_orgs())])

    @defer.inlineCallbacks
    def test_no_write_waits_behind_reads(self):
        """
        Four long reads at once (a console's searches), then a write (a
        message stored): the write is done before any of the reads.
        """
        done = []

        def slow(txn, n):
            d = txn.execute(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT MAX(x) AS top FROM c"
            )
            return d.addCallback(lambda _: done.append(f"read {n}"))

        def write(txn):
            d = txn.execute("INSERT INTO organization (slug, name, created_at) VALUES (?, ?, ?)", ("writer", "W", T0))
            return d.addCallback(lambda _: done.append("write"))

        reads = [self.store.engine.reading(slow, n) for n in range(4)]
        yield self.store.engine.interaction(write)
        yield defer.gatherResults(reads)
        self.assertEqual(done[0], "write", done)
        self.assertEqual(len(done), 5)

    @defer.inlineCallbacks
    def added_orgs(self):
        """The organisations, without the reserved one every schema has."""
        orgs = yield self.store.list_orgs()
        return [o for o in orgs if o["slug"] != POSTMASTER_SLUG]

    @defer.inlineCallbacks
    def two_orgs(self):
        acme = yield self.store.add_org("acme", "Acme Corp")
        globex = yield self.store.add_org("globex", "Globex")
        return acme["id"], globex["id"]

    # schema

    @defer.inlineCallbacks
    def test_migrate_is_idempotent(self):
        @defer.inlineCallbacks
        def versions(txn):
            yield txn.execute("SELECT version FROM schema_version ORDER BY version")
            return [row["version"] for row in txn.fetchall()]

        expected = [version for version, _, _ in migrations(self.store.engine)]
        self.assertEqual((yield self.store.engine.interaction(versions)), expected)
        self.assertEqual((yield self.store.migrate()), [])
        self.assertEqual((yield self.store.engine.interaction(versions)), expected)

    @defer.inlineCallbacks
    def test_a_database_migrated_by_the_former_files_is_taken_as_it_is(self):
        engine = yield self.another_engine()

        @defer.inlineCallbacks
        def migrate_as_before(txn):
            yield txn.execute(
                "CREATE TABLE schema_version"
                " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            folder = os.path.join(FORMER_SCHEMA, self.former_schema)
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name)) as f:
                    for statement in engine.script(f.read()):
                        yield txn.execute(statement)
                yield txn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (int(name.split("_")[0]), name, T0.isoformat()),
                )

        yield engine.interaction(migrate_as_before)
        former = Store(engine, MESSAGE_EVENTS)
        # Only the deltas written since the former layout are applied.
        former_versions = {int(name.split("_")[0]) for name in os.listdir(os.path.join(FORMER_SCHEMA, self.former_schema))}
        newer = [version for version, _, _ in migrations(engine) if version not in former_versions]
        self.assertTrue(newer)
        self.assertEqual((yield former.migrate()), newer)
        self.assertEqual(
            (yield engine.interaction(self.describe_schema)),
            (yield self.store.engine.interaction(self.describe_schema)),
        )
        org = yield former.add_org("acme", "Acme Corp")
        self.assertEqual(org["id"], 1)
        [row_id] = yield former.insert_messages([message(org["id"], "<a@example.net>")])
        self.assertEqual((yield former.get_message(row_id))["message_id_collision"], False)

    @defer.inlineCallbacks
    def test_schema_has_the_spec_tables_and_indexes(self):
        for table, wanted in TABLES.items():
            found = yield self.store.engine.interaction(self.columns, table)
            self.assertEqual(wanted - found, set(), table)
        for table, wanted in INDEXES.items():
            found = yield self.store.engine.interaction(self.indexes, table)
            for columns in wanted:
                # An index leading with these columns serves them (PostgreSQL's (org_id, received_at) ends with the id).
                self.assertIn(columns, {index[:len(columns)] for index in found}, table)

    @defer.inlineCallbacks
    def test_check(self):
        self.assertIsNone((yield self.store.check()))

    @defer.inlineCallbacks
    def test_database_that_takes_no_writes_is_neither_ready_nor_migrated(self):
        """Read-only (a file, a file system remounted so, a standby server): a read would answer, nothing could be stored."""
        store = yield self.read_only_store()
        yield self.assertFailure(store.check(), Exception)
        yield self.assertFailure(store.migrate(), Exception)
        self.assertIsNone((yield self.store.check()))

    # organisations

    @defer.inlineCallbacks
    def test_add_and_get_org(self):
        org = yield self.store.add_org("Acme", "Acme Corp")
        self.assertEqual(
            (org["slug"], org["name"], org["active"]), ("acme", "Acme Corp", True)
        )
        self.assertIsInstance(org["id"], int)
        for slug in ("acme", "ACME", "aCmE"):
            found = yield self.store.get_org(slug)
            self.assertEqual(
                (found["id"], found["slug"], found["active"]), (org["id"], "acme", True)
            )
        self.assertIsNone((yield self.store.get_org("nobody")))

    @defer.inlineCallbacks
    def test_add_existing_org_fails(self):
        yield self.store.add_org("acme", "Acme Corp")
        yield self.assertFailure(self.store.add_org("ACME", "Another"), OrgExists)
        orgs = yield self.added_orgs()
        self.assertEqual([(o["slug"], o["name"]) for o in orgs], [("acme", "Acme Corp")])

    @defer.inlineCallbacks
    def test_list_orgs_by_slug(self):
        for slug in ("zeta", "acme", "mu"):
            yield self.store.add_org(slug, slug.title())
        orgs = yield self.added_orgs()
        self.assertEqual([o["slug"] for o in orgs], ["acme", "mu", "zeta"])
        self.assertEqual({o["active"] for o in orgs}, {True})

    @defer.inlineCallbacks
    def test_set_org_active_and_active_orgs(self):
        acme, globex = yield self.two_orgs()
        reserved = {POSTMASTER_SLUG: 0}
        self.assertEqual((yield self.store.active_orgs()), {**reserved, "acme": acme, "globex": globex})
        row = yield self.store.set_org_active("GLOBEX", False)
        self.assertEqual((row["slug"], row["active"]), ("globex", False))
        self.assertEqual((yield self.store.active_orgs()), {**reserved, "acme": acme})
        self.assertFalse((yield self.store.get_org("globex"))["active"])
        yield self.store.set_org_active("globex", True)
        self.assertEqual((yield self.store.active_orgs()), {**reserved, "acme": acme, "globex": globex})

    @defer.inlineCallbacks
    def test_reserved_postmaster_organisation(self):
        """Issue 12 item 3: migration 003 makes it, with id 0, so the first organisation added is still 1."""
        org = yield self.store.get_org(POSTMASTER_SLUG)
        self.assertEqual((org["id"], org["active"]), (0, True))
        self.assertEqual((yield self.store.add_org("acme", ""))["id"], 1)

    @defer.inlineCallbacks
    def test_set_unknown_org_active_fails(self):
        yield self.assertFailure(self.store.set_org_active("nobody", False), NoSuchOrg)

    # inbound messages

    @defer.inlineCallbacks
    def test_insert_messages_skips_duplicates(self):
        acme, globex = yield self.two_orgs()
        ids = yield self.store.insert_messages(
            [message(acme, "<a@x>"), message(acme, "<a@x>", 1), message(globex, "<a@x>")]
        )
        self.assertEqual([isinstance(i, Duplicate) for i in ids], [False, True, False])
        self.assertEqual(ids[1], ids[0])
        self.assertNotEqual(ids[0], ids[2])
        again = yield self.store.insert_messages([message(globex, "<a@x>"), message(acme, "<b@x>")])
        self.assertEqual((again[0], type(again[0])), (ids[2], Duplicate))
        self.assertIs(type(again[1]), int)
        self.assertNotIn(again[1], ids)
        self.assertEqual((yield self.store.count_messages()), 3)

    @defer.inlineCallbacks
    def test_taken_message_id_with_other_content_is_stored_flagged(self):
        """Issue 11: a fake message taking a Message-ID must not suppress the real one."""
        acme, globex = yield self.two_orgs()
        fake, real = "fa" * 32, "2e" * 32
        [first] = yield self.store.insert_messages([message(acme, "<po@x>", content_sha256=fake)])
        [second, other_org] = yield self.store.insert_messages(
            [message(acme, "<po@x>", 1, content_sha256=real), message(globex, "<po@x>", 1, content_sha256=real)]
        )
        self.assertIs(type(second), Collision)
        self.assertIs(type(other_org), int)
        self.assertNotEqual(second, first)
        rows = {row["id"]: row for row in (yield self.store.list_messages())}
        self.assertEqual(len(rows), 3)
        self.assertEqual(
            (rows[first]["source_message_id"], rows[first]["content_sha256"], rows[first]["message_id_collision"]),
            ("<po@x>", fake, False),
        )
        self.assertEqual(
            (rows[second]["source_message_id"], rows[second]["content_sha256"], rows[second]["message_id_collision"]),
            ("<po@x>#collision-2e2e2e2e2e2e", real, True),
        )
        self.assertIs(rows[other_org]["message_id_collision"], False)
        # Retries of either message are duplicates of their own row.
        retries = yield self.store.insert_messages(
            [message(acme, "<po@x>", 2, content_sha256=real), message(acme, "<po@x>", 2, content_sha256=fake)]
        )
        self.assertEqual([(i, type(i)) for i in retries], [(second, Duplicate), (first, Duplicate)])
        self.assertEqual((yield self.store.count_messages()), 3)

    @defer.inlineCallbacks
    def test_taken_message_id_without_digest_is_a_duplicate(self):
        """Rows stored before content digests existed keep deduplicating on the Message-ID alone."""
        acme, _ = yield self.two_orgs()
        [old] = yield self.store.insert_messages([message(acme, "<old@x>")])
        [again] = yield self.store.insert_messages([message(acme, "<old@x>", 1, content_sha256="ab" * 32)])
        self.assertEqual((again, type(again)), (old, Duplicate))
        self.assertEqual((yield self.store.count_messages()), 1)

    @defer.inlineCallbacks
    def test_insert_same_message_id_from_another_source(self):
        acme, _ = yield self.two_orgs()
        ids = yield self.store.insert_messages(
            [message(acme, "<a@x>"), message(acme, "<a@x>", source="api")]
        )
        self.assertNotIn(None, ids)

    @defer.inlineCallbacks
    def test_unique_constraint_holds(self):
        acme, _ = yield self.two_orgs()
        yield self.store.insert_messages([message(acme, "<a@x>")])

        def insert(txn):
            row = message(acme, "<a@x>")
            return txn.execute(
                "INSERT INTO inbound_message (org_id, source, source_message_id, mail_from,"
                " rcpt_to, raw_key, raw_size, raw_sha256, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                tuple(row[k] for k in (
                    "org_id", "source", "source_message_id", "mail_from", "rcpt_to",
                    "raw_key", "raw_size", "raw_sha256", "received_at",
                )),
            )

        yield self.assertFailure(
            self.store.engine.interaction(insert), *self.store.engine.integrity_errors
        )
        self.assertEqual((yield self.store.count_messages()), 1)

    @defer.inlineCallbacks
    def test_list_messages_newest_first_with_filters(self):
        acme, globex = yield self.two_orgs()
        first, second, third, other = yield self.store.insert_messages([
            message(acme, "<1@x>", 1),
            message(acme, "<2@x>", 3),
            message(acme, "<3@x>", 2),
            message(globex, "<4@x>", 4),
        ])
        yield self.store.mark_parsed(first)
        yield self.store.mark_failed(third, "broken", 1)

        def ids(rows):
            return [row["id"] for row in rows]

        # Newest first by id (the order of arrival), as the API and the console
        # page (issue 28: an index holds every filter in that order); not by
        # received_at, which the test sets out of step with the ids.
        self.assertEqual(ids((yield self.store.list_messages())), [other, third, second, first])
        self.assertEqual(
            ids((yield self.store.list_messages(org_slug="ACME"))), [third, second, first]
        )
        self.assertEqual(ids((yield self.store.list_messages(status="received"))), [other, second])
        self.assertEqual(
            ids((yield self.store.list_messages(org_slug="acme", status="failed"))), [third]
        )
        self.assertEqual(ids((yield self.store.list_messages(limit=2))), [other, third])
        self.assertEqual((yield self.store.list_messages(org_slug="nobody")), [])
        rows = yield self.store.list_messages(limit=1)
        self.assertEqual(rows[0]["org_slug"], "globex")

    @defer.inlineCallbacks
    def test_get_message(self):
        acme, _ = yield self.two_orgs()
        [new] = yield self.store.insert_messages([message(acme, "<a@x>")])
        row = yield self.store.get_message(new)
        expected = message(acme, "<a@x>")
        del expected["received_at"]
        self.assertEqual({k: row[k] for k in expected}, expected)
        self.assertEqual(
            (row["id"], row["org_slug"], row["status"], row["attempts"], row["last_error"]),
            (new, "acme", "received", 0, None),
        )
        self.assertIsNone(row["parsed_at"])
        self.assertIsNotNone(row["received_at"])
        self.assertIsNone((yield self.store.get_message(new + 1000)))

    @defer.inlineCallbacks
    def test_count_messages(self):
        acme, globex = yield self.two_orgs()
        self.assertEqual((yield self.store.count_messages()), 0)
        ids = yield self.store.insert_messages(
            [message(acme, "<a@x>"), message(acme, "<b@x>"), message(globex, "<a@x>")]
        )
        yield self.store.mark_failed(ids[0], "broken", 1)
        self.assertEqual((yield self.store.count_messages()), 3)
        self.assertEqual((yield self.store.count_messages("received")), 2)
        self.assertEqual((yield self.store.count_messages("failed")), 1)
        self.assertEqual((yield self.store.count_messages("parsed")), 0)
        self.assertEqual((yield self.store.count_messages("received", org_id=acme)), 1)
        self.assertEqual((yield self.store.count_messages("received", org_id=globex)), 1)
        self.assertEqual((yield self.store.count_messages(org_id=acme)), 2)

    @defer.inlineCallbacks
    def claim_one(self):
        claimed = yield self.store.claim(60)
        return claimed[0] if claimed else None

    @defer.inlineCallbacks
    def test_claims_in_batches(self):
        acme, _ = yield self.two_orgs()
        ids = yield self.store.insert_messages([message(acme, f"<{n}@x>") for n in range(5)])
        first = yield self.store.claim(60, 3)
        second = yield self.store.claim(60, 3)
        self.assertEqual([m["id"] for m in first], ids[:3])
        self.assertEqual([m["id"] for m in second], ids[3:])
        self.assertEqual((yield self.store.claim(60, 3)), [])
        yield self.store.release_claims(ids[:2])
        self.assertEqual([m["id"] for m in (yield self.store.claim(60, 3))], ids[:2])

    @defer.inlineCallbacks
    def test_claim_takes_organisations_in_turn(self):
        """A backlog of one organisation does not fill a batch while another's message is due."""
        acme, globex = yield self.two_orgs()
        flood = yield self.store.insert_messages([message(acme, f"<{n}@x>") for n in range(6)])
        [other] = yield self.store.insert_messages([message(globex, "<late@x>")])
        self.assertEqual([m["id"] for m in (yield self.store.claim(60, 3))], flood[:3])
        yield self.store.release_claims(flood[:3])
        fair = yield self.store.claim(60, 3, per_org=2)
        self.assertEqual([m["id"] for m in fair], [flood[0], flood[1], other])
        self.assertEqual([m["org_id"] for m in fair], [acme, acme, globex])
        # Organisations already at their cap are skipped: nothing else is due.
        self.assertEqual((yield self.store.claim(60, 3, per_org=2, skip_orgs=[acme])), [])
        self.assertEqual([m["id"] for m in (yield self.store.claim(60, 3, per_org=2))], flood[2:4])

    @defer.inlineCallbacks
    def test_reprocess_under_new_rules(self):
        """
        Issue 14: a message extracted under the old rules (one winmail.dat) is
        brought up to the new ones (the files inside it) without a duplicate:
        the same (message, ordinal) keeps its id, the new columns are filled in,
        and the parts it skipped are its warnings.
        """
        acme, _ = yield self.two_orgs()
        [first] = yield self.store.insert_messages([message(acme, "<tnef@x>")])
        yield self.claim_one()

        def document(n, filename, **more):
            return {"org_id": acme, "ordinal": n, "filename": filename, "content_type": "application/pdf",
                    "size": 3, "sha256": "ab" * 32, "storage_key": f"documents/{acme}/{first}/{n}", **more}

        yield self.store.mark_parsed(first, [document(0, "winmail.dat"), document(1, "old.pdf")])
        [old, _] = yield self.store.list_documents(message_id=first)
        self.assertIsNone(old["original_filename"])
        yield self.store.reprocess(first)
        yield self.claim_one()
        new = document(0, "order.pdf", original_filename="/tmp/order.pdf", disposition="attachment",
                       content_id="x@y", content_type_raw="application/PDF")
        yield self.store.mark_parsed(first, [new], "part 3 (image/gif): base64 content cannot be decoded, skipped")
        [doc] = yield self.store.list_documents(message_id=first)
        self.assertEqual(doc["id"], old["id"])
        self.assertEqual(
            (doc["filename"], doc["original_filename"], doc["disposition"], doc["content_id"], doc["content_type_raw"]),
            ("order.pdf", "/tmp/order.pdf", "attachment", "x@y", "application/PDF"),
        )
        row = yield self.store.get_message(first)
        self.assertEqual(row["warnings"], "part 3 (image/gif): base64 content cannot be decoded, skipped")
        yield self.store.reprocess(first)
        self.assertIsNone((yield self.store.get_message(first))["warnings"])

    @defer.inlineCallbacks
    def test_extraction_queue(self):
        acme, _ = yield self.two_orgs()
        first, second = yield self.store.insert_messages([message(acme, "<a@x>"), message(acme, "<b@x>")])
        claimed = yield self.claim_one()
        self.assertEqual(claimed["id"], first)
        again = yield self.claim_one()
        self.assertEqual(again["id"], second)
        self.assertIsNone((yield self.claim_one()))
        documents = [
            {"org_id": acme, "ordinal": n, "filename": f"po-{n}.pdf", "content_type": "application/pdf",
             "size": 3, "sha256": "ab" * 32, "storage_key": f"documents/{acme}/{first}/{n}"}
            for n in range(2)
        ]
        yield self.store.mark_parsed(first, documents)
        # extracting again (after a crash, or reprocess) never duplicates documents
        yield self.store.reprocess(first)
        self.assertEqual((yield self.claim_one())["id"], first)
        yield self.store.mark_parsed(first, documents)
        docs = yield self.store.list_documents(message_id=first)
        self.assertEqual([(d["filename"], d["org_slug"]) for d in docs], [("po-0.pdf", "acme"), ("po-1.pdf", "acme")])
        row = yield self.store.get_message(first)
        self.assertEqual(row["status"], "parsed")
        self.assertIsNotNone(row["parsed_at"])
        self.assertIsNone(row["warnings"])
        yield self.store.schedule_retry(second, "S3 503", 1, 3600)
        self.assertIsNone((yield self.claim_one()))
        row = yield self.store.get_message(second)
        self.assertEqual((row["status"], row["attempts"], row["last_error"]), ("received", 1, "S3 503"))
        yield self.store.mark_failed(second, "gave up", 5)
        self.assertEqual((yield self.store.reprocess_failed("acme")), 1)
        # a claim renewed while the work goes on is not taken over
        yield self.store.renew_claims([second], 3600)
        self.assertIsNone((yield self.claim_one()))
        yield self.store.release_claims()
        self.assertEqual((yield self.claim_one())["id"], second)

    @defer.inlineCallbacks
    def test_nul_and_lone_surrogates_stored_as_replacement_characters(self):
        """PostgreSQL refuses NUL in text; both engines store U+FFFD instead, the same way."""
        acme, _ = yield self.two_orgs()
        [new] = yield self.store.insert_messages([
            message(acme, "<a\x00b@x>", subject="AB\x00CD", mail_from="bad\udcffsender@x", rcpt_to="o\x00@x"),
        ])
        row = yield self.store.get_message(new)
        self.assertEqual(
            (row["source_message_id"], row["subject"], row["mail_from"], row["rcpt_to"]),
            ("<a\ufffdb@x>", "AB\ufffdCD", "bad\ufffdsender@x", "o\ufffd@x"),
        )
        # a retry of the same message is a duplicate, as on the first delivery
        [again] = yield self.store.insert_messages([message(acme, "<a\x00b@x>")])
        self.assertEqual((type(again), again), (Duplicate, new))
        document = {
            "org_id": acme, "ordinal": 0, "filename": "po\udc80.pdf", "content_type": "application/x\x00evil",
            "size": 3, "sha256": "ab" * 32, "storage_key": f"documents/{acme}/{new}/0",
        }
        yield self.store.mark_parsed(new, [document])
        [doc] = yield self.store.list_documents(message_id=new)
        self.assertEqual((doc["filename"], doc["content_type"]), ("po\ufffd.pdf", "application/x\ufffdevil"))
        yield self.store.mark_failed(new, "bad \x00 byte", 1)
        self.assertEqual((yield self.store.get_message(new))["last_error"], "bad \ufffd byte")
        self.assertIsNone((yield self.store.get_org("ac\x00me")))

    @defer.inlineCallbacks
    def test_referenced_keys(self):
        acme, _ = yield self.two_orgs()
        [new] = yield self.store.insert_messages([message(acme, "<a@x>", raw_key="raw/a")])
        document = {
            "org_id": acme, "ordinal": 0, "filename": "po.pdf", "content_type": "application/pdf",
            "size": 3, "sha256": "ab" * 32, "storage_key": f"documents/{acme}/{new}/0",
        }
        yield self.store.mark_parsed(new, [document])
        # more keys than one statement takes, the referenced ones in different batches
        keys = [f"raw/orphan-{n}" for n in range(1200)]
        keys.insert(3, "raw/a")
        keys.insert(1100, f"documents/{acme}/{new}/0")
        keys.append(f"documents/{acme}/{new}/1")
        self.assertEqual((yield self.store.referenced_keys(keys)), {"raw/a", f"documents/{acme}/{new}/0"})
        self.assertEqual((yield self.store.referenced_keys([])), set())

    @defer.inlineCallbacks
    def test_documents_of_a_message_being_extracted_count_as_referenced(self):
        acme, _ = yield self.two_orgs()
        [pending] = yield self.store.insert_messages([message(acme, "<p@x>", raw_key="raw/p")])
        [done] = yield self.store.insert_messages([message(acme, "<d@x>", raw_key="raw/d")])
        yield self.store.mark_parsed(done, [])
        keys = [f"documents/{acme}/{pending}/0", f"documents/{acme}/{done}/0", "documents/x/y/z"]
        self.assertEqual((yield self.store.referenced_keys(keys)), {keys[0]})
        yield self.store.mark_parsed(pending, [])
        self.assertEqual((yield self.store.referenced_keys(keys)), set())

    @defer.inlineCallbacks
    def test_event_listeners_hear_only_of_events_written(self):
        """A status change wakes the webhook senders only when it wrote an event (only webhook organisations get one)."""
        acme, globex = yield self.two_orgs()
        yield self.store.set_webhook("acme", "https://app.example/hooks", "whsec_x")
        heard = []
        yield self.store.on_event(lambda: heard.append(True))
        quiet = yield self.store.insert_messages([message(globex, f"<q{n}@x>") for n in range(3)])
        yield self.store.mark_parsed(quiet[0], [])
        yield self.store.mark_failed(quiet[1], "unparseable", 1)
        yield self.store.mark_quarantined(quiet[2], "DMARC did not pass")
        self.assertEqual(heard, [])
        [loud] = yield self.store.insert_messages([message(acme, "<loud@x>")])
        yield self.store.mark_parsed(loud, [])
        self.assertTrue(heard)
        self.assertEqual(len((yield self.store.list_events())), 1)
        self.assertEqual((yield self.store.count_events("pending")), 1)
        self.assertEqual((yield self.store.count_events("pending", org_id=acme)), 1)
        self.assertEqual((yield self.store.count_events("pending", org_id=globex)), 0)

    @defer.inlineCallbacks
    def test_quarantine_writes_its_event_in_the_same_transaction(self):
        """Issues 15 and 16: an organisation with a webhook hears of a quarantine like of a parsed message."""
        acme, _ = yield self.two_orgs()
        yield self.store.set_webhook("acme", "https://app.example/hooks", "whsec_x")
        [first] = yield self.store.insert_messages([message(acme, "<e@x>")])
        self.assertEqual((yield self.store.list_events()), [])
        yield self.store.mark_quarantined(first, "DMARC did not pass", None)
        [event] = yield self.store.list_events()
        self.assertEqual(
            (event["event_type"], event["status"]), ("message.quarantined", "pending")
        )

    @defer.inlineCallbacks
    def two_webhook_orgs(self):
        acme, globex = yield self.two_orgs()
        for slug in ("acme", "globex"):
            yield self.store.set_webhook(slug, f"https://{slug}.example/hooks", "whsec_x")
        return acme, globex

    @defer.inlineCallbacks
    def pending_events(self, org_id: int, count: int, tag: str) -> list[int]:
        """C{count} parsed messages of C{org_id}, each with its pending event; their event ids, oldest first."""
        ids = yield self.store.insert_messages([message(org_id, f"<{tag}-{n}@x>") for n in range(count)])
        for message_id in ids:
            yield self.store.mark_parsed(message_id, [])
        events = yield self.store.list_events(limit=1000)
        return sorted(e["id"] for e in events if e["inbound_message_id"] in ids)

    @defer.inlineCallbacks
    def test_event_claims_take_organisations_in_turns_up_to_a_cap(self):
        """Issue 22: one organisation's backlog takes at most per_org claims, the others get their turn first."""
        acme, globex = yield self.two_webhook_orgs()
        busy = yield self.pending_events(acme, 10, "busy")
        [quiet] = yield self.pending_events(globex, 1, "quiet")
        first = yield self.store.claim_events(60, limit=2, per_org=3)
        self.assertEqual([e["id"] for e in first], [busy[0], quiet])
        self.assertEqual({e["org_id"] for e in first}, {acme, globex})
        second = yield self.store.claim_events(60, limit=10, per_org=3)
        # acme has one claimed already: two more, then none while three are out
        self.assertEqual([e["id"] for e in second], busy[1:3])
        self.assertEqual((yield self.store.claim_events(60, limit=10, per_org=3)), [])
        yield self.store.event_delivered(busy[0], 200)
        self.assertEqual([e["id"] for e in (yield self.store.claim_events(60, limit=10, per_org=3))], [busy[3]])

    @defer.inlineCallbacks
    def test_a_failing_receiver_is_counted_paused_and_cleared(self):
        """Issue 22: failures in a row are counted per receiver, a paused one's events wait, a delivery starts afresh."""
        acme, globex = yield self.two_webhook_orgs()
        events = yield self.pending_events(acme, 3, "a")
        [other] = yield self.pending_events(globex, 1, "g")
        claimed = yield self.store.claim_events(60, limit=10)
        self.assertEqual(len(claimed), 4)
        self.assertEqual((yield self.store.event_failed(events[0], 500, "HTTP 500", 0)), 1)
        self.assertEqual((yield self.store.event_failed(events[1], None, "refused", 0)), 2)
        self.assertEqual((yield self.store.count_paused_receivers()), 0)
        yield self.store.pause_receiver(acme, 5)
        self.assertEqual((yield self.store.count_paused_receivers()), 1)
        # an attempt begun before the pause is not counted
        self.assertIsNone((yield self.store.event_failed(events[2], None, "timeout", 0)))
        yield self.store.event_failed(other, 500, "HTTP 500", 0)
        self.assertEqual([e["id"] for e in (yield self.store.claim_events(60, limit=10))], [other])
        later = self.store._now() + timedelta(seconds=6)
        self.patch(self.store, "_now", lambda: later)
        self.assertEqual((yield self.store.count_paused_receivers()), 0)
        again = yield self.store.claim_events(60, limit=10)
        self.assertEqual(sorted(e["id"] for e in again), events)
        self.assertEqual((yield self.store.event_failed(events[0], 500, "HTTP 500", 0)), 3)
        yield self.store.event_delivered(events[1], 204)
        self.assertEqual((yield self.store.event_failed(events[2], 500, "HTTP 500", 0)), 1)
        # a new URL starts afresh too
        yield self.store.pause_receiver(acme, 5)
        yield self.store.set_webhook("acme", "https://acme.example/new", "whsec_x")
        self.assertEqual((yield self.store.count_paused_receivers()), 0)
        self.assertEqual((yield self.store.event_failed(events[0], 500, "HTTP 500", 0)), 1)

    @defer.inlineCallbacks
    def test_smtp_facts_verdicts_policy_quarantine_release(self):
        """Issue 15: what the session saw, the sender verdicts, and a quarantined message released once."""
        acme, _ = yield self.two_orgs()
        [first] = yield self.store.insert_messages(
            [message(acme, "<q@x>", client_ip="192.0.2.7", helo="mx.buyer.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384")]
        )
        row = yield self.store.get_message(first)
        self.assertEqual(
            (row["client_ip"], row["helo"], row["tls"], row["spf"]),
            ("192.0.2.7", "mx.buyer.example", "TLSv1.3 TLS_AES_256_GCM_SHA384", None),
        )
        org = yield self.store.set_sender_policy("ACME", ["customer.example", "other.example"], "dmarc")
        self.assertEqual((org["sender_allow_domains"], org["sender_require"]), ("customer.example other.example", "dmarc"))
        org = yield self.store.set_sender_policy("acme", require="none")
        self.assertEqual((org["sender_allow_domains"], org["sender_require"]), ("customer.example other.example", "none"))
        yield self.assertFailure(self.store.set_sender_policy("nobody", [], "none"), NoSuchOrg)
        claimed = yield self.claim_one()
        self.assertEqual((claimed["id"], claimed["sender_allow_domains"]), (first, "customer.example other.example"))
        verdicts = {"spf": "fail", "spf_domain": "buyer.example", "dmarc": "fail", "authentication_results": "mx; spf=fail"}
        yield self.store.mark_quarantined(first, "DMARC did not pass", verdicts)
        row = yield self.store.get_message(first)
        self.assertEqual(
            (row["status"], row["quarantine_reason"], row["spf"], row["dmarc"], row["authentication_results"]),
            ("quarantined", "DMARC did not pass", "fail", "fail", "mx; spf=fail"),
        )
        self.assertIsNone((yield self.claim_one()), "a quarantined message is not extracted")
        listed = yield self.store.list_messages(status="quarantined")
        self.assertEqual([m["id"] for m in listed], [first])
        released = yield self.store.release(first)
        self.assertEqual(released["status"], "received")
        self.assertIsNotNone(released["released_at"])
        yield self.assertFailure(self.store.release(first), NotQuarantined)
        yield self.assertFailure(self.store.release(first + 100), NoSuchMessage)
        self.assertEqual((yield self.claim_one())["id"], first)
        yield self.store.mark_parsed(first, [], verdicts={"spf": "fail", "dmarc": "fail", "authentication_results": "mx; spf=fail"})
        row = yield self.store.get_message(first)
        self.assertEqual((row["status"], row["spf"]), ("parsed", "fail"))

    @defer.inlineCallbacks
    def test_content_verdicts_policy_and_infected_documents(self):
        """Issue 25: clamd's and rspamd's verdicts, the content policy, documents kept in a content quarantine."""
        acme, _ = yield self.two_orgs()
        org = yield self.store.set_content_policy("ACME", on_virus="tag", spam_threshold=7.5, unscanned="pass")
        self.assertEqual((org["on_virus"], org["spam_threshold"], org["unscanned"]), ("tag", 7.5, "pass"))
        org = yield self.store.set_content_policy("acme", no_spam_threshold=True)
        self.assertEqual((org["on_virus"], org["spam_threshold"], org["unscanned"]), ("tag", None, "pass"))
        yield self.assertFailure(self.store.set_content_policy("nobody", on_virus="tag"), NoSuchOrg)
        yield self.store.set_webhook("acme", "https://acme.example/hooks", "whsec_x")
        first, second = yield self.store.insert_messages([message(acme, "<v1@x>"), message(acme, "<v2@x>")])
        claimed = yield self.claim_one()
        self.assertEqual((claimed["on_virus"], claimed["unscanned_policy"], claimed["unscanned"]), ("tag", "pass", None))
        documents = [
            {"org_id": acme, "ordinal": n, "filename": name, "content_type": "application/pdf", "size": 3, "sha256": "ab",
             "storage_key": f"documents/{acme}/{first}/{n}", "virus": virus, "virus_detail": detail}
            for n, (name, virus, detail) in enumerate([("a.pdf", "clean", None), ("b.zip", "infected", "Eicar")])
        ]
        content = {
            "virus": "infected", "virus_detail": "Eicar", "spam_action": "add header", "spam_score": 6.25,
            "spam_required": 15.0, "spam_symbols": "GTUBE(0) R_SPF_ALLOW(-0.2)", "spam_detail": None, "unscanned": None,
        }
        yield self.store.mark_quarantined(first, "virus: Eicar in b.zip", None, documents, content)
        row = yield self.store.get_message(first)
        self.assertEqual(
            (row["status"], row["virus"], row["virus_detail"], row["spam_action"], row["spam_score"], row["spam_required"]),
            ("quarantined", "infected", "Eicar", "add header", 6.25, 15.0),
        )
        self.assertIsNone(row["infected_allowed_at"])
        stored = yield self.store.list_documents(message_id=first)
        self.assertEqual([(d["filename"], d["virus"], d["virus_detail"]) for d in stored], [("a.pdf", "clean", None), ("b.zip", "infected", "Eicar")])
        allowed = yield self.store.allow_infected(first)
        self.assertIsNotNone(allowed["infected_allowed_at"])
        yield self.assertFailure(self.store.allow_infected(first + 100), NoSuchMessage)
        history = yield self.store.status_history(first)
        self.assertEqual([h["status"] for h in history][-1], "infected-allowed")
        # A parsed message's event carries its documents, never an infected one.
        yield self.store.mark_parsed(second, [dict(d, storage_key=f"documents/{acme}/{second}/{d['ordinal']}") for d in documents], None, None, dict(content, unscanned="clamd down"))
        row = yield self.store.get_message(second)
        self.assertEqual((row["status"], row["unscanned"], row["spam_symbols"]), ("parsed", "clamd down", "GTUBE(0) R_SPF_ALLOW(-0.2)"))
        events = yield self.store.claim_events(60)
        self.assertEqual(
            [(e["message_status"], [d["filename"] for d in e["documents"]]) for e in events],
            [("quarantined", []), ("parsed", ["a.pdf"])],
        )
        self.assertEqual(events[1]["virus"], "infected")

    @defer.inlineCallbacks
    def test_status_history_of_every_change(self):
        """Issue 18: each status change of a message leaves a history row, its error with it."""
        acme, _ = yield self.two_orgs()
        [first] = yield self.store.insert_messages([message(acme, "<h@x>")])
        yield self.store.insert_messages([message(acme, "<h@x>")])  # a duplicate changes nothing
        yield self.claim_one()
        yield self.store.schedule_retry(first, "worker crashed", 1, 0)
        yield self.claim_one()
        yield self.store.mark_failed(first, "not a PDF", 2)
        self.assertEqual((yield self.store.reprocess_failed("acme")), 1)
        yield self.store.reprocess(first)
        yield self.claim_one()
        yield self.store.mark_parsed(first, [])
        yield self.store.mark_quarantined(first, "DMARC did not pass")
        yield self.store.release(first)
        history = yield self.store.status_history(first)
        self.assertEqual(
            [(row["status"], row["error"]) for row in history],
            [
                ("received", None),
                ("retrying", "worker crashed"),
                ("failed", "not a PDF"),
                ("received", None),
                ("received", None),
                ("parsed", None),
                ("quarantined", "DMARC did not pass"),
                ("received", None),
            ],
        )
        self.assertTrue(all(row["at"] is not None for row in history))
        self.assertEqual((yield self.store.status_history(first + 100)), [])

    # custom domains (issue 27)

    @defer.inlineCallbacks
    def test_domains_belong_to_one_organisation(self):
        yield self.two_orgs()
        added = yield self.store.add_domain("ACME", "acme-corp.example", "tok1", ["orders", "invoices"])
        self.assertEqual(
            (added["org_slug"], added["domain"], added["token"], added["status"], added["local_parts"]),
            ("acme", "acme-corp.example", "tok1", "pending", ["orders", "invoices"]),
        )
        yield self.assertFailure(self.store.add_domain("globex", "acme-corp.example", "tok2"), DomainTaken)
        yield self.assertFailure(self.store.add_domain("acme", "acme-corp.example", "tok3"), DomainTaken)
        yield self.assertFailure(self.store.add_domain("nobody", "other.example", "tok4"), NoSuchOrg)
        yield self.store.add_domain("globex", "globex.example", "tok5")
        self.assertEqual([d["domain"] for d in (yield self.store.list_domains())], ["acme-corp.example", "globex.example"])
        self.assertEqual([d["domain"] for d in (yield self.store.list_domains("GLOBEX"))], ["globex.example"])
        self.assertEqual([d["domain"] for d in (yield self.store.list_domains(org_id=added["org_id"]))], ["acme-corp.example"])
        self.assertEqual((yield self.store.get_domain_by_id(added["id"]))["domain"], "acme-corp.example")
        self.assertIsNone((yield self.store.get_domain_by_id(added["id"] + 1000)))
        self.assertEqual((yield self.store.get_domain("globex.example"))["token"], "tok5")
        self.assertIsNone((yield self.store.get_domain("nothing.example")))
        yield self.store.remove_domain("acme-corp.example")
        yield self.assertFailure(self.store.remove_domain("acme-corp.example"), NoSuchDomain)
        again = yield self.store.add_domain("globex", "acme-corp.example", "tok6")
        self.assertEqual(again["org_slug"], "globex")

    @defer.inlineCallbacks
    def test_routed_domains_are_the_verified_ones_by_version(self):
        acme, _ = yield self.two_orgs()
        version, routed = yield self.store.routed_domains()
        self.assertEqual(routed, [])
        yield self.store.add_domain("acme", "acme-corp.example", "tok", ["orders"])
        moved, routed = yield self.store.routed_domains(version)
        self.assertNotEqual(moved, version)
        self.assertEqual(routed, [], "a pending domain is not routed")
        self.assertEqual((yield self.store.routed_domains(moved)), (moved, None))
        due = yield self.store.due_domains(T0 + timedelta(days=36500))
        self.assertEqual([d["domain"] for d in due], ["acme-corp.example"])
        row = yield self.store.record_check("acme-corp.example", "verified", T0 + timedelta(days=36500), None, None)
        self.assertEqual(row["status"], "verified")
        self.assertIsNotNone(row["verified_at"])
        self.assertIsNotNone(row["checked_at"])
        verified, routed = yield self.store.routed_domains(moved)
        self.assertEqual(routed, [{"domain": "acme-corp.example", "org_id": acme, "slug": "acme", "local_parts": ["orders"]}])
        self.assertEqual((yield self.store.due_domains(T0)), [], "the next check is not due")
        yield self.store.record_check("acme-corp.example", "verified", T0, "MX names none of ours", T0)
        self.assertEqual((yield self.store.routed_domains(verified)), (verified, None), "a check that changes no status moves no version")
        row = yield self.store.get_domain("acme-corp.example")
        self.assertEqual(row["last_error"], "MX names none of ours")
        yield self.store.record_check("acme-corp.example", "suspended", T0, "TXT record missing", T0)
        suspended, routed = yield self.store.routed_domains(verified)
        self.assertEqual(routed, [])
        yield self.assertFailure(self.store.record_check("gone.example", "verified", T0), NoSuchDomain)

    @defer.inlineCallbacks
    def test_the_domain_a_message_came_in_on_is_kept(self):
        acme, _ = yield self.two_orgs()
        [first, second] = yield self.store.insert_messages(
            [message(acme, "<a@x>", rcpt_to="orders@acme-corp.example", rcpt_domain="acme-corp.example"), message(acme, "<b@x>")]
        )
        self.assertEqual((yield self.store.get_message(first))["rcpt_domain"], "acme-corp.example")
        self.assertIsNone((yield self.store.get_message(second))["rcpt_domain"])
