"""
The admin command from the outside: the real console script in a subprocess,
against a temporary SQLite database and file storage whose rows are written
through the store API; plus C{send-test} against a recording SMTP sink.
"""

import contextlib
import email
import email.policy
import glob
import hashlib
import io
import json
import os
import pwd
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from aiosmtpd.controller import Controller
from twisted.internet import defer
from twisted.trial import unittest

from mailingest import __version__
from mailingest.app.cli import main
from mailingest.app.cli_output import table, to_json
from mailingest.app.mail_sender import SendError, daemon_server, parse_server
from mailingest.handoff.api import read_admin_token
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.store import open_store
from tests.ports import free_port
from tests.test_urls import HOSTILE_URLS, leaked

SCRIPT = os.path.join(os.path.dirname(sys.executable), "mailingest")
COMMAND = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "mailingest"]

ORG_KEYS = {"id", "slug", "name", "active", "created_at", "reserved"}
MESSAGE_KEYS = {
    "id", "org_id", "source", "source_message_id", "mail_from", "rcpt_to", "subject",
    "raw_key", "raw_size", "raw_sha256", "status", "attempts", "last_error",
    "received_at", "parsed_at",
}
DOCUMENT_KEYS = {
    "id", "org_id", "inbound_message_id", "filename", "content_type", "size", "sha256",
    "storage_key", "created_at",
}

RAW_1 = (
    b"Received: from customer.test by mx.test; Mon, 6 Jan 2025 10:00:00 +0000\r\n"
    b"From: Buyer <buyer@customer.test>\r\nTo: orders+acme@example.com\r\n"
    b"Subject: Order 1\r\nDate: Mon, 6 Jan 2025 09:59:00 +0000\r\nMessage-ID:\r\n <one@customer.test>\r\n\r\n"
    b"Line one\r\n.leading dot\r\nbare LF stays\n\r\n"
)
RAW_2 = b"From: b@beta.test\r\nSubject: broken\r\n\r\n\x00\xff not mime\r\n"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
CSV = b"sku,qty\r\nA-1,3\r\nB-2,5\r\n"


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without any MAILINGEST_* setting of the machine."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
    environ.update(extra)
    return environ


class CommandTestCase(unittest.TestCase):
    """A working directory with a database and file storage, and a way to run the command there."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.database = self.make_database()
        self.blob_root = os.path.join(self.directory, "data", "blobs")
        self.storage = "file:" + self.blob_root

    def make_database(self) -> str:
        return "sqlite:///" + os.path.join(self.directory, "data", "mailingest.db")

    def run_command(self, *argv: str, environ=None, cwd=None, storage=True) -> subprocess.CompletedProcess:
        """C{mailingest [--database ... --storage ...] argv...}; output as bytes."""
        options = ["--database", self.database, "--storage", self.storage] if storage else []
        return subprocess.run(
            [*COMMAND, *options, *argv],
            cwd=cwd or self.directory,
            env=clean_environ() if environ is None else environ,
            capture_output=True,
            timeout=60,
        )

    def ok(self, *argv: str, **kwargs) -> str:
        result = self.run_command(*argv, **kwargs)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return result.stdout.decode()

    def json(self, *argv: str, **kwargs):
        return json.loads(self.ok(*argv, "--json", **kwargs))

    def user_error(self, *argv: str, expected: str, **kwargs) -> str:
        """Exit status 1 and one line on stderr, naming the problem, without a traceback."""
        result = self.run_command(*argv, **kwargs)
        stderr = result.stderr.decode()
        self.assertEqual(result.returncode, 1, f"{argv}: {stderr}")
        self.assertNotIn("Traceback", stderr)
        self.assertEqual(len(stderr.splitlines()), 1, stderr)
        self.assertTrue(stderr.startswith("mailingest: "), stderr)
        self.assertIn(expected, stderr)
        return stderr

    def blob(self, key: str, data: bytes) -> None:
        path = os.path.join(self.blob_root, *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


class FixtureTestCase(CommandTestCase):
    """
    Organisations acme and beta; message 1 (acme, parsed, two documents),
    2 (beta, failed, one document whose blob is missing) and 3 (acme, failed,
    raw blob missing), received in that order.
    """

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        store = open_store(self.database, MESSAGE_EVENTS)
        try:
            yield store.migrate()
            acme = yield store.add_org("acme", "Acme Corp")
            beta = yield store.add_org("beta", "Beta Ltd")
            start = datetime(2025, 1, 6, 10, 0, tzinfo=timezone.utc)
            rows = []
            for n, (org, raw) in enumerate(((acme, RAW_1), (beta, RAW_2), (acme, b"gone")), 1):
                rows.append({
                    "org_id": org["id"], "source": "smtp", "source_message_id": f"<m{n}@customer.test>",
                    "mail_from": f"sender{n}@customer.test", "rcpt_to": f"orders+{org['slug']}@example.com",
                    "subject": f"Order {n}", "raw_key": f"raw/m{n}", "raw_size": len(raw),
                    "raw_sha256": _sha256(raw), "received_at": start + timedelta(minutes=n),
                })
            ids = yield store.insert_messages(rows)
            self.assertEqual(ids, [1, 2, 3])
            self.blob("raw/m1", RAW_1)
            self.blob("raw/m2", RAW_2)
            documents = ((1, 1, "invoice.pdf", "application/pdf", PDF), (1, 2, "lines.csv", "text/csv", CSV),
                         (2, 1, "lost.bin", "application/octet-stream", b"never stored"))
            extracted = {1: [], 2: []}
            for message_id, ordinal, filename, content_type, data in documents:
                key = f"doc/{message_id}-{ordinal}"
                extracted[message_id].append({
                    "org_id": rows[message_id - 1]["org_id"], "ordinal": ordinal,
                    "filename": filename, "content_type": content_type, "size": len(data),
                    "sha256": _sha256(data), "storage_key": key,
                })
                if message_id == 1:
                    self.blob(key, data)
            yield store.mark_parsed(1, extracted[1])
            yield store.mark_parsed(2, extracted[2])
            yield store.mark_failed(2, "cannot decode part 2", 1)
            yield store.mark_failed(3, "storage kept failing", 5)
        finally:
            yield store.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class GeneralTests(CommandTestCase):
    def test_version_and_module(self):
        self.assertEqual(self.ok("--version", storage=False).strip(), f"mailingest {__version__}")
        result = subprocess.run(
            [sys.executable, "-m", "mailingest", "--version"], capture_output=True, env=clean_environ(), timeout=60
        )
        self.assertEqual(result.stdout.decode().strip(), f"mailingest {__version__}")

    def test_migrate_twice(self):
        self.assertTrue(self.ok("migrate").startswith("applied schema version(s) 1, "))
        self.assertEqual(self.ok("migrate"), "schema up to date\n")
        self.assertTrue(os.path.exists(os.path.join(self.directory, "data", "mailingest.db")))

    def test_store_warnings_on_stderr(self):
        """What the store warns of while a command runs is said on stderr: here a search file it had to make again."""
        self.ok("migrate")
        search_file = os.path.join(self.directory, "data", "mailingest.db-search")
        with open(search_file, "wb") as f:
            f.write(b"not a database" * 1000)
        result = self.run_command("messages", "list")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"mailingest: warning: search index {search_file} could not be read (file is not a database):"
            f" moved to {search_file}.damaged, made again, filled from the database"
        ])
        self.assertEqual(self.run_command("messages", "list").stderr, b"")

    def test_root_refused_in_the_daemons_directory(self):
        """Root, on a database whose directory another user (the daemon's) owns: refused, and nothing made there."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        self.ok("migrate")
        data = os.path.join(self.directory, "data")
        before = sorted(os.listdir(data))
        nobody = pwd.getpwnam("nobody").pw_uid
        os.chown(data, nobody, -1)
        self.addCleanup(os.chown, data, 0, -1)
        result = self.run_command("org", "add", "acme")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), (
            f"mailingest: {data} belongs to nobody: run this command as that user (sudo -u nobody mailingest ...),"
            " or the files it makes there would be root's and the daemon could not write them\n"
        ))
        self.assertEqual(sorted(os.listdir(data)), before)
        os.chown(data, 0, -1)
        self.ok("org", "add", "acme")

    def test_usage_errors_exit_2(self):
        for argv in (("reprocess",), ("reprocess", "1", "--failed"), ("reprocess", "1", "--org", "acme"),
                     ("messages", "list", "--limit", "0"), ("messages", "show", "x")):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()) as stderr:
                with self.assertRaises(SystemExit) as e:
                    main(list(argv))
                self.assertEqual(e.exception.code, 2)
                self.assertIn("usage:", stderr.getvalue())

    def test_numeric_arguments_say_what_is_wrong(self):
        for value, reason in (("x", "not a number: 'x'"), ("0", "must be at least 1: '0'")):
            with self.subTest(value=value), contextlib.redirect_stderr(io.StringIO()) as stderr:
                with self.assertRaises(SystemExit):
                    main(["messages", "list", "--limit", value])
                self.assertIn(f"error: argument --limit: {reason}\n", stderr.getvalue())


class OrganisationTests(CommandTestCase):
    def test_lifecycle(self):
        self.ok("migrate")
        self.assertEqual(self.ok("org", "add", "Acme", "--name", "Acme Corp"), "added organisation acme (id 1)\n")
        self.ok("org", "add", "beta")
        self.user_error("org", "add", "ACME", expected="organisation 'acme' already exists")
        self.user_error("org", "add", "bad slug!", expected="invalid organisation slug 'bad slug!'")
        self.user_error("org", "disable", "nope", expected="no organisation 'nope'")
        self.user_error("org", "enable", "nope", expected="no organisation 'nope'")

        lines = self.ok("org", "list").splitlines()
        self.assertEqual(lines[0].split(), ["slug", "name", "active", "created_at", "reserved"])
        self.assertEqual(lines[1].split()[:4], ["_postmaster", "postmaster", "(reserved)", "yes"])
        self.assertEqual(lines[1].split()[-1], "yes")
        self.assertEqual(lines[2].split()[:4], ["acme", "Acme", "Corp", "yes"])
        self.assertEqual(lines[2].split()[-1], "no")
        self.assertEqual(lines[2].index("yes"), lines[0].index("active"))

        self.assertEqual(self.ok("org", "disable", "ACME"), "disabled organisation acme\n")
        self.user_error("org", "disable", "_Postmaster", expected="organisation _postmaster is reserved")
        self.user_error("org", "add", "_postmaster", expected="invalid organisation slug")
        orgs = self.json("org", "list")
        self.assertEqual([(o["slug"], o["name"], o["active"], o["reserved"]) for o in orgs],
                         [("_postmaster", "postmaster (reserved)", True, True),
                          ("acme", "Acme Corp", False, False), ("beta", "", True, False)])
        self.assertEqual(set(orgs[0]), ORG_KEYS)
        datetime.fromisoformat(orgs[0]["created_at"])

        self.assertEqual(self.ok("org", "enable", "acme"), "enabled organisation acme\n")
        self.assertEqual([o["active"] for o in self.json("org", "list")], [True, True, True])


class MessageTests(FixtureTestCase):
    def test_list(self):
        lines = self.ok("messages", "list").splitlines()
        self.assertEqual(lines[0].split(), ["id", "org_slug", "status", "received_at", "mail_from", "subject"])
        self.assertEqual([line.split()[:3] for line in lines[1:]],
                         [["3", "acme", "failed"], ["2", "beta", "failed"], ["1", "acme", "parsed"]])
        self.assertIn("2025-01-06 10:01:00Z", lines[3])

        messages = self.json("messages", "list")
        self.assertEqual([m["id"] for m in messages], [3, 2, 1])
        self.assertLessEqual(MESSAGE_KEYS, set(messages[0]))
        self.assertEqual(messages[2]["received_at"], "2025-01-06T10:01:00+00:00")
        self.assertEqual(messages[1]["last_error"], "cannot decode part 2")
        datetime.fromisoformat(messages[2]["parsed_at"])

        self.assertEqual([m["id"] for m in self.json("messages", "list", "--org", "ACME")], [3, 1])
        self.assertEqual([m["id"] for m in self.json("messages", "list", "--status", "failed", "--org", "beta")], [2])
        self.assertEqual([m["id"] for m in self.json("messages", "list", "--limit", "1")], [3])
        self.user_error("messages", "list", "--org", "nope", expected="no organisation 'nope'")

    def test_show(self):
        text = self.ok("messages", "show", "1")
        self.assertIn("source_message_id: <m1@customer.test>", text)
        self.assertIn("status:            parsed", text)
        self.assertIn("last_error:        -", text)
        self.assertIn("received_at:       2025-01-06T10:01:00+00:00", text)
        self.assertIn("documents (2):", text)
        self.assertIn("invoice.pdf", text)
        self.assertIn("lines.csv", text)
        self.assertIn("last_error:        cannot decode part 2", self.ok("messages", "show", "2"))

        shown = self.json("messages", "show", "1")
        self.assertLessEqual(MESSAGE_KEYS | {"documents"}, set(shown))
        self.assertEqual(shown["org_slug"], "acme")
        self.assertEqual([d["filename"] for d in shown["documents"]], ["invoice.pdf", "lines.csv"])
        self.assertLessEqual(DOCUMENT_KEYS, set(shown["documents"][0]))
        self.user_error("messages", "show", "999", expected="no message 999")

    def test_show_headers_of_the_stored_copy(self):
        """Issue 23 item 10: on main no header of the message was shown."""
        lines = self.ok("messages", "show", "1").splitlines()
        self.assertEqual(lines[:7], [
            "headers:",
            "From:       Buyer <buyer@customer.test>",
            "To:         orders+acme@example.com",
            "Date:       Mon, 6 Jan 2025 09:59:00 +0000",
            "Subject:    Order 1",
            "Message-ID: <one@customer.test>",
            "",
        ])
        self.assertEqual(self.json("messages", "show", "1")["headers"], {
            "From": "Buyer <buyer@customer.test>", "To": "orders+acme@example.com",
            "Date": "Mon, 6 Jan 2025 09:59:00 +0000", "Subject": "Order 1", "Message-ID": "<one@customer.test>",
        })
        self.assertEqual(self.ok("messages", "show", "2").splitlines()[:3],
                         ["headers:", "From:       b@beta.test", "Subject:    broken"])
        text = self.ok("messages", "show", "3")
        self.assertTrue(text.startswith("headers: none in the stored copy\n"), text)
        self.assertIn("status:            failed", text)

        blocker = os.path.join(self.directory, "a-file")
        with open(blocker, "w"):
            pass
        text = self.ok("--storage", f"file:{blocker}/blobs", "messages", "show", "1", "--database", self.database, storage=False)
        self.assertTrue(text.startswith(f"headers: cannot read the stored copy: storage file:{blocker}/blobs: "), text)
        self.assertIn("source_message_id: <m1@customer.test>", text)

    def test_raw(self):
        result = self.run_command("messages", "raw", "1")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(result.stdout, RAW_1)
        self.assertEqual(self.run_command("messages", "raw", "2").stdout, RAW_2)
        self.user_error("messages", "raw", "3", expected="message 3: blob raw/m3 is missing from object storage")
        self.user_error("messages", "raw", "999", expected="no message 999")

    def test_storage_unusable(self):
        blocker = os.path.join(self.directory, "a-file")
        with open(blocker, "w"):
            pass
        stderr = self.user_error("--database", self.database, "--storage", f"file:{blocker}/blobs",
                                 "messages", "raw", "1", storage=False, expected=f"storage file:{blocker}/blobs: ")
        self.assertIn("Not a directory", stderr)
        self.user_error("--database", self.database, "--storage", "ftp://files.test/x", "messages", "raw", "1",
                        storage=False, expected="unsupported storage URL 'ftp://files.test/x'")

    def test_raw_that_does_not_match_its_row(self):
        self.blob("raw/m1", RAW_1.replace(b"Order 1", b"Order 9"))
        self.user_error("messages", "raw", "1", expected="do not match the recorded size")


class DocumentTests(FixtureTestCase):
    def test_list(self):
        lines = self.ok("documents", "list").splitlines()
        self.assertEqual(lines[0].split(),
                         ["id", "org_slug", "inbound_message_id", "filename", "content_type", "size", "created_at"])
        self.assertEqual(len(lines), 4)
        documents = self.json("documents", "list")
        self.assertEqual({d["id"] for d in documents}, {1, 2, 3})
        self.assertLessEqual(DOCUMENT_KEYS, set(documents[0]))
        datetime.fromisoformat(documents[0]["created_at"])
        self.assertEqual({d["id"] for d in self.json("documents", "list", "--org", "acme")}, {1, 2})
        by_message = self.json("documents", "list", "--message", "1")
        self.assertEqual([(d["filename"], d["size"]) for d in by_message],
                         [("invoice.pdf", len(PDF)), ("lines.csv", len(CSV))])
        self.assertEqual(self.json("documents", "list", "--message", "3"), [])
        self.user_error("documents", "list", "--org", "nope", expected="no organisation 'nope'")
        self.user_error("documents", "list", "--message", "999", expected="no message 999")

    def test_show(self):
        """Issue 14: the columns of migration 005 are shown (NULL for documents extracted before it)."""
        document = self.json("documents", "show", "1")
        self.assertEqual((document["id"], document["filename"]), (1, "invoice.pdf"))
        for column in ("original_filename", "content_type_raw", "disposition", "content_id"):
            self.assertIn(column, document)
            self.assertIsNone(document[column])
        self.assertIn("original_filename:", self.ok("documents", "show", "1"))
        self.user_error("documents", "show", "999", expected="no document 999")

    def test_get(self):
        target = os.path.join(self.directory, "out", "invoice.pdf")
        os.makedirs(os.path.dirname(target))
        self.ok("documents", "get", "1", "-o", target)
        with open(target, "rb") as f:
            self.assertEqual(f.read(), PDF)
        self.ok("documents", "get", "2", "--output", "out/lines.csv")
        with open(os.path.join(self.directory, "out", "lines.csv"), "rb") as f:
            self.assertEqual(f.read(), CSV)
        self.assertEqual(self.run_command("documents", "get", "1", "-o", "-").stdout, PDF)
        self.assertEqual(sorted(os.listdir(os.path.dirname(target))), ["invoice.pdf", "lines.csv"])

    def test_get_failures_leave_no_file(self):
        out = os.path.join(self.directory, "out")
        os.makedirs(out)
        self.user_error("documents", "get", "999", "-o", "out/x", expected="no document 999")
        self.user_error("documents", "get", "3", "-o", "out/lost.bin",
                        expected="document 3: blob doc/2-1 is missing from object storage")
        self.blob("doc/1-1", PDF[:100])
        self.user_error("documents", "get", "1", "-o", "out/invoice.pdf", expected="do not match")
        self.assertEqual(os.listdir(out), [])
        self.user_error("documents", "get", "1", "-o", "no/such/dir/x.pdf", expected="No such file or directory")


class ReprocessTests(FixtureTestCase):
    def statuses(self) -> dict[int, str]:
        return {m["id"]: m["status"] for m in self.json("messages", "list")}

    def test_one(self):
        self.assertEqual(self.ok("reprocess", "1"), "queued message 1 for extraction again\n")
        shown = self.json("messages", "show", "1")
        self.assertEqual((shown["status"], shown["attempts"], shown["last_error"]), ("received", 0, None))
        self.assertEqual(len(shown["documents"]), 2)
        self.user_error("reprocess", "999", expected="no message 999")

    def test_failed_of_one_org(self):
        self.assertEqual(self.ok("reprocess", "--failed", "--org", "beta"),
                         "queued 1 failed message for extraction again\n")
        self.assertEqual(self.statuses(), {1: "parsed", 2: "received", 3: "failed"})
        self.user_error("reprocess", "--failed", "--org", "nope", expected="no organisation 'nope'")

    def test_all_failed(self):
        self.assertEqual(self.ok("reprocess", "--failed"), "queued 2 failed messages for extraction again\n")
        self.assertEqual(self.statuses(), {1: "parsed", 2: "received", 3: "received"})


class OptionTests(CommandTestCase):
    """Which database a command uses: --database, MAILINGEST_DATABASE, the config file, the default."""

    def databases_after(self, *argv: str, **environ: str) -> list[str]:
        case = self.mktemp()
        os.makedirs(case)
        with open(os.path.join(case, "mailingest.ini"), "w") as f:
            f.write("[mailingest]\ndatabase = sqlite:///from-file.db\nsmtp = tcp:25\n")
        self.ok(*argv, "migrate", cwd=case, storage=False, environ=clean_environ(**environ))
        return sorted(os.path.relpath(p, case) for p in glob.glob(os.path.join(case, "**", "*.db"), recursive=True))

    def test_precedence(self):
        self.assertEqual(self.databases_after(), ["mailingest-data/mailingest.db"])
        self.assertEqual(self.databases_after("--config", "mailingest.ini"), ["from-file.db"])
        self.assertEqual(self.databases_after(MAILINGEST_CONFIG="mailingest.ini"), ["from-file.db"])
        self.assertEqual(
            self.databases_after("--config", "mailingest.ini", MAILINGEST_DATABASE="sqlite:///from-env.db"),
            ["from-env.db"],
        )
        self.assertEqual(
            self.databases_after("--config", "mailingest.ini", "--database", "sqlite:///from-flag.db",
                                 MAILINGEST_DATABASE="sqlite:///from-env.db"),
            ["from-flag.db"],
        )

    def test_global_options_after_the_command(self):
        """Issue 23 item 5: on main, C{org list --database URL} was "unrecognized arguments"."""
        self.assertEqual(self.databases_after(), ["mailingest-data/mailingest.db"])
        case = self.mktemp()
        os.makedirs(case)
        with open(os.path.join(case, "mailingest.ini"), "w") as f:
            f.write("[mailingest]\ndatabase = sqlite:///from-file.db\n")
        self.ok("migrate", "--config", "mailingest.ini", cwd=case, storage=False)
        self.ok("migrate", "--database", "sqlite:///after.db", cwd=case, storage=False)
        self.ok("--database", "sqlite:///before.db", "migrate", cwd=case, storage=False)
        self.assertEqual(sorted(glob.glob("*.db", root_dir=case)), ["after.db", "before.db", "from-file.db"])
        self.assertIn("acme", self.ok("--database", "sqlite:///before.db", "org", "add", "acme", cwd=case, storage=False))
        # Given before the command and not after it: the value before stands.
        self.assertIn("acme", self.ok("--database", "sqlite:///before.db", "org", "list", "--json", cwd=case, storage=False))
        self.assertNotIn("acme", self.ok("--database", "sqlite:///before.db", "org", "list", "--database", "sqlite:///after.db",
                                         cwd=case, storage=False))
        self.assertIn("--database URL", self.ok("org", "list", "--help", storage=False))

    def test_configuration_errors(self):
        self.user_error("--config", "missing.ini", "org", "list", storage=False,
                        expected="cannot read config file missing.ini")
        self.user_error("org", "list", storage=False, environ=clean_environ(MAILINGEST_CONFIG="missing.ini"),
                        expected="cannot read config file missing.ini")
        stderr = self.user_error("--database", "mysql://admin:s3cret@db.test/x", "org", "list", storage=False,
                                 expected="unsupported database URL")
        self.assertNotIn("s3cret", stderr)
        self.user_error("--database", "sqlite:///", "migrate", storage=False, expected="bad database URL")
        stderr = self.user_error("--database", "postgresql://admin:s3cret@[::1/x", "migrate", storage=False,
                                 expected="bad database URL")
        self.assertNotIn("s3cret", stderr)

    def test_database_unreachable(self):
        stderr = self.user_error("--database", "postgresql://admin:s3cret@127.0.0.1:1/mailingest", "org", "list",
                                 storage=False, expected="postgresql://admin:***@127.0.0.1:1/mailingest")
        self.assertNotIn("s3cret", stderr)
        blocker = os.path.join(self.directory, "a-file")
        with open(blocker, "w"):
            pass
        self.user_error("--database", f"sqlite:///{blocker}/x.db", "migrate", storage=False,
                        expected="database sqlite:///")

    def test_no_database_here(self):
        """Issue 12 item 9: only migrate creates a database; elsewhere nothing is made."""
        empty = os.path.join(self.directory, "empty")
        os.makedirs(empty)
        data = os.path.join(empty, "mailingest-data")
        for argv in (("org", "list"), ("org", "add", "acme"), ("messages", "list"), ("documents", "list"),
                     ("reprocess", "--failed"), ("messages", "show", "1")):
            self.assertFalse(os.path.exists(data))
            self.user_error(*argv, cwd=empty, storage=False,
                            expected="no database at sqlite:///mailingest-data/mailingest.db;"
                                     " run from the daemon's directory or pass --database")
            self.assertEqual(os.listdir(empty), [], argv)
        self.user_error("--database", "sqlite:///elsewhere/x.db", "org", "list", cwd=empty, storage=False,
                        expected="no database at sqlite:///elsewhere/x.db")
        self.assertEqual(os.listdir(empty), [])
        self.ok("migrate", cwd=empty, storage=False)
        self.assertTrue(os.path.exists(os.path.join(data, "mailingest.db")))
        self.assertIn("slug", self.ok("org", "list", cwd=empty, storage=False))


    def test_hostile_database_urls_never_shown(self):
        """Issue 11 item 6: whatever shape the password has, the command does not print it."""
        for url, passwords, _ in HOSTILE_URLS:
            result = self.run_command("--database", url, "org", "list", storage=False)
            output = (result.stdout + result.stderr).decode()
            self.assertEqual(result.returncode, 1, output)
            self.assertIn("***", output, url)
            self.assertEqual(leaked(output, passwords), [], f"{url}: {output}")


class WebhookPolicyTests(CommandTestCase):
    """Issue 23 item 5: each refusal names an option that works, on this command too."""

    def setUp(self):
        super().setUp()
        self.ok("migrate")
        self.ok("org", "add", "acme")

    def test_refusals_name_options_this_command_takes(self):
        url = "http://127.0.0.1:9/hooks"
        self.user_error("org", "webhook", "acme", "--url", url, expected="(or run with --webhook-allow-http)")
        self.user_error("org", "webhook", "acme", "--url", url, "--webhook-allow-http",
                        expected="refused (run with --webhook-allow-private to allow internal targets)")
        out = self.ok("org", "webhook", "acme", "--url", url, "--webhook-allow-http", "--webhook-allow-private")
        lines = out.splitlines()
        self.assertEqual(lines[0], f"webhook of acme: {url}")
        self.assertEqual(lines[1:3], [
            f"note: the daemon checks the URL again before every delivery: run it with --{name} too"
            f" ({name} = yes in its --config file, or MAILINGEST_{name.upper().replace('-', '_')}=yes)"
            for name in ("webhook-allow-http", "webhook-allow-private")
        ])
        self.assertTrue(lines[3].startswith("signing secret (shown once, give it to the receiver): whsec_"))

    def test_the_daemons_configuration_needs_no_note(self):
        config = os.path.join(self.directory, "mailingest.ini")
        with open(config, "w") as f:
            f.write("[mailingest]\nwebhook-allow-private = yes\n")
        out = self.ok("org", "webhook", "acme", "--url", "http://127.0.0.1:9/hooks", "--config", config,
                      environ=clean_environ(MAILINGEST_WEBHOOK_ALLOW_HTTP="1"))
        self.assertNotIn("note:", out)
        self.assertIn("webhook of acme: http://127.0.0.1:9/hooks", out)

    def test_a_bad_secret_file_says_what_to_do(self):
        secret_file = os.path.join(self.directory, "secret")
        with open(secret_file, "w") as f:
            f.write("not-a-secret\n")
        self.user_error("org", "webhook", "acme", "--url", "https://127.0.0.1/hooks", "--webhook-allow-private", "--secret-file", secret_file,
                        expected=f"--secret-file {secret_file}: a webhook secret starts with whsec_ followed by base64;"
                                 " without --secret-file a new secret is made")


class AdminTokenTests(CommandTestCase):
    """Issue 23 item 7, issue 22 item 6: a strong admin token in a private file, never shown."""

    def test_write_refuse_force(self):
        path = os.path.join(self.directory, "api-admin-token")
        out = self.ok("admin-token", "--write", path, storage=False)
        with open(path) as f:
            token = f.read()
        self.assertRegex(token, r"^mit_[A-Za-z0-9_-]{43}\n$")
        self.assertEqual(read_admin_token(path), token.strip())
        self.assertNotIn(token.strip(), out)
        self.assertEqual(
            out, f"wrote a new admin token to {path} (mode 0600): give it to the daemon as --api-admin-token-file {path}\n"
        )
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

        self.user_error("admin-token", "--write", path, storage=False,
                        expected=f"{path} exists: --force replaces it (the daemon reads its token file at start)")
        with open(path) as f:
            self.assertEqual(f.read(), token)

        os.chmod(path, 0o644)
        self.ok("admin-token", "--write", path, "--force", storage=False)
        with open(path) as f:
            replaced = f.read()
        self.assertRegex(replaced, r"^mit_[A-Za-z0-9_-]{43}\n$")
        self.assertNotEqual(replaced, token)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(sorted(os.listdir(self.directory)), ["api-admin-token"])

    def test_needs_no_database_and_says_what_failed(self):
        path = os.path.join(self.directory, "missing", "token")
        self.user_error("admin-token", "--write", path, storage=False, expected=f"mailingest: cannot write {path}: No such file or directory")
        self.assertEqual(os.listdir(self.directory), [])


class ReadmeTests(unittest.SynchronousTestCase):
    def test_ids_are_said_to_have_gaps(self):
        """Issue 23 item 12: a user seeing message 15 and 16 missing is told why, and that nothing was lost."""
        with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
            data = f.read().split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
        self.assertIn("`inbound_message` | `id`", data)
        self.assertIn("Ids are unique but not dense", " ".join(data.split()))
        self.assertIn("mean nothing was lost", " ".join(data.split()))


class PostgresTests(FixtureTestCase):
    """The same commands on PostgreSQL, whose driver gives datetimes and booleans, not text."""

    def make_database(self) -> str:
        from tests.postgres import create_database, drop_database

        url = create_database()
        self.addCleanup(drop_database, url)
        return url

    def test_commands(self):
        # The fixture's schema was made without the search index (issue 28): migrate builds it, once.
        self.assertEqual(self.ok("migrate"), "schema up to date\nsearch index: complete\n")
        self.assertEqual(self.ok("migrate"), "schema up to date\n")
        orgs = self.json("org", "list")
        self.assertEqual({(o["slug"], o["active"], o["reserved"]) for o in orgs},
                         {("_postmaster", True, True), ("acme", True, False), ("beta", True, False)})
        datetime.fromisoformat(orgs[0]["created_at"])

        lines = self.ok("messages", "list").splitlines()
        self.assertEqual([line.split()[0] for line in lines[1:]], ["3", "2", "1"])
        self.assertIn("2025-01-06 10:01:00Z", lines[3])
        messages = self.json("messages", "list", "--org", "acme")
        self.assertEqual([m["id"] for m in messages], [3, 1])
        self.assertEqual(datetime.fromisoformat(messages[1]["received_at"]),
                         datetime(2025, 1, 6, 10, 1, tzinfo=timezone.utc))
        datetime.fromisoformat(messages[1]["parsed_at"])

        shown = self.json("messages", "show", "1")
        self.assertEqual([d["filename"] for d in shown["documents"]], ["invoice.pdf", "lines.csv"])
        datetime.fromisoformat(shown["documents"][0]["created_at"])
        self.assertIn("status:            parsed", self.ok("messages", "show", "1"))
        self.assertEqual(self.run_command("messages", "raw", "1").stdout, RAW_1)
        self.assertEqual(self.run_command("documents", "get", "2", "-o", "-").stdout, CSV)
        self.assertEqual({d["id"] for d in self.json("documents", "list", "--org", "acme")}, {1, 2})

        self.assertEqual(self.ok("reprocess", "--failed"), "queued 2 failed messages for extraction again\n")
        self.ok("org", "disable", "beta")
        self.assertEqual({o["slug"]: o["active"] for o in self.json("org", "list")},
                         {"_postmaster": True, "acme": True, "beta": False})


class FormattingTests(unittest.SynchronousTestCase):
    """PostgreSQL gives datetimes where SQLite gives text: both print as ISO 8601."""

    def test_datetimes(self):
        when = datetime(2025, 1, 6, 10, 1, tzinfo=timezone.utc)
        rows = [{"id": 1, "created_at": when}, {"id": 22, "created_at": when.isoformat()}]
        self.assertEqual(json.loads(to_json(rows)), [{"id": 1, "created_at": "2025-01-06T10:01:00+00:00"},
                                                     {"id": 22, "created_at": "2025-01-06T10:01:00+00:00"}])
        self.assertEqual(table(rows, ("id", "created_at")).splitlines(),
                         ["id  created_at", "1   2025-01-06 10:01:00Z", "22  2025-01-06 10:01:00Z"])

    def test_cells_stay_on_one_line(self):
        text = table([{"subject": "a\r\nb\tc" + "x" * 100}], ("subject",))
        self.assertEqual(text.splitlines()[1], "a  b c" + "x" * 55 + "...")

    def test_server_addresses(self):
        self.assertEqual(parse_server("mx.test:25"), ("mx.test", 25))
        self.assertEqual(parse_server("[::1]:2525"), ("::1", 2525))
        self.assertEqual(parse_server("mx.test"), ("mx.test", 2525))
        for bad in ("mx.test:", "mx.test:smtp", ":25", "[::1", "mx.test:70000"):
            with self.assertRaises(SendError):
                parse_server(bad)


class Sink:
    """An SMTP server that keeps what it is sent, refuses nobody@ and answers 451 to 'try later'."""

    def __init__(self):
        self.messages = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if b"Subject: try later" in envelope.content:
            return "451 4.3.0 Try again later"
        self.messages.append(envelope.content)
        return f"250 2.0.0 Ok: stored as message {len(self.messages)}"


class SendTestTests(CommandTestCase):
    def setUp(self):
        super().setUp()
        self.sink = Sink()
        controller = Controller(self.sink, hostname="127.0.0.1", port=free_port(), server_hostname="sink.test")
        controller.start()
        self.addCleanup(controller.stop)
        self.server = f"127.0.0.1:{controller.port}"
        self.pdf = os.path.join(self.directory, "order 7.pdf")
        with open(self.pdf, "wb") as f:
            f.write(PDF)
        self.csv = os.path.join(self.directory, "lines.csv")
        with open(self.csv, "wb") as f:
            f.write(CSV)

    def send(self, *argv: str) -> tuple[int, str, str]:
        """C{main} in this process: send-test needs no reactor."""
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            status = main(["send-test", "--server", self.server, *argv])
        return status, out.getvalue(), err.getvalue()

    def test_console_script_sends_attachments(self):
        out = self.ok("send-test", "--server", self.server, "--to", "orders+acme@example.com",
                      "--attach", self.pdf, self.csv, "--count", "3", storage=False)
        self.assertEqual(out.splitlines(), [f"sent {n}/3 to {self.server}: 250 2.0.0 Ok: stored as message {n}" for n in (1, 2, 3)])
        self.assertEqual(len(self.sink.messages), 3)
        parsed = [email.message_from_bytes(raw, policy=email.policy.default) for raw in self.sink.messages]
        self.assertEqual(len({m["Message-ID"] for m in parsed}), 3)
        first = parsed[0]
        self.assertEqual(first["To"], "orders+acme@example.com")
        self.assertEqual(first["From"], "mailingest-test@localhost")
        self.assertEqual(first["Subject"], "mailingest test message 1/3")
        self.assertIn("test message 1 of 3", first.get_body().get_content())
        attached = [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True))
                    for p in first.iter_attachments()]
        self.assertEqual(attached, [("order 7.pdf", "application/pdf", PDF), ("lines.csv", "text/csv", CSV)])
        self.assertIn(b"\r\n", self.sink.messages[0])

    def test_options(self):
        status, out, err = self.send("--to", "a+x@example.com", "--to", "b+y@example.com",
                                     "--from", "ops@corp.test", "--subject", "Hello", "--attach", self.csv)
        self.assertEqual((status, out, err), (0, f"sent 1/1 to {self.server}: 250 2.0.0 Ok: stored as message 1\n", ""))
        message = email.message_from_bytes(self.sink.messages[0], policy=email.policy.default)
        self.assertEqual((message["From"], message["To"], message["Subject"]),
                         ("ops@corp.test", "a+x@example.com, b+y@example.com", "Hello"))
        self.assertTrue(message["Message-ID"].endswith("@corp.test>"))

    def test_refused_recipient(self):
        status, out, err = self.send("--to", "orders+acme@example.com", "--to", "nobody@example.com")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailingest: RCPT TO:<nobody@example.com> refused: 550 5.1.1 No such user here\n")
        self.assertEqual(self.sink.messages, [])

    def test_refused_after_data(self):
        result = self.run_command("send-test", "--server", self.server, "--to", "a+x@example.com",
                                  "--subject", "try later", storage=False)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), "mailingest: message refused after DATA: 451 4.3.0 Try again later\n")

    def test_finds_the_daemon_as_the_daemon_does(self):
        """Issue 23 item 6: on main send-test always went to 127.0.0.1:2525, whatever the daemon's --smtp."""
        port = self.server.rsplit(":", 1)[1]
        config = os.path.join(self.directory, "mailingest.ini")
        with open(config, "w") as f:
            f.write(f"[mailingest]\nsmtp = haproxy:tcp:{free_port()}, tcp:{port}\n")
        sent = f"sent 1/1 to 127.0.0.1:{port}: 250 2.0.0 Ok: stored as message"
        self.assertEqual(self.ok("send-test", "--to", "a+x@example.com", storage=False,
                                 environ=clean_environ(MAILINGEST_SMTP=f"tcp:{port}:interface=127.0.0.1")),
                         sent + " 1\n")
        self.assertEqual(self.ok("send-test", "--to", "a+x@example.com", "--config", config, storage=False), sent + " 2\n")
        self.assertEqual(self.ok("--config", config, "send-test", "--to", "a+x@example.com", storage=False), sent + " 3\n")
        self.assertEqual(self.ok("send-test", "--to", "a+x@example.com", "--smtp", f"tcp:{port}", storage=False,
                                 environ=clean_environ(MAILINGEST_SMTP=f"tcp:{free_port()}")), sent + " 4\n")
        self.assertEqual(len(self.sink.messages), 4)

    def test_says_where_it_tried_and_what_works(self):
        port = free_port()
        self.user_error("send-test", "--to", "a+x@example.com", storage=False,
                        environ=clean_environ(MAILINGEST_SMTP=f"tcp6:{port}"),
                        expected=f"cannot talk to [::1]:{port} (the daemon's SMTP endpoint tcp6:{port};"
                                 " --server HOST:PORT sends elsewhere): ")
        self.user_error("send-test", "--to", "a+x@example.com", storage=False,
                        environ=clean_environ(MAILINGEST_SMTP="haproxy:tcp:25 systemd:domain=INET:index=0"),
                        expected="none of the daemon's SMTP endpoints (haproxy:tcp:25, systemd:domain=INET:index=0)"
                                 " takes plain SMTP here: give --server HOST:PORT")
        self.assertEqual(self.sink.messages, [])

    def test_the_daemons_endpoints(self):
        for descriptions, server in (
            (["tcp:2525"], "127.0.0.1:2525"),
            (["tcp:25:interface=0.0.0.0"], "127.0.0.1:25"),
            (["tcp6:25"], "[::1]:25"),
            (["ssl:465:privateKey=k.pem", "tcp:port=587:interface=192.0.2.5"], "192.0.2.5:587"),
            (["tcp6:25:interface=2001\\:db8\\:\\:5"], "[2001:db8::5]:25"),
        ):
            self.assertEqual(daemon_server(descriptions), (server, descriptions[-1]))
        with self.assertRaises(SendError) as e:
            daemon_server(["tcp:smtp"])
        self.assertIn("bad SMTP endpoint 'tcp:smtp'", str(e.exception))

    def test_no_server_or_no_file(self):
        status, out, err = self.send("--to", "a+x@example.com", "--server", f"127.0.0.1:{free_port()}")
        self.assertEqual(status, 1)
        self.assertIn("cannot talk to 127.0.0.1:", err)
        self.assertIn("Connection refused", err)
        status, out, err = self.send("--to", "a+x@example.com", "--attach", "missing.pdf")
        self.assertEqual(status, 1)
        self.assertEqual(err, "mailingest: cannot read attachment missing.pdf: No such file or directory\n")
