"""
The blob sweeper: C{mailingest gc} on local disk with SQLite and on S3 (moto)
with PostgreSQL, and the daemon's periodic sweep.
"""

import hashlib
import os
import time

from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.ops import metrics
from mailingest.errors import ConfigError
from mailingest.storage.blobs import open_blobs
from mailingest.storage.journal import JOURNAL_DIR, IntentJournal, JournaledBlobs
from mailingest.storage.store import open_store
from mailingest.interfaces import IBlobStore
from zope.interface.verify import verifyObject
from tests import postgres
from tests.daemon import RunningDaemon, mailingest_cli, sleep, temp_dir
from tests.moto import shared_server
from tests.store_contract import message

COUNT = 100
OLD = time.time() - 2 * 86400


async def populate(store, blobs, count: int = COUNT) -> tuple[list[str], list[str]]:
    """C{count} messages each with a document, and C{count} blobs no row references: (live keys, orphan keys)."""
    await store.migrate()
    org = (await store.add_org("acme", "Acme"))["id"]
    rows = [message(org, f"<{n}@x>", raw_key=f"raw/2026/01/01/live-{n}.eml") for n in range(count)]
    ids = await store.insert_messages(rows)
    live = []
    for row, message_id in zip(rows, ids):
        key = f"documents/{org}/{message_id}/0"
        document = {
            "org_id": org, "ordinal": 0, "filename": "po.pdf", "content_type": "application/pdf",
            "size": len(key), "sha256": hashlib.sha256(key.encode()).hexdigest(), "storage_key": key,
        }
        await store.mark_parsed(message_id, [document])
        live += [row["raw_key"], key]
    orphans = [f"raw/2026/01/01/orphan-{n}.eml" for n in range(count // 2)]
    orphans += [f"documents/{org}/{100000 + n}/0" for n in range(count - count // 2)]
    await put(blobs, live + orphans)
    return live, orphans


def put(blobs, keys: list[str]) -> defer.Deferred:
    return defer.gatherResults(
        [blobs.put_bytes(key, key.encode(), hashlib.sha256(key.encode()).hexdigest()) for key in keys],
        consumeErrors=True,
    )


async def stored_keys(blobs) -> set[str]:
    found = set()
    for prefix in ("raw/", "documents/"):
        async for page in blobs.list_keys(prefix):
            found.update(blob.key for blob in page)
    return found


class GcCommandTests(unittest.TestCase):
    async def run_gc(self, directory: str, *args: str, env=None) -> str:
        result = await threads.deferToThread(mailingest_cli, directory, *self.options, "gc", *args, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.decode()

    def open(self, database: str, storage: str, environ=os.environ):
        self.options = ("--database", database, "--storage", storage)
        store = open_store(database, MESSAGE_EVENTS)
        blobs = open_blobs(storage, shared_server().endpoint, None, environ)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        return store, blobs

    async def test_local_disk_removes_exactly_the_old_orphans(self):
        directory = temp_dir(self)
        blobs_dir = os.path.join(directory, "blobs")
        store, blobs = self.open("sqlite:///" + os.path.join(directory, "m.db"), "file:" + blobs_dir)
        live, orphans = await populate(store, blobs)
        young = [f"raw/2026/01/02/young-{n}.eml" for n in range(10)]
        await put(blobs, young)
        for key in live + orphans:
            os.utime(blobs.path_for(key), (OLD, OLD))
        temporaries = {"stale": OLD, "fresh": time.time()}
        for name, mtime in temporaries.items():
            path = os.path.join(blobs_dir, ".tmp", name)
            with open(path, "wb") as f:
                f.write(b"partial")
            os.utime(path, (mtime, mtime))
        everything = set(live + orphans + young)
        self.assertEqual(await stored_keys(blobs), everything)

        report = await self.run_gc(directory, "--dry-run")
        self.assertEqual({line.split()[1] for line in report.splitlines() if line.startswith("orphan ")}, set(orphans))
        self.assertIn("would remove 100 orphaned blob(s)", report)
        self.assertIn("and 1 stale temporary file(s) (7 bytes); 310 blob(s) scanned", report)
        self.assertEqual(await stored_keys(blobs), everything)
        self.assertEqual(sorted(os.listdir(os.path.join(blobs_dir, ".tmp"))), ["fresh", "stale"])

        report = await self.run_gc(directory)
        self.assertIn("removed 100 orphaned blob(s)", report)
        self.assertEqual(await stored_keys(blobs), set(live + young))
        self.assertEqual(os.listdir(os.path.join(blobs_dir, ".tmp")), ["fresh"])
        self.assertIn("removed 0 orphaned blob(s)", await self.run_gc(directory))

    async def test_s3_and_postgresql_remove_exactly_the_old_orphans(self):
        """S3 keeps its own LastModified, so "old" here is seconds, with a floor lowered to match."""
        moto = shared_server()
        environ = {"AWS_ACCESS_KEY_ID": moto.access_key, "AWS_SECRET_ACCESS_KEY": moto.secret_key}
        store, blobs = self.open(postgres.create_database(), f"s3://{moto.create_bucket()}/mail", environ)
        self.options += ("--s3-endpoint", moto.endpoint)
        live, orphans = await populate(store, blobs)
        old_done = time.time()
        await sleep(14)
        young = [f"raw/2026/01/02/young-{n}.eml" for n in range(10)]
        await put(blobs, young)
        everything = set(live + orphans + young)
        self.assertEqual(await stored_keys(blobs), everything)
        env = dict(
            os.environ, **environ,
            MAILINGEST_STORE_TIMEOUT="0.1", MAILINGEST_EXTRACTION_LEASE="0.1", MAILINGEST_EXTRACTION_TIMEOUT="0.1",
        )

        def margin() -> str:
            """
            Seconds back to just after the old blobs (S3 times are whole seconds): the
            gc command takes seconds to start on a loaded machine (5.5 s once, with four
            test processes on two cores), and the 12.5 s left before the young ones keeps
            them young however long it takes.
            """
            return str(time.time() - (old_done + 1.5))

        report = await self.run_gc("/", "--dry-run", "--min-age", margin(), env=env)
        self.assertIn("would remove 100 orphaned blob(s)", report)
        self.assertEqual(await stored_keys(blobs), everything)
        report = await self.run_gc("/", "--min-age", margin(), env=env)
        self.assertIn("removed 100 orphaned blob(s)", report)
        self.assertEqual(await stored_keys(blobs), set(live + young))

    async def test_margin_below_a_transaction_refused(self):
        directory = temp_dir(self)
        self.open("sqlite:///" + os.path.join(directory, "m.db"), "file:" + os.path.join(directory, "blobs"))
        migrated = await threads.deferToThread(mailingest_cli, directory, *self.options, "migrate")
        self.assertEqual(migrated.returncode, 0, migrated.stderr)
        result = await threads.deferToThread(mailingest_cli, directory, *self.options, "gc", "--min-age", "60")
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"gc minimum age 60 s is too short", result.stderr)


class JournalSweepTests(unittest.TestCase):
    """The routine sweep (issue 28): only the blobs the intent journal names, whatever else is stored."""

    def test_journaled_blobs_is_a_blob_store(self):
        blobs = JournaledBlobs(open_blobs("file:" + temp_dir(self)), IntentJournal(temp_dir(self)))
        self.assertTrue(verifyObject(IBlobStore, blobs))

    async def test_a_journal_that_cannot_be_written_fails_the_put(self):
        """Not a blob the sweeper would never see: the put fails (a 451 for SMTP), with the reason."""
        directory = temp_dir(self)
        blobs = JournaledBlobs(open_blobs("file:" + os.path.join(directory, "blobs")), IntentJournal(os.path.join(directory, "journal")))
        # Gone, and a file in its place: no file can be made in it, whoever runs the test.
        os.rmdir(blobs.journal.directory)
        with open(blobs.journal.directory, "w"):
            pass
        error = await self.assertFailure(put(blobs, ["raw/2026/01/01/x.eml"]), defer.FirstError)
        self.assertIn("gc journal", str(error.subFailure.value))
        self.assertEqual(await stored_keys(blobs), set())

    async def test_recent_sweeps_only_journaled_keys_of_hours_past_the_margin(self):
        directory = temp_dir(self)
        blobs_dir = os.path.join(directory, "blobs")
        database = "sqlite:///" + os.path.join(directory, "m.db")
        self.options = ("--database", database, "--storage", "file:" + blobs_dir)
        store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs("file:" + blobs_dir)
        self.addCleanup(store.close)
        self.addCleanup(blobs.close)
        live, orphans = await populate(store, blobs)
        journal_dir = os.path.join(blobs_dir, ".scratch", JOURNAL_DIR)
        old = JournaledBlobs(blobs, IntentJournal(journal_dir, now=lambda: OLD))
        young = JournaledBlobs(blobs, IntentJournal(journal_dir))
        announced = orphans[:10] + live[:20]
        await put(old, announced)
        await put(young, ["raw/2026/01/02/young-orphan.eml"])
        for key in live + orphans:
            os.utime(blobs.path_for(key), (OLD, OLD))
        self.assertEqual(len(os.listdir(journal_dir)), 2)

        result = await threads.deferToThread(mailingest_cli, directory, *self.options, "gc", "--recent", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        report = result.stdout.decode()
        self.assertEqual({line.split()[1] for line in report.splitlines() if line.startswith("orphan ")}, set(orphans[:10]))
        self.assertIn("30 key(s) of the intent journal checked", report)
        self.assertEqual(len(os.listdir(journal_dir)), 2, "a dry run keeps the journal")

        result = await threads.deferToThread(mailingest_cli, directory, *self.options, "gc", "--recent")
        self.assertIn("removed 10 orphaned blob(s)", result.stdout.decode())
        self.assertEqual(await stored_keys(blobs), set(live + orphans[10:] + ["raw/2026/01/02/young-orphan.eml"]))
        self.assertEqual(len(os.listdir(journal_dir)), 1, "the swept hour's file is gone, this hour's stays")
        result = await threads.deferToThread(mailingest_cli, directory, *self.options, "gc", "--recent")
        self.assertIn("removed 0 orphaned blob(s)", result.stdout.decode())
        self.assertIn(" 0 key(s) of the intent journal checked", result.stdout.decode())


class GcServiceTests(unittest.TestCase):
    quick = {"store_timeout": "0.1", "extraction_lease": "0.1", "extraction_timeout": "0.1"}

    async def test_daemon_sweeps_periodically(self):
        sweeps = []
        removed_one = defer.Deferred()

        def observe(event):
            if event.get("event") == "gc":
                sweeps.append(event)
                if event.get("removed") and not removed_one.called:
                    removed_one.callback(None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        directory = temp_dir(self)
        daemon = RunningDaemon(directory, gc_interval="0.2", gc_min_age="1", **self.quick)
        await daemon.start()
        self.addCleanup(daemon.stop)
        removed = metrics.GC_REMOVED._value.get()
        await put(daemon.blobs, ["raw/2026/01/01/orphan.eml"])
        path = daemon.blobs.path_for("raw/2026/01/01/orphan.eml")
        self.assertTrue(os.path.exists(path))
        await sleep(0.5)
        self.assertTrue(os.path.exists(path), "removed while younger than --gc-min-age")
        # The daemon wrote the put down in its intent journal, in this hour's
        # file: make that an hour long past, as if the put were two days old.
        journal = daemon.blobs.journal
        for name in os.listdir(journal.directory):
            os.rename(os.path.join(journal.directory, name), os.path.join(journal.directory, "2026010100-" + name.split("-", 1)[1]))
        # the summary line comes once the sweep is over, after the delete
        await removed_one.addTimeout(5, reactor)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(metrics.GC_REMOVED._value.get(), removed + 1)
        self.assertIn((1, 1), [(sweep["orphans"], sweep["removed"]) for sweep in sweeps])

    def test_margin_below_a_transaction_refused(self):
        error = self.assertRaises(ConfigError, RunningDaemon, temp_dir(self), gc_min_age="60")
        self.assertIn("store-timeout + extraction-lease + extraction-timeout = 450 s", str(error))
