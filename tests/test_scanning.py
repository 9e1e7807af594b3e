"""
The scanner clients against a real clamd and a real rspamd (L{tests.scanners})
and against hostile stand-ins on 127.0.0.1: one that accepts and never
answers, one that answers garbage, one that closes mid-stream. Each ends in
an C{error} verdict with its reason, within the time it was given, and the
reactor keeps serving meanwhile.
"""

import http.client
import io
import os
import time
import zipfile

from twisted.internet import defer, endpoints, reactor, task, threads
from twisted.trial import unittest
from twisted.web import resource, server

from mailingest.scanning.clamd import ClamdClient, endpoint_description, parse_reply
from mailingest.scanning.rspamd import RspamdClient, request_headers
from mailingest.scanning.scanner import ContentScanner
from mailingest.scanning.verdicts import ContentPolicy, ContentVerdicts, decide
from mailingest.scanning.clamd import FileVerdict
from mailingest.scanning.rspamd import SpamVerdict
from tests import scanners
from tests.daemon import temp_dir

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
ROW = {"id": 7, "mail_from": "buyer@customer.test", "rcpt_to": "orders+acme@example.com", "helo": "customer.test", "client_ip": "192.0.2.7"}


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def mail(body: bytes, subject: str = "Order 7") -> bytes:
    return (
        b"From: Buyer <buyer@customer.test>\r\nTo: orders+acme@example.com\r\nSubject: " + subject.encode()
        + b"\r\nMessage-ID: <order-7@customer.test>\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\n" + body + b"\r\n"
    )


def write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class UnitTests(unittest.TestCase):
    def test_endpoints(self):
        self.assertEqual(endpoint_description("unix:/run/clamav/clamd.ctl"), "unix:path=/run/clamav/clamd.ctl")
        self.assertEqual(endpoint_description("tcp:127.0.0.1:3310"), "tcp:host=127.0.0.1:port=3310")
        self.assertEqual(endpoint_description("tcp:[::1]:3310"), "tcp:host=::1:port=3310")
        for bad in ("clamd", "unix:relative", "tcp:host", "tcp:host:99999", "http://x"):
            self.assertRaises(ValueError, endpoint_description, bad)

    def test_replies(self):
        self.assertEqual(parse_reply(b"stream: OK"), FileVerdict("clean"))
        self.assertEqual(parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND"), FileVerdict("infected", "Win.Test.EICAR_HDB-1"))
        self.assertEqual(parse_reply(b"INSTREAM size limit exceeded. ERROR").result, "error")
        self.assertFalse(parse_reply(b"INSTREAM size limit exceeded. ERROR").transient)
        garbage = parse_reply(b"HTTP/1.1 200 OK")
        self.assertEqual((garbage.result, garbage.transient), ("error", True))
        self.assertIn("garbage", parse_reply(b"\xff\xfe").detail)

    def test_rspamd_headers_carry_the_smtp_facts_and_our_checks(self):
        headers = request_headers(
            {**ROW, "rcpt_to": "a@example.com, b@example.com"},
            {"spf": "pass", "spf_domain": "customer.test", "dkim": "fail", "dkim_domain": "customer.test", "dmarc": "fail", "dmarc_policy": "reject"},
            "mx.test",
        )
        self.assertEqual(headers["IP"], ["192.0.2.7"])
        self.assertEqual(headers["Helo"], ["customer.test"])
        self.assertEqual(headers["From"], ["buyer@customer.test"])
        self.assertEqual(headers["Rcpt"], ["a@example.com", "b@example.com"])
        self.assertIn('"result": "pass"', headers["SPF"][0])
        self.assertIn('"results": [{"result": "fail"', headers["DKIM"][0])
        self.assertIn('"result": "reject"', headers["DMARC"][0])
        self.assertNotIn("SPF", request_headers({**ROW, "helo": "a\r\nInjected: 1"}, None, "mx.test"))
        self.assertEqual(request_headers({**ROW, "helo": "a\r\nInjected: 1"}, None, "mx.test")["Helo"], ["a  Injected: 1"])

    def test_policy(self):
        infected = ContentVerdicts([FileVerdict("clean"), FileVerdict("infected", "Sig")], FileVerdict("infected", "Sig"), clamd=True)
        names = ["a.pdf", "b.zip"]
        self.assertEqual(decide(ContentPolicy(), infected, names).quarantine, "virus: Sig in b.zip")
        self.assertEqual(decide(ContentPolicy("reject-documents"), infected, names).drop, {1})
        self.assertIsNone(decide(ContentPolicy("tag"), infected, names).quarantine)
        down = ContentVerdicts([FileVerdict("error", "cannot connect", True)], clamd=True)
        self.assertEqual(decide(ContentPolicy(), down, ["a.pdf"]).hold, "cannot connect")
        self.assertIsNone(decide(ContentPolicy(unscanned="pass"), down, ["a.pdf"]).hold)
        self.assertEqual(down.columns()["unscanned"], "cannot connect")
        too_big = ContentVerdicts([FileVerdict("error", "over StreamMaxLength")], clamd=True)
        self.assertEqual(decide(ContentPolicy(), too_big, ["a.pdf"]).kind, "unscanned")
        spam = ContentVerdicts(spam=SpamVerdict("reject", 15.0, 15.0, ("GTUBE(0)",)))
        self.assertEqual(decide(ContentPolicy(spam_threshold=10), spam, []).kind, "spam")
        self.assertIsNone(decide(ContentPolicy(spam_threshold=15), spam, []).quarantine)
        self.assertIsNone(decide(ContentPolicy(), spam, []).quarantine)


class _PendingClamd:
    """A clamd client whose scans wait until the test answers them, and which spends nothing past the budget, as the real one."""

    max_stream = 0  # the raw copy is never scanned whole

    def __init__(self):
        self.waiting: list[defer.Deferred] = []

    async def scan(self, path: str, timeout: float) -> FileVerdict:
        if timeout <= 0:
            return FileVerdict("error", "not scanned: the message's scan budget was spent", True)
        self.waiting.append(defer.Deferred())
        return await self.waiting[-1]


class BudgetTests(unittest.TestCase):
    def test_the_budget_spent_on_thousands_of_documents_ends_the_scan(self):
        """
        The documents still waiting when the budget is spent all end at once,
        in one loop: before, each was a DeferredSemaphore waiter released by
        the one before, a recursion that broke Python's stack at about a
        thousand documents and left the message's scan (and its slot) hanging.
        """
        clock, clamd = task.Clock(), _PendingClamd()
        scanning = defer.ensureDeferred(ContentScanner(clamd, None, 1.0, clock).scan(ROW, write(temp_dir(self), "raw.eml", b"x"), ["doc"] * 3000, None))
        self.assertEqual(len(clamd.waiting), 4)
        clock.advance(2)
        for waiting in clamd.waiting:
            waiting.callback(FileVerdict("error", "clamd did not answer within 1 s", True))
        verdicts = self.successResultOf(scanning)
        self.assertEqual(len(verdicts.documents), 3000)
        self.assertEqual([v.detail for v in verdicts.documents].count("not scanned: the message's scan budget was spent"), 2996)
        self.assertEqual(len(clamd.waiting), 4)


class RealClamdTests(unittest.TestCase):
    def setUp(self):
        self.clamd = scanners.clamd()
        self.directory = temp_dir(self)

    @defer.inlineCallbacks
    def test_eicar_in_a_zip_over_both_sockets(self):
        path = write(self.directory, "order.zip", zipped("invoice.com", scanners.EICAR))
        for endpoint in (self.clamd.unix, self.clamd.tcp):
            verdict = yield defer.ensureDeferred(ClamdClient(endpoint).scan(path, 10))
            self.assertEqual(verdict.result, "infected", endpoint)
            self.assertTrue(verdict.detail.startswith("Mailingest.Test.EICAR"), verdict)

    @defer.inlineCallbacks
    def test_clean_pdf_and_our_own_signature(self):
        client = ClamdClient(self.clamd.unix)
        clean = yield defer.ensureDeferred(client.scan(write(self.directory, "order.pdf", PDF), 10))
        self.assertEqual(clean, FileVerdict("clean"))
        marked = write(self.directory, "marked.bin", b"padding " * 1000 + scanners.TEST_MARKER + b" tail")
        found = yield defer.ensureDeferred(client.scan(marked, 10))
        self.assertEqual(found.result, "infected")
        self.assertTrue(found.detail.startswith("Mailingest.Test.Marker"), found)

    @defer.inlineCallbacks
    def test_50_mb_document_is_not_sent_and_said_so(self):
        big = os.path.join(self.directory, "big.pdf")
        with open(big, "wb") as f:
            f.truncate(50 * 1024 * 1024)
        started = time.monotonic()
        verdict = yield defer.ensureDeferred(ClamdClient(self.clamd.unix, scanners.STREAM_MAX).scan(big, 10))
        self.assertEqual(verdict.result, "error")
        self.assertIn("StreamMaxLength", verdict.detail)
        self.assertFalse(verdict.transient)
        self.assertLess(time.monotonic() - started, 1)

    @defer.inlineCallbacks
    def test_a_limit_above_clamds_gets_clamds_own_refusal(self):
        big = os.path.join(self.directory, "big.pdf")
        with open(big, "wb") as f:
            f.write(os.urandom(scanners.STREAM_MAX + 1024 * 1024))
        verdict = yield defer.ensureDeferred(ClamdClient(self.clamd.unix, 64 * 1024 * 1024).scan(big, 20))
        self.assertEqual(verdict.result, "error")
        self.assertIn("size limit exceeded", verdict.detail)

    @defer.inlineCallbacks
    def test_1000_small_documents_within_the_budget(self):
        paths = [write(self.directory, f"d{n}.txt", f"line {n}\n".encode()) for n in range(1000)]
        paths[500] = write(self.directory, "bad.zip", zipped("x.com", scanners.EICAR))
        raw = write(self.directory, "raw.eml", mail(b"see attached"))
        started = time.monotonic()
        verdicts = yield defer.ensureDeferred(ContentScanner(ClamdClient(self.clamd.unix), None, 60).scan(ROW, raw, paths, None))
        self.assertLess(time.monotonic() - started, 60)
        self.assertEqual([n for n, v in enumerate(verdicts.documents) if v.result != "clean"], [500])
        self.assertEqual(verdicts.virus.result, "infected")
        self.assertEqual(verdicts.raw, FileVerdict("clean"))


class HostileClamdTests(unittest.TestCase):
    @defer.inlineCallbacks
    def scan(self, mode: str, size: int = 200 * 1024, timeout: float = 2.0):
        stand_in = yield defer.ensureDeferred(scanners.StandIn(mode).start(self))
        path = write(temp_dir(self), "doc.pdf", b"x" * size)
        ticks = []
        ticker = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        ticker.start(0.05)
        started = time.monotonic()
        try:
            verdict = yield defer.ensureDeferred(ClamdClient(stand_in.tcp).scan(path, timeout))
        finally:
            ticker.stop()
        elapsed = time.monotonic() - started
        self.assertEqual(verdict.result, "error")
        self.assertTrue(verdict.transient)
        self.assertLess(elapsed, timeout + 1)
        # The reactor went on meanwhile: no gap between ticks longer than a second.
        self.assertLess(max(b - a for a, b in zip(ticks, ticks[1:])) if len(ticks) > 1 else 0, 1)
        return verdict, elapsed

    @defer.inlineCallbacks
    def test_never_answers(self):
        verdict, elapsed = yield self.scan("silent", size=10 * 1024 * 1024)
        self.assertIn("did not answer within 2 s", verdict.detail)
        self.assertGreater(elapsed, 1.9)

    @defer.inlineCallbacks
    def test_answers_garbage(self):
        verdict, _ = yield self.scan("garbage")
        self.assertIn("garbage", verdict.detail)

    @defer.inlineCallbacks
    def test_closes_mid_stream(self):
        verdict, _ = yield self.scan("close", size=10 * 1024 * 1024)
        self.assertIn("closed the connection before answering", verdict.detail)

    @defer.inlineCallbacks
    def test_nobody_listening(self):
        path = write(temp_dir(self), "doc.pdf", b"x")
        verdict = yield defer.ensureDeferred(ClamdClient("unix:" + os.path.join(temp_dir(self), "none.sock")).scan(path, 2))
        self.assertEqual((verdict.result, verdict.transient), ("error", True))
        self.assertIn("cannot connect to clamd", verdict.detail)


class RealRspamdTests(unittest.TestCase):
    timeout = 300  # rspamd's first start compiles its Hyperscan databases

    def setUp(self):
        self.rspamd = scanners.rspamd()
        self.directory = temp_dir(self)

    @defer.inlineCallbacks
    def test_gtube_is_spam(self):
        raw = write(self.directory, "gtube.eml", mail(scanners.GTUBE, "Cheap"))
        verdict = yield defer.ensureDeferred(RspamdClient(self.rspamd.url, "mx.test").check(raw, ROW, None, 20))
        self.assertEqual(verdict.action, "reject", verdict)
        self.assertGreaterEqual(verdict.score, 15)
        self.assertTrue(any(s.startswith("GTUBE") for s in verdict.symbols), verdict.symbols)

    @defer.inlineCallbacks
    def test_clean_order_is_scored(self):
        raw = write(self.directory, "order.eml", mail(b"Please find our order 7 attached; delivery by Friday."))
        verdict = yield defer.ensureDeferred(
            RspamdClient(self.rspamd.url, "mx.test").check(raw, ROW, {"spf": "pass", "spf_domain": "customer.test"}, 20)
        )
        self.assertFalse(verdict.error, verdict)
        self.assertLess(verdict.score, verdict.required)
        self.assertNotEqual(verdict.action, "reject")
        self.assertIn("R_SPF_ALLOW", " ".join(verdict.symbols), "rspamd took our SPF result from the SPF header")


    @defer.inlineCallbacks
    def test_rspamd_closes_each_connection(self):
        """
        Why the client keeps no connection (a persistent pool would save a
        connect per message): rspamd's normal worker answers an HTTP/1.1
        request, which asks to keep the connection, with C{Connection: close}.
        Should an upgrade keep it, this fails: turn the pool's persistence on.
        """

        def ask():
            connection = http.client.HTTPConnection("127.0.0.1", self.rspamd.port, timeout=10)
            try:
                connection.request("POST", "/checkv2", body=mail(b"hello"), headers={"Connection": "keep-alive"})
                response = connection.getresponse()
                response.read()
                return response.status, response.getheader("Connection"), response.will_close
            finally:
                connection.close()

        status, header, closes = yield threads.deferToThread(ask)
        self.assertEqual((status, header, closes), (200, "close", True))


class _Garbage(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        return b"<html>not rspamd</html>"


class _Silent(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        return server.NOT_DONE_YET


class HostileRspamdTests(unittest.TestCase):
    @defer.inlineCallbacks
    def check(self, page, timeout: float = 2.0):
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(page))
        self.addCleanup(port.stopListening)
        raw = write(temp_dir(self), "m.eml", mail(b"hello"))
        started = time.monotonic()
        verdict = yield defer.ensureDeferred(RspamdClient(f"http://127.0.0.1:{port.getHost().port}", "mx.test").check(raw, ROW, None, timeout))
        self.assertEqual(verdict.action, "error")
        self.assertLess(time.monotonic() - started, timeout + 1)
        return verdict

    @defer.inlineCallbacks
    def test_garbage(self):
        verdict = yield self.check(_Garbage())
        self.assertIn("garbage", verdict.detail)

    @defer.inlineCallbacks
    def test_never_answers(self):
        verdict = yield self.check(_Silent())
        self.assertIn("did not answer within 2 s", verdict.detail)
