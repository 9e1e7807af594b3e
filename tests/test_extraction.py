"""
Extraction end to end: mail goes in over SMTP, documents come out.
"""

import ast
import base64
import hashlib
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from email.message import EmailMessage

from twisted.internet import defer, task
from twisted.trial import unittest

from mailingest.errors import StorageError
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.ops import metrics
from mailingest.extraction.attachments import ExtractionResult
from mailingest.extraction.pool import WORKER_ARGV
from mailingest.extraction.service import ExtractionService
from mailingest.storage.engines.sqlite import SqliteEngine
from mailingest.storage.store import Store
from tests.corpus import sample_messages
from tests.daemon import DaemonTestCase, TwistdProcess, mailingest_cli, sleep, temp_dir
from tests.store_contract import message as stored_message

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
LOGO = b"\x89PNG\r\n\x1a\n" + b"\x00" * 300


def order(subject="Order", attachments=(), message_id=None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "buyer@customer.test"
    msg["To"] = "orders+acme@example.com"
    msg["Subject"] = subject
    if message_id:
        msg["Message-ID"] = message_id
    msg.set_content("Please find our order attached.\n")
    for data, maintype, subtype, filename in attachments:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


class ExtractionCase(DaemonTestCase):
    overrides: dict = {"poll_interval": "0.2"}

    @defer.inlineCallbacks
    def deliver(self, msg, settle: bool = True):
        """Send C{msg}; fire with its row once extraction is done (or its id at once)."""
        data = msg.as_bytes() if isinstance(msg, EmailMessage) else msg
        code, reply = yield self.daemon.send(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        message_id = int(reply.split()[-1])
        if not settle:
            return message_id
        row = yield self.daemon.settled(message_id)
        return row

    @defer.inlineCallbacks
    def documents(self, message_id: int):
        docs = yield self.daemon.store.list_documents(message_id=message_id)
        for doc in docs:
            path = self.daemon.blobs.path_for(doc["storage_key"])
            with open(path, "rb") as f:
                doc["bytes"] = f.read()
        return docs


class ExtractionTests(ExtractionCase):
    @defer.inlineCallbacks
    def test_pdf_order(self):
        row = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "PO-1234.pdf")]))
        self.assertEqual(row["status"], "parsed")
        self.assertIsNotNone(row["parsed_at"])
        [doc] = yield self.documents(row["id"])
        self.assertEqual(
            (doc["filename"], doc["content_type"], doc["size"], doc["sha256"], doc["bytes"]),
            ("PO-1234.pdf", "application/pdf", len(PDF), hashlib.sha256(PDF).hexdigest(), PDF),
        )
        self.assertEqual(doc["org_id"], row["org_id"])
        self.assertNotIn("PO-1234", doc["storage_key"])

    @defer.inlineCallbacks
    def test_spreadsheet_and_csv(self):
        xlsx = b"PK\x03\x04" + os.urandom(2000)
        csv = b"sku,qty\r\nA-1,3\r\n"
        row = yield self.deliver(
            order(
                attachments=[
                    (xlsx, "application", "vnd.openxmlformats-officedocument.spreadsheetml.sheet", "order.xlsx"),
                    (csv, "text", "csv", "lines.csv"),
                ]
            )
        )
        docs = yield self.documents(row["id"])
        self.assertEqual([(d["filename"], d["bytes"]) for d in docs], [("order.xlsx", xlsx), ("lines.csv", csv)])

    @defer.inlineCallbacks
    def test_forwarded_mail_with_pdf_inside(self):
        inner = order(subject="Original", attachments=[(PDF, "application", "pdf", "inner.pdf")])
        outer = order(subject="Fwd: Original")
        outer.add_attachment(inner, filename="original.eml")
        row = yield self.deliver(outer)
        docs = yield self.documents(row["id"])
        self.assertEqual([d["filename"] for d in docs], ["original.eml", "inner.pdf"])
        self.assertEqual(docs[1]["bytes"], PDF)
        self.assertIn(b"Subject: Original", docs[0]["bytes"])

    @defer.inlineCallbacks
    def test_undecodable_part_leaves_the_message_parsed_with_warnings(self):
        """Issue 14, defect 4: the good attachment is extracted, the bad part named in warnings and counted."""
        msg = order(subject="Partial", attachments=[(PDF, "application", "pdf", "order.pdf")])
        msg.add_attachment(b"gif", maintype="image", subtype="gif", filename="spacer.gif")
        raw = msg.as_bytes().replace(base64.b64encode(b"gif"), b"The file was removed")
        skipped = metrics.PARTS_SKIPPED._value.get()
        row = yield self.deliver(raw)
        self.assertEqual(row["status"], "parsed")
        self.assertIn("'spacer.gif'): base64 content cannot be decoded, skipped", row["warnings"])
        docs = yield self.documents(row["id"])
        self.assertEqual([d["filename"] for d in docs], ["order.pdf"])
        self.assertEqual(metrics.PARTS_SKIPPED._value.get(), skipped + 1)

    @defer.inlineCallbacks
    def test_inline_logo_and_pdf(self):
        msg = EmailMessage()
        msg["From"] = "buyer@customer.test"
        msg["Subject"] = "Order with logo"
        msg.set_content("text body")
        msg.add_alternative('<p>Order</p><img src="cid:logo@customer.test">', subtype="html")
        html = msg.get_payload()[1]
        html.add_related(LOGO, maintype="image", subtype="png", cid="<logo@customer.test>")
        msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="order.pdf")
        row = yield self.deliver(msg)
        docs = yield self.documents(row["id"])
        self.assertEqual([d["filename"] for d in docs], ["order.pdf"])

    @defer.inlineCallbacks
    def test_no_attachment(self):
        row = yield self.deliver(order())
        self.assertEqual(row["status"], "parsed")
        self.assertEqual((yield self.documents(row["id"])), [])

    @defer.inlineCallbacks
    def test_hostile_filename_is_metadata_only(self):
        row = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "../../etc/passwd.pdf")]))
        [doc] = yield self.documents(row["id"])
        self.assertNotIn("/", doc["filename"])
        self.assertFalse(doc["filename"].startswith("."))
        self.assertTrue(doc["filename"].endswith(".pdf"))
        self.assertEqual(doc["storage_key"], f"documents/{row['org_id']}/{row['id']}/0")

    @defer.inlineCallbacks
    def test_reprocess_does_not_duplicate_documents(self):
        row = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "a.pdf"), (PDF, "application", "pdf", "b.pdf")]))
        before = yield self.documents(row["id"])
        yield self.daemon.store.reprocess(row["id"])
        self.daemon.service.extraction.wake()
        row = yield self.daemon.settled(row["id"])
        after = yield self.documents(row["id"])
        self.assertEqual(row["status"], "parsed")
        self.assertEqual([d["id"] for d in after], [d["id"] for d in before])

    @defer.inlineCallbacks
    def test_storage_failure_during_extraction_is_retried(self):
        real_put = self.daemon.blobs.put_file
        calls = []

        def flaky(key, *args):
            calls.append(key)
            if key.startswith("documents/") and len([c for c in calls if c.startswith("documents/")]) <= 1:
                return defer.fail(StorageError("S3 said 503"))
            return real_put(key, *args)

        self.patch(self.daemon.blobs, "put_file", flaky)
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "retry.pdf")]), settle=False)
        row = yield self.daemon.until(message_id, lambda r: r["attempts"] >= 1, timeout=10)
        self.assertEqual(row["status"], "received")
        self.assertIn("503", row["last_error"])
        row = yield self.daemon.settled(row["id"], timeout=10)
        self.assertEqual(row["status"], "parsed")
        docs = yield self.documents(row["id"])
        self.assertEqual([d["bytes"] for d in docs], [PDF])

    @defer.inlineCallbacks
    def test_parser_that_hangs_is_killed_and_the_message_retried(self):
        parser = self.daemon.service.extraction.messages.parser
        self.patch(parser, "_timeout", 0.5)
        self.patch(parser, "_argv", [sys.executable, "-c", "import time; time.sleep(60)"])
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "stuck.pdf")]), settle=False)
        row = yield self.daemon.until(message_id, lambda r: r["attempts"] >= 1, timeout=10)
        self.assertEqual(row["status"], "received")
        self.assertIn("ParserDied: the parser was stopped after 0.5 s", row["last_error"])
        # The next worker is a healthy one: the retry parses the message.
        self.patch(parser, "_argv", WORKER_ARGV)
        self.patch(parser, "_timeout", 30)  # a new worker may take over 0.5 s to start on a loaded machine
        row = yield self.daemon.settled(message_id, timeout=30)
        self.assertEqual(row["status"], "parsed")
        self.assertEqual([d["bytes"] for d in (yield self.documents(message_id))], [PDF])

    @defer.inlineCallbacks
    def test_persistent_storage_failure_ends_failed(self):
        self.daemon.service.extraction.outcomes.max_attempts = 2

        def broken(key, *args):
            return defer.fail(StorageError("bucket gone"))

        real_put = self.daemon.blobs.put_file
        self.patch(self.daemon.blobs, "put_file", lambda key, *a: broken(key) if key.startswith("documents/") else real_put(key, *a))
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "x.pdf")]), settle=False)
        row = yield self.daemon.settled(message_id, timeout=10)
        self.assertEqual((row["status"], row["attempts"]), ("failed", 2))
        self.assertIn("bucket gone", row["last_error"])


class OutcomeErrorTests(ExtractionCase):
    """Recording an outcome can fail too: that is an attempt, and the claim is not left held."""

    @defer.inlineCallbacks
    def test_documents_that_cannot_be_recorded_count_as_attempts(self):
        self.daemon.service.extraction.outcomes.max_attempts = 2
        self.patch(self.daemon.store, "mark_parsed", lambda *a: defer.fail(ValueError("A string literal cannot contain NUL")))
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "x.pdf")]), settle=False)
        row = yield self.daemon.settled(message_id, timeout=10)
        self.assertEqual((row["status"], row["attempts"]), ("failed", 2))
        self.assertIn("cannot record the documents: A string literal cannot contain NUL", row["last_error"])

    @defer.inlineCallbacks
    def test_storage_and_database_recovered_message_parsed_within_backoff_not_lease(self):
        """A full disk: the document put fails, and so does recording the retry; then space is freed."""
        extraction = self.daemon.service.extraction
        extraction.lease_seconds = 60
        full = [True]
        refused = []
        first_refusal = defer.Deferred()
        real_put = self.daemon.blobs.put_file
        real_retry = self.daemon.store.schedule_retry

        def put_file(key, *args):
            if full[0] and key.startswith("documents/"):
                return defer.fail(StorageError("No space left on device"))
            return real_put(key, *args)

        def schedule_retry(*args):
            if full[0]:
                refused.append(args)
                if not first_refusal.called:
                    first_refusal.callback(None)
                return defer.fail(sqlite3.OperationalError("database or disk is full"))
            return real_retry(*args)

        self.patch(self.daemon.blobs, "put_file", put_file)
        self.patch(self.daemon.store, "schedule_retry", schedule_retry)
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "full.pdf")]), settle=False)
        yield first_refusal
        full[0] = False
        recovered = time.monotonic()
        row = yield self.daemon.settled(message_id, timeout=10)
        self.assertEqual((row["status"], row["attempts"]), ("parsed", 2))
        self.assertLess(time.monotonic() - recovered, 10)
        self.assertEqual([d["bytes"] for d in (yield self.documents(message_id))], [PDF])


class CorpusTests(ExtractionCase):
    """Every sample message of tests/samples ends parsed or failed, the daemon alive."""

    @defer.inlineCallbacks
    def test_corpus(self):
        files = sample_messages()
        self.assertGreater(len(files), 100)

        def send_all(client):
            client.ehlo("customer.test")
            outcome = {}
            for i, path in enumerate(files):
                with open(path, "rb") as f:
                    data = f.read()
                data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                try:
                    client.sendmail("buyer@customer.test", ["orders+acme@example.com"], data)
                    outcome[path] = "accepted"
                except smtplib.SMTPResponseException as e:
                    outcome[path] = f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}"
                    client.rset()
            return outcome

        outcome = yield self.daemon.smtp(send_all)
        refused = {p: o for p, o in outcome.items() if o != "accepted"}
        for path, reply in refused.items():
            self.assertTrue(reply.startswith("5"), f"{path}: {reply}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = yield self.daemon.store.count_messages("received")
            if not waiting:
                break
            yield sleep(0.2)
        self.assertEqual(waiting, 0, "messages stuck in received")
        rows = yield self.daemon.store.list_messages(limit=1000)
        self.assertEqual({r["status"] for r in rows} - {"parsed", "failed"}, set())
        docs = yield self.daemon.store.list_documents()
        self.assertGreater(len(docs), 10)
        self._report(rows, docs, refused)
        # still serving
        code, _ = yield self.daemon.send(order().as_bytes().replace(b"\n", b"\r\n"), ["orders+acme@example.com"])
        self.assertEqual(code, 250)

    def _report(self, rows, docs, refused):
        """Written to _trial_temp for the issue note: outcome per corpus message."""
        by_message = {}
        for doc in docs:
            by_message.setdefault(doc["inbound_message_id"], []).append(doc["filename"])
        lines = [f"{r['id']}\t{r['status']}\t{r['subject']}\t{by_message.get(r['id'], [])}\t{r['last_error'] or ''}" for r in rows]
        lines += [f"refused\t{p}\t{o}" for p, o in refused.items()]
        with open("corpus-report.tsv", "w") as f:
            f.write("\n".join(lines) + "\n")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


class KillDuringExtractionTests(unittest.TestCase):
    def test_kill_during_extraction_then_restart(self):
        directory = temp_dir(self)
        self.assertEqual(mailingest_cli(directory, "migrate").returncode, 0)
        self.assertEqual(mailingest_cli(directory, "org", "add", "acme").returncode, 0)
        parts = [(os.urandom(50000), "application", "pdf", f"part-{i:03}.pdf") for i in range(150)]
        data = order(attachments=parts).as_bytes().replace(b"\n", b"\r\n")
        daemon = TwistdProcess(directory, "--domain", "example.com").start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as client:
            client.sendmail("buyer@customer.test", ["orders+acme@example.com"], data)
        db_path = os.path.join(directory, "mailingest-data", "mailingest.db")
        killed_with = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            db = sqlite3.connect(db_path)
            try:
                count = db.execute("SELECT COUNT(*) FROM document").fetchone()[0]
            finally:
                db.close()
            if count:
                workers = children(daemon.process.pid)
                daemon.stop(signal.SIGKILL)
                killed_with = count
                break
            time.sleep(0.005)
        self.assertIsNotNone(killed_with, "extraction never started")
        # The parser worker saw its pipe close and exited: none outlives its daemon.
        self.assertTrue(workers, "no parser worker process found")
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse([pid for pid in workers if os.path.exists(f"/proc/{pid}")], "orphaned parser worker")
        db = sqlite3.connect(db_path)
        status = db.execute("SELECT status FROM inbound_message").fetchone()[0]
        db.close()
        daemon = TwistdProcess(directory, "--domain", "example.com").start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            db = sqlite3.connect(db_path)
            try:
                status = db.execute("SELECT status FROM inbound_message").fetchone()[0]
                docs = db.execute("SELECT ordinal, filename, sha256 FROM document ORDER BY ordinal").fetchall()
            finally:
                db.close()
            if status != "received":
                break
            time.sleep(0.1)
        self.assertEqual(status, "parsed")
        expected = [(i, p[3], hashlib.sha256(p[0]).hexdigest()) for i, p in enumerate(parts)]
        self.assertEqual(docs, expected)


class HeldParser:
    """A parser whose work ends when the test says so."""

    def __init__(self):
        self.started = defer.Deferred()
        self.finish = defer.Deferred()

    def parse(self, raw_path, out_dir):
        self.started.callback(raw_path)
        return self.finish

    def close(self):
        return defer.succeed(None)


class RawOnDisk:
    """Blobs whose raw messages are local files (so no read), and no documents to store."""

    def __init__(self, path: str):
        self.path = path

    def local_path(self, key):
        return self.path


class LeaseTests(unittest.TestCase):
    """
    A claim is renewed while its extraction runs. Time is a task.Clock that the
    store reads too (its leases are clock time), advanced, not slept; the
    store is a real SQLite one.
    """

    LEASE = 30.0

    @defer.inlineCallbacks
    def test_claim_is_renewed_while_extraction_runs(self):
        directory = temp_dir(self)
        clock = task.Clock()
        clock.advance(time.time())
        store = Store(SqliteEngine(os.path.join(directory, "mailingest.db")), MESSAGE_EVENTS, clock=clock)
        self.addCleanup(store.close)
        yield store.migrate()
        org = yield store.add_org("acme", "Acme Corp")
        [message_id] = yield store.insert_messages([stored_message(org["id"], "<slow@x>")])
        renewals = []
        renew = store.renew_claims
        self.patch(store, "renew_claims", lambda ids, lease: renewals.append(renew(ids, lease)) or renewals[-1])
        parser = HeldParser()
        extraction = ExtractionService(
            store, RawOnDisk(os.path.join(directory, "raw.eml")), parser,
            work_dir=os.path.join(directory, "work"), lease_seconds=self.LEASE, concurrency=1, clock=clock,
        )
        yield extraction.startService()
        yield parser.started
        # three lease lengths go by while the parser works
        for _ in range(9):
            clock.advance(self.LEASE / 3)
            self.assertTrue(renewals, "no renewal")
            yield renewals[-1]
        self.assertEqual(len(renewals), 9)
        # another daemon polling now finds nothing to take over
        self.assertEqual((yield store.claim(60)), [])
        parser.finish.callback(ExtractionResult(attachments=[], warnings=[]))
        yield extraction.stopService()
        self.assertEqual((yield store.get_message(message_id))["status"], "parsed")
        clock.advance(self.LEASE)
        self.assertEqual(len(renewals), 9, "renewed after the work was done")


class WorkSlotTests(unittest.TestCase):
    def test_leftovers_of_dead_daemons_removed_live_ones_kept(self):
        from mailingest.extraction.service import make_slots

        work = os.path.abspath(self.mktemp())
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for name in (str(dead.pid), str(os.getppid()), "tmpk2j4x_old-layout"):
            os.makedirs(os.path.join(work, name, "slot-0", "parts"))
        slots = make_slots(work, 2)
        self.assertEqual(sorted(os.listdir(work)), sorted([str(os.getppid()), str(os.getpid())]))
        self.assertEqual(len(slots), 2)
        for slot in slots:
            self.assertEqual(os.listdir(os.path.join(slot, "parts")), [])


class ClaimsLeftAtStartTests(unittest.TestCase):
    """The service asks the store whether the claims it finds are its own (IStore.exclusive), not which engine it is."""

    class Store:
        def __init__(self, exclusive: bool):
            self.exclusive = exclusive
            self.released = []

        def release_claims(self, message_ids=None):
            self.released.append(message_ids)
            return defer.succeed(None)

        def on_received(self, callback):
            return defer.succeed(None)

        def claim(self, lease_seconds, limit=1):
            return defer.succeed([])

    def started(self, exclusive: bool) -> "ClaimsLeftAtStartTests.Store":
        from twisted.internet import task

        from mailingest.extraction.service import ExtractionService

        store = self.Store(exclusive)
        service = ExtractionService(store, None, None, os.path.abspath(self.mktemp()), clock=task.Clock())
        self.successResultOf(defer.maybeDeferred(service.startService))
        service._loop.stop()
        return store

    def test_an_exclusive_store_releases_every_claim(self):
        self.assertEqual(self.started(exclusive=True).released, [None])

    def test_a_shared_store_leaves_other_daemons_claims(self):
        self.assertEqual(self.started(exclusive=False).released, [])


class ClassSizeTests(unittest.TestCase):
    """Issue 24: the claiming, one message's handling and its outcomes each in a class short enough to read."""

    def test_extraction_service_classes_under_250_lines(self):
        import mailingest.extraction.service

        directory = os.path.dirname(mailingest.extraction.service.__file__)
        sizes = {}
        for name in {"service.py", "handling.py", "outcomes.py"} & set(os.listdir(directory)):
            with open(os.path.join(directory, name)) as f:
                tree = ast.parse(f.read())
            sizes.update({node.name: node.end_lineno - node.lineno + 1 for node in tree.body if isinstance(node, ast.ClassDef)})
        self.assertIn("ExtractionService", sizes)
        self.assertEqual({name: size for name, size in sizes.items() if size > 250}, {})
