"""
The production backends end to end: PostgreSQL and S3 (moto, signatures
checked), one daemon in-process, then two twistd daemons sharing them with one
killed mid-way.
"""

import io
import json
import os
import signal
import smtplib
import threading
import time
from collections import Counter
from email.message import EmailMessage

import psycopg2
from twisted.internet import defer
from twisted.trial import unittest

from tests import postgres
from tests.daemon import RunningDaemon, TwistdProcess, free_port, mailingest_cli, sleep, temp_dir
from tests.moto import shared_server
from tests.test_store import Outage

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 20 + b"\n%%EOF\n"


def order(number: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "buyer@customer.test"
    msg["To"] = "orders+acme@example.com"
    msg["Subject"] = f"Order {number}"
    msg["Message-ID"] = f"<order-{number}@customer.test>"
    msg.set_content("Order attached.\n")
    msg.add_attachment(PDF + str(number).encode(), maintype="application", subtype="pdf", filename=f"PO-{number}.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def s3_environ(moto) -> dict:
    return {"AWS_ACCESS_KEY_ID": moto.access_key, "AWS_SECRET_ACCESS_KEY": moto.secret_key}


class ProductionDaemonTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, database: str, s3_endpoint: str | None = None):
        self.moto = shared_server()
        self.bucket = self.moto.create_bucket()
        self.daemon = RunningDaemon(
            temp_dir(self),
            environ=s3_environ(self.moto),
            database=database,
            storage=f"s3://{self.bucket}/mail",
            s3_endpoint=s3_endpoint or self.moto.endpoint,
            poll_interval="0.2",
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        if (yield self.daemon.store.get_org("acme")) is None:
            yield self.daemon.store.add_org("acme", "Acme Corp")

    def setUp(self):
        self.database = postgres.create_database()

    @defer.inlineCallbacks
    def test_receive_extract_and_deduplicate(self):
        yield self.start(self.database)
        sent = order(1)
        code, reply = yield self.daemon.send(sent, ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        row = yield self.daemon.settled(int(reply.split()[-1]), timeout=10)
        self.assertEqual(row["status"], "parsed")
        [doc] = yield self.daemon.store.list_documents(message_id=row["id"])
        stored = io.BytesIO()
        yield self.daemon.blobs.read_to(doc["storage_key"], stored)
        self.assertEqual((doc["filename"], stored.getvalue()), ("PO-1.pdf", PDF + b"1"))
        raw = io.BytesIO()
        yield self.daemon.blobs.read_to(row["raw_key"], raw)
        self.assertTrue(raw.getvalue().endswith(sent))
        again = yield self.daemon.send(sent, ["orders+acme@example.com"])
        self.assertEqual(again, (code, reply))
        self.assertEqual((yield self.daemon.store.count_messages()), 1)

    @defer.inlineCallbacks
    def test_nul_in_subject_and_message_id_stored(self):
        """PostgreSQL refuses NUL in text: the store writes U+FFFD, so the message is not refused forever."""
        yield self.start(self.database)
        for subject, message_id in ((b"=?utf-8?b?QUIAQ0Q=?=", b"<nul-1@customer.test>"), (b"AB\x00CD", b"<nul\x00-2@customer.test>")):
            sent = b"From: buyer@customer.test\r\nSubject: " + subject + b"\r\nMessage-ID: " + message_id + b"\r\n\r\nbody\r\n"
            code, reply = yield self.daemon.send(sent, ["orders+acme@example.com"])
            self.assertEqual(code, 250, reply)
            row = yield self.daemon.store.get_message(int(reply.split()[-1]))
            self.assertEqual(row["subject"], "AB\ufffdCD")
            self.assertEqual(row["source_message_id"], message_id.decode().replace("\x00", "\ufffd"))

    @defer.inlineCallbacks
    def test_nul_in_content_type_parsed(self):
        """A document whose Content-Type holds a NUL is recorded, not retried every lease forever."""
        yield self.start(self.database)
        sent = (
            b"From: buyer@customer.test\r\nSubject: evil\r\nMessage-ID: <evil@customer.test>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
            b"--b\r\nContent-Type: application/x\x00evil\r\nContent-Disposition: attachment; filename=evil.bin\r\n\r\n"
            b"data\r\n--b--\r\n"
        )
        code, reply = yield self.daemon.send(sent, ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        row = yield self.daemon.settled(int(reply.split()[-1]), timeout=10)
        self.assertEqual(row["status"], "parsed")
        [doc] = yield self.daemon.store.list_documents(message_id=row["id"])
        self.assertEqual(doc["filename"], "evil.bin")
        self.assertNotIn("\x00", doc["content_type"])

    @defer.inlineCallbacks
    def test_database_outage_gives_451_then_recovers(self):
        params = psycopg2.extensions.parse_dsn(self.database)
        outage = Outage(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
        self.addCleanup(outage.stop)
        params["port"] = str(outage.port)
        yield self.start(postgres.url_from_params(params))
        yield self.daemon.delivery.directory.refresh()
        yield outage.down()
        code, reply = yield self.daemon.send(order(2), ["orders+acme@example.com"])
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        outage.up()
        for _ in range(100):
            code, reply = yield self.daemon.send(order(2), ["orders+acme@example.com"])
            if code == 250:
                break
            yield sleep(0.1)
        self.assertEqual(code, 250, reply)
        self.assertEqual((yield self.daemon.store.count_messages()), 1)

    @defer.inlineCallbacks
    def test_object_storage_down_gives_451_and_no_row(self):
        yield self.start(self.database, s3_endpoint=f"http://127.0.0.1:{free_port()}")
        code, reply = yield self.daemon.send(order(3), ["orders+acme@example.com"])
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        self.assertEqual((yield self.daemon.store.count_messages()), 0)


class ScaleOutTests(unittest.TestCase):
    """Two daemons, one PostgreSQL, one bucket; one daemon killed and restarted."""

    MESSAGES = 300

    def test_two_daemons_one_killed(self):
        database = postgres.create_database()
        moto = shared_server()
        bucket = moto.create_bucket()
        directory = temp_dir(self)
        env = dict(os.environ, MAILINGEST_DATABASE=database, **s3_environ(moto))
        result = mailingest_cli(directory, "org", "add", "acme", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        args = (
            "--domain", "example.com", "--storage", f"s3://{bucket}/mail", "--s3-endpoint", moto.endpoint,
            "--log-format", "json", "--extraction-lease", "3", "--poll-interval", "0.5",
        )
        daemons = []
        for name in ("a", "b"):
            os.mkdir(os.path.join(directory, name))
            daemon = TwistdProcess(os.path.join(directory, name), *args, env=env).start()
            self.addCleanup(daemon.stop, signal.SIGKILL)
            daemons.append(daemon)

        accepted: dict[int, int] = {}
        lock = threading.Lock()
        numbers = iter(range(self.MESSAGES))

        def sender(index: int) -> None:
            for number in numbers:
                port = daemons[(number + index) % 2].port
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                        client.sendmail("buyer@customer.test", ["orders+acme@example.com"], order(number))
                    with lock:
                        accepted[number] = port
                except (smtplib.SMTPException, OSError):
                    pass

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(6)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while len(accepted) < self.MESSAGES // 3:
            time.sleep(0.01)
        daemons[0].stop(signal.SIGKILL)
        time.sleep(0.5)
        daemons[0].start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        conn = psycopg2.connect(database)
        conn.autocommit = True
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with conn.cursor() as cur:
                    cur.execute("SELECT COUNT(*) FROM inbound_message WHERE status = 'received'")
                    if cur.fetchone()[0] == 0:
                        break
                time.sleep(0.2)
            with conn.cursor() as cur:
                cur.execute("SELECT id, source_message_id, status FROM inbound_message")
                rows = cur.fetchall()
                cur.execute("SELECT inbound_message_id, ordinal, filename, storage_key FROM document")
                documents = cur.fetchall()
        finally:
            conn.close()

        self.assertGreater(len(accepted), self.MESSAGES // 2)
        by_message_id = Counter(row[1] for row in rows)
        for number in accepted:
            self.assertEqual(by_message_id[f"<order-{number}@customer.test>"], 1, number)
        self.assertEqual({row[2] for row in rows}, {"parsed"})
        self.assertEqual(Counter((d[0], d[1]) for d in documents).most_common(1)[0][1], 1)
        self.assertEqual(sorted(d[0] for d in documents), sorted(row[0] for row in rows))
        keys = {obj["Key"] for obj in _list_objects(moto, bucket, "mail/documents/")}
        self.assertEqual(keys, {"mail/" + d[3] for d in documents})
        parsed = Counter()
        for daemon in daemons:
            for line in daemon.log().splitlines():
                if line.startswith("{"):
                    event = json.loads(line)
                    if event.get("event") == "parsed":
                        parsed[event["message_id"]] += 1
        # Parsed once: no message was extracted to the end by two daemons. A
        # message the killed daemon finished just before dying has no log line
        # (at most one per extraction worker).
        self.assertEqual(set(parsed.values()), {1})
        unlogged = {row[0] for row in rows} - set(parsed)
        self.assertLessEqual(len(unlogged), 2, unlogged)
        with open(os.path.join(directory, "scale-out.txt"), "w") as f:
            f.write(f"{len(accepted)} accepted of {self.MESSAGES} in {elapsed:.1f} s\n")


class TakeoverTests(unittest.TestCase):
    """A daemon killed while it holds claims: the other parses them within seconds, not after the lease."""

    def test_claims_of_a_killed_daemon_are_parsed_by_the_other_within_five_seconds(self):
        database = postgres.create_database()
        directory = temp_dir(self)
        env = dict(os.environ, MAILINGEST_DATABASE=database)
        result = mailingest_cli(directory, "org", "add", "acme", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        args = (
            "--domain", "example.com", "--storage", "file:" + os.path.join(directory, "blobs"),
            "--log-format", "json", "--poll-interval", "0.5",
        )
        a, b = [], []
        for name, daemons in (("a", a), ("b", b)):
            os.mkdir(os.path.join(directory, name))
            daemon = TwistdProcess(os.path.join(directory, name), *args, env=env).start()
            self.addCleanup(daemon.stop, signal.SIGKILL)
            daemons.append(daemon)
        a, b = a[0], b[0]
        conn = psycopg2.connect(database)
        conn.autocommit = True
        self.addCleanup(conn.close)

        def query(sql: str) -> list[tuple]:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()

        # B sleeps while A claims; A's parser is stopped, so A holds its claims for sure.
        b.process.send_signal(signal.SIGSTOP)
        self.addCleanup(_continue, b)
        send_order(a.port, 0)
        _wait_for(lambda: query("SELECT status FROM inbound_message") == [("parsed",)], 20, "first message parsed")
        parsers = _children(a.process.pid)
        self.assertTrue(parsers)
        for pid in parsers:
            os.kill(pid, signal.SIGSTOP)
            self.addCleanup(_kill, pid)
        for number in range(1, 11):
            send_order(a.port, number)
        claimed_now = "SELECT id FROM inbound_message WHERE status = 'received' AND claimed_until > now()"
        _wait_for(lambda: len(query(claimed_now)) >= 2, 20, "A claims")
        a.stop(signal.SIGKILL)
        killed = time.monotonic()
        claimed = {row[0] for row in query(claimed_now)}
        self.assertGreaterEqual(len(claimed), 2)

        b.process.send_signal(signal.SIGCONT)
        ids = ", ".join(str(i) for i in claimed)
        _wait_for(lambda: query(f"SELECT COUNT(*) FROM inbound_message WHERE id IN ({ids}) AND status = 'parsed'")[0][0] == len(claimed), 30, "A's claims parsed by B")
        took = time.monotonic() - killed
        _wait_for(lambda: query("SELECT COUNT(*) FROM inbound_message WHERE status <> 'parsed'") == [(0,)], 60, "every message parsed")
        rows = query("SELECT id FROM inbound_message")
        documents = query("SELECT inbound_message_id, ordinal FROM document")
        self.assertEqual(len(rows), 11)
        self.assertEqual(sorted(d[0] for d in documents), sorted(row[0] for row in rows))
        parsed = Counter()
        for daemon in (a, b):
            for line in daemon.log().splitlines():
                if line.startswith("{"):
                    event = json.loads(line)
                    if event.get("event") == "parsed":
                        parsed[event["message_id"]] += 1
        self.assertEqual(parsed, Counter({row[0]: 1 for row in rows}))
        self.assertLessEqual(took, 5.0, f"{len(claimed)} claimed messages parsed {took:.1f} s after the kill")


def send_order(port: int, number: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("buyer@customer.test", ["orders+acme@example.com"], order(number))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _continue(daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGCONT)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _list_objects(moto, bucket: str, prefix: str) -> list[dict]:
    client = moto.client("s3")
    found, token = [], None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = client.list_objects_v2(**kwargs)
        found += page.get("Contents", [])
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]
