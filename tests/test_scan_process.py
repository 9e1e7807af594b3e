"""
The scan process from the daemon's side: scans sent by id and answered in
any order, the verdicts' metrics recorded in the daemon, a process past its
budget killed with error verdicts for the scans it held, a dead one
replaced at the next scan; and the child's side of the lines.
"""

import json

from prometheus_client import REGISTRY
from twisted.internet import defer
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailingest.extraction.pool import ParserDied, ParserError
from mailingest.interfaces import IContentScanner
from mailingest.ops import metrics
from mailingest.scanning import child
from mailingest.scanning.clamd import FileVerdict
from mailingest.scanning.content_policy import ContentPolicy
from mailingest.scanning.rspamd import SpamVerdict
from mailingest.scanning.scanner import ContentScanner
from mailingest.scanning.scans import MARGIN_SECONDS, ScanProcess
from mailingest.scanning.verdicts import ContentVerdicts, decide
from tests.test_check_pool import SpawningClock
from tests.test_scanning import ROW

INFECTED = ContentVerdicts(
    [FileVerdict("clean"), FileVerdict("infected", "Sig")],
    FileVerdict("clean"),
    SpamVerdict("add header", 7.5, 6.0, ("GTUBE(7.5)", "R_DUMMY(0)")),
    clamd=True,
    seconds={"clamd": 0.25, "rspamd": 0.5},
)


def counted(counter, label: str) -> float:
    return counter.labels(label)._value.get()


def observed(scanner: str) -> float:
    """How many scan durations of C{scanner} were recorded."""
    return REGISTRY.get_sample_value("mailingest_scan_duration_seconds_count", {"scanner": scanner}) or 0.0


class VerdictsJsonTests(unittest.TestCase):
    def test_round_trip(self):
        for verdicts in (INFECTED, ContentVerdicts(), ContentVerdicts([FileVerdict("error", "why", True)], clamd=True, unscanned="x")):
            self.assertEqual(ContentVerdicts.from_json(json.loads(json.dumps(verdicts.to_json()))), verdicts)


class ScanProcessTests(unittest.TestCase):
    def setUp(self):
        self.reactor = SpawningClock()
        self.scanner = ScanProcess("unix:/run/clamd.ctl", "http://127.0.0.1:11333", "mx.test", 30.0, 1000, self.reactor)

    def scan(self, raw_path: str, documents: list[str] = ["a.pdf", "b.zip"]) -> defer.Deferred:
        return defer.ensureDeferred(self.scanner.scan({**ROW, "subject": "not sent", "org_id": 3}, raw_path, documents, {"spf": "pass"}))

    def lines(self, n: int = -1) -> list[dict]:
        return self.reactor.spawned[n][0].transport.lines

    def answer(self, raw_path: str, **reply) -> None:
        process = self.reactor.spawned[-1][0]
        [line] = [line for line in self.lines() if line["scan"]["raw_path"] == raw_path]
        process.outReceived(json.dumps({"id": line["id"], **reply}).encode() + b"\n")

    def test_the_interface(self):
        self.assertTrue(verifyObject(IContentScanner, self.scanner))
        self.assertTrue(verifyObject(IContentScanner, ContentScanner(None, None, clock=self.reactor), tentative=True))

    def test_the_process_and_what_it_is_sent(self):
        self.scan("one.eml")
        [(process, args, env)] = self.reactor.spawned
        self.assertEqual(args[1:3], ["-m", "mailingest.scanning.child"])
        settings = {"clamd": "unix:/run/clamd.ctl", "clamd_max_stream": 1000, "rspamd": "http://127.0.0.1:11333", "hostname": "mx.test", "budget": 30.0}
        self.assertEqual(json.loads(args[3]), settings)
        self.assertEqual(args[4], str(1024 * 1024 * 1024))
        self.assertNotIn("MAILINGEST_DATABASE", env)
        [line] = self.lines()
        self.assertEqual(line["scan"], {"message": ROW, "raw_path": "one.eml", "documents": ["a.pdf", "b.zip"], "sender": {"spf": "pass"}})

    def test_replies_in_any_order_and_the_metrics_recorded_here(self):
        infected, spam, clamd_seconds = counted(metrics.VIRUS_VERDICTS, "infected"), counted(metrics.SPAM_VERDICTS, "add header"), observed("clamd")
        first, second = self.scan("one.eml"), self.scan("two.eml")
        self.assertEqual(len(self.reactor.spawned), 1, "one process for every scan")
        self.answer("two.eml", verdicts=INFECTED.to_json())
        self.assertEqual(self.successResultOf(second), INFECTED)
        self.assertNoResult(first)
        self.assertEqual(counted(metrics.VIRUS_VERDICTS, "infected"), infected + 1)
        self.assertEqual(counted(metrics.SPAM_VERDICTS, "add header"), spam + 1)
        self.assertEqual(observed("clamd"), clamd_seconds + 1)
        self.answer("one.eml", error="FileNotFoundError: one.eml")
        self.failureResultOf(first, ParserError)

    def test_a_process_past_the_budget_is_killed_and_its_scans_get_error_verdicts(self):
        errors, spam_errors = counted(metrics.VIRUS_VERDICTS, "error"), counted(metrics.SPAM_VERDICTS, "error")
        held = [self.scan("one.eml"), self.scan("two.eml", [])]
        self.reactor.advance(30.0 + MARGIN_SECONDS - 1)
        process = self.reactor.spawned[0][0]
        self.assertFalse(process.transport.killed)
        self.reactor.advance(1)
        self.assertTrue(process.transport.killed)
        process.processEnded(None)
        one, two = (self.successResultOf(d) for d in held)
        why = f"a scan was stopped after {30 + MARGIN_SECONDS:g} s"
        self.assertEqual(one.documents, [FileVerdict("error", why, True)] * 2)
        self.assertEqual((one.virus.result, one.spam), ("error", SpamVerdict("error", detail=why)))
        self.assertEqual(two.documents, [])
        self.assertEqual(decide(ContentPolicy(), one, ["a.pdf", "b.zip"]).hold, why)
        self.assertIsNone(decide(ContentPolicy(unscanned="pass"), one, ["a.pdf", "b.zip"]).hold)
        self.assertEqual(counted(metrics.VIRUS_VERDICTS, "error"), errors + 2)
        self.assertEqual(counted(metrics.SPAM_VERDICTS, "error"), spam_errors + 2)

    def test_a_dead_process_is_replaced_at_the_next_scan(self):
        held = self.scan("one.eml")
        process = self.reactor.spawned[0][0]
        process.processEnded(_Ended())
        self.assertIn("the scan process ended (killed by signal 9)", self.successResultOf(held).spam.detail)
        again = self.scan("two.eml")
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual([line["scan"]["raw_path"] for line in self.lines()], ["two.eml"])
        self.answer("two.eml", verdicts=INFECTED.to_json())
        self.assertEqual(self.successResultOf(again), INFECTED)

    def test_closed_while_scanning_the_scan_is_not_judged(self):
        """A stopping daemon's scans in hand fail as the parser's do (the message is done again), not as error verdicts a pass policy would let through."""
        held = self.scan("one.eml")
        process = self.reactor.spawned[0][0]
        closed = self.scanner.close()
        self.assertTrue(process.transport.killed)
        process.processEnded(_Ended())
        self.failureResultOf(held, ParserDied)
        self.successResultOf(closed)
        self.failureResultOf(self.scan("two.eml"), ParserDied)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_one_scanner_alone(self):
        scanner = ScanProcess(None, "http://127.0.0.1:11333", "mx.test", 5.0, reactor=self.reactor)
        held = defer.ensureDeferred(scanner.scan(ROW, "one.eml", ["a.pdf"], None))
        self.reactor.advance(5.0 + MARGIN_SECONDS)
        self.reactor.spawned[0][0].processEnded(None)
        verdicts = self.successResultOf(held)
        self.assertEqual((verdicts.virus, verdicts.documents, verdicts.spam.action), (None, [], "error"))
        self.assertEqual(set(verdicts.seconds), {"rspamd"})


class _Ended:
    def getErrorMessage(self) -> str:
        return "killed by signal 9"


class _Scanner:
    """A ContentScanner whose scans wait until the test answers them."""

    def __init__(self):
        self.waiting: dict[str, defer.Deferred] = {}

    def scan(self, message, raw_path, documents, sender) -> defer.Deferred:
        self.waiting[raw_path] = defer.Deferred()
        return self.waiting[raw_path]


class ChildTests(unittest.TestCase):
    def test_each_request_answered_as_it_ends(self):
        scanner, ended = _Scanner(), []
        requests = child.Requests(scanner, lambda: ended.append(True))
        transport = StringTransport()
        requests.makeConnection(transport)
        line = {"message": ROW, "documents": [], "sender": None}
        requests.dataReceived(json.dumps({"id": 1, "scan": {**line, "raw_path": "one.eml"}}).encode() + b"\n")
        requests.dataReceived(json.dumps({"id": 2, "scan": {**line, "raw_path": "two.eml"}}).encode()[:20])
        self.assertEqual(set(scanner.waiting), {"one.eml"})
        requests.dataReceived(json.dumps({"id": 2, "scan": {**line, "raw_path": "two.eml"}}).encode()[20:] + b"\n")
        scanner.waiting["two.eml"].callback(INFECTED)
        scanner.waiting["one.eml"].errback(FileNotFoundError("one.eml"))
        replies = [json.loads(reply) for reply in transport.value().splitlines()]
        self.assertEqual(replies, [{"id": 2, "verdicts": INFECTED.to_json()}, {"id": 1, "error": "FileNotFoundError: one.eml"}])
        requests.connectionLost(None)
        self.assertEqual(ended, [True])
