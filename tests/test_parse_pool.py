"""
The parser worker processes: results and errors come back as the parser gives
them, and a worker that hangs or dies costs one attempt, never the daemon.
"""

import os
import shutil
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailingest.ops import metrics
from mailingest.extraction.attachments import UnparseableMessage
from mailingest.errors import BlobNotFound
from mailingest.extraction.pool import WORKER_ARGV, ParsePool, ParserDied, ParserError
from mailingest.extraction.background import NICENESS
from tests.test_extraction import order

HANG = [sys.executable, "-c", "import time; time.sleep(60)"]
EXIT = [sys.executable, "-c", "import sys; sys.exit(3)"]
# Answers the first request with the names in its environment.
ENVIRONMENT = [
    sys.executable,
    "-c",
    "import json, os, sys; sys.stdin.readline(); print(json.dumps({'error': ' '.join(sorted(os.environ))}), flush=True)",
]


def replaced(reason: str) -> float:
    return metrics.PARSER_REPLACED.labels(reason)._value.get()


class ParsePoolTests(unittest.TestCase):
    def pool(self, **kwargs) -> ParsePool:
        pool = ParsePool(reactor=reactor, **kwargs)
        self.addCleanup(pool.close)
        return pool

    def message(self, data: bytes) -> tuple[str, str]:
        work = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(work, "parts"))
        raw = os.path.join(work, "raw.eml")
        with open(raw, "wb") as f:
            f.write(data)
        return raw, os.path.join(work, "parts")

    async def test_documents_come_back(self):
        pdf = b"%PDF-1.4 order 4711"
        raw, parts = self.message(order(attachments=[(pdf, "application", "pdf", "Bestellung März.pdf")]).as_bytes())
        with open(os.path.join(parts, "0.bin"), "wb") as f:
            f.write(b"the previous message's document, already stored")
        result = await self.pool().parse(raw, parts)
        [attachment] = result.attachments
        self.assertEqual((attachment.filename, attachment.content_type, attachment.size), ("Bestellung März.pdf", "application/pdf", len(pdf)))
        with open(attachment.path, "rb") as f:
            self.assertEqual(f.read(), pdf)

    async def test_workers_run_below_the_daemon_in_cpu_priority(self):
        """Parsing is background work: under CPU pressure the SMTP side goes first."""
        pool = self.pool()
        raw, parts = self.message(order().as_bytes())
        await pool.parse(raw, parts)
        [worker] = pool._workers
        niceness = os.getpriority(os.PRIO_PROCESS, worker.transport.pid)
        own = os.getpriority(os.PRIO_PROCESS, 0)
        self.assertGreater(niceness, own)
        self.assertEqual(niceness, min(19, own + NICENESS))

    async def test_one_worker_serves_one_message_at_a_time(self):
        pool = self.pool()
        jobs = [self.message(order(attachments=[(b"%d" % n, "application", "pdf", f"{n}.pdf")]).as_bytes()) for n in range(6)]
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(pool.parse(*job)) for job in jobs])
        self.assertEqual([r.attachments[0].filename for r in results], [f"{n}.pdf" for n in range(6)])
        self.assertEqual(len(pool._workers), 1)

    async def test_unparseable_and_errors_are_told_apart(self):
        pool = self.pool()
        # A gif part whose "base64" is placeholder text (as in the corpus's cpython msg_15).
        raw, parts = self.message(
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: image/gif\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.gif\r\n\r\n"
            b"Some removed base64 encoded chars.\r\n\r\n--B--\r\n"
        )
        error = await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), UnparseableMessage)
        self.assertIn("base64", str(error))
        shutil.rmtree(parts)  # any other error is reported as such (and retried by the extraction service)
        error = await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), ParserError)
        self.assertIn("FileNotFoundError", str(error))
        os.mkdir(parts)
        os.unlink(raw)  # the message itself is missing
        await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), BlobNotFound)
        self.assertEqual(len(pool._workers), 1)

    async def test_hanging_parser_is_killed_and_replaced(self):
        pool = self.pool(timeout=0.5, argv=HANG)
        raw, parts = self.message(b"Subject: x\r\n\r\nbody\r\n")
        before = replaced("timeout")
        error = await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), ParserDied)
        self.assertIn("stopped after 0.5 s", str(error))
        self.assertEqual(replaced("timeout"), before + 1)
        healthy = ParsePool(reactor=reactor)
        pool._argv, pool._timeout = healthy._argv, healthy._timeout  # a new worker may take over 0.5 s to start on a loaded machine
        result = await pool.parse(raw, parts)
        self.assertEqual(result.attachments, [])

    async def test_dying_parser_is_a_transient_error(self):
        pool = self.pool(argv=EXIT)
        raw, parts = self.message(b"Subject: x\r\n\r\nbody\r\n")
        before = replaced("died")
        error = await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), ParserDied)
        self.assertIn("parser process ended", str(error))
        self.assertEqual(replaced("died"), before + 1)

    async def test_worker_holding_much_memory_is_replaced(self):
        pool = self.pool(argv=[*WORKER_ARGV[:-1], "1"])  # retire above one byte: after every message
        died_before = replaced("died")
        used = []
        choose = pool._worker
        self.patch(pool, "_worker", lambda: used.append(choose()) or used[-1])
        for n in range(3):
            raw, parts = self.message(order(attachments=[(b"%d" % n, "application", "pdf", f"{n}.pdf")]).as_bytes())
            result = await pool.parse(raw, parts)
            self.assertEqual(result.attachments[0].filename, f"{n}.pdf")
        self.assertEqual(len(set(map(id, used))), 3)  # a fresh worker each time, no request lost
        self.assertEqual(replaced("died"), died_before)  # retiring is routine, not a death
        await defer.gatherResults([worker.ended for worker in used])  # each exited by itself
        self.assertEqual(pool._workers, set())

    async def test_message_over_the_memory_limit_fails_and_its_worker_is_replaced(self):
        pool = self.pool(memory_limit=64 * 1024 * 1024)
        used = []
        choose = pool._worker
        self.patch(pool, "_worker", lambda: used.append(choose()) or used[-1])
        big_text = b"Y" * 76 + b"\r\n"
        raw, parts = self.message(
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n"
            b"Content-Disposition: attachment\r\n\r\n" + big_text * 256_000 + b"\r\n--B--\r\n"
        )
        before = replaced("memory"), replaced("died")
        error = await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), UnparseableMessage)
        self.assertEqual(str(error), "the message needs more than 64 MiB of memory to parse")
        self.assertEqual((replaced("memory"), replaced("died")), (before[0] + 1, before[1]))
        await used[0].ended  # it exited by itself
        raw, parts = self.message(order(attachments=[(b"%PDF-1.4", "application", "pdf", "next.pdf")]).as_bytes())
        result = await pool.parse(raw, parts)
        self.assertEqual([a.filename for a in result.attachments], ["next.pdf"])
        self.assertIsNot(used[1], used[0])

    async def test_worker_gets_no_credentials(self):
        self.patch(os, "environ", dict(os.environ, MAILINGEST_DATABASE="postgresql://u:hunter2@db/m", AWS_SECRET_ACCESS_KEY="s3cr3t", LANG="C.UTF-8"))
        raw, parts = self.message(b"x")
        error = await self.assertFailure(defer.Deferred.fromCoroutine(self.pool(argv=ENVIRONMENT).parse(raw, parts)), ParserError)
        names = str(error).split()
        self.assertIn("LANG", names)
        self.assertNotIn("MAILINGEST_DATABASE", names)
        self.assertNotIn("AWS_SECRET_ACCESS_KEY", names)

    async def test_close_stops_busy_and_idle_workers(self):
        pool = ParsePool(size=2, reactor=reactor, argv=HANG)
        raw, parts = self.message(b"x")
        busy = defer.Deferred.fromCoroutine(pool.parse(raw, parts))
        before = replaced("died"), replaced("timeout")
        await pool.close()
        self.assertEqual((replaced("died"), replaced("timeout")), before)  # stopping is not replacing
        await self.assertFailure(busy, ParserDied)
        self.assertEqual(pool._workers, set())
        await self.assertFailure(defer.Deferred.fromCoroutine(pool.parse(raw, parts)), ParserDied)
