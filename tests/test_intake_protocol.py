"""
The AMP commands between the parent and its intake processes
(L{mailingest.app.intake_protocol}), on StringTransport: each command's round
trip, message rows batched and checked field by field, bad rows refused with
the declared error while the connection keeps serving, the refused-recipient
count shared by every process.
"""

from datetime import datetime, timezone

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailingest.app import intake_protocol as ip
from mailingest.app.intake import SharedRefusals
from mailingest.app.settings import Settings
from mailingest.app.processes import IntakeProcesses, _Child
from mailingest.interfaces import Collision, Duplicate, IClosable, IDomainRoutes, IIntakeStore
from mailingest.smtp import replies

DIGEST = "ab" * 32


def row(**changes) -> dict:
    fields = {
        "org_id": 1, "source": "smtp", "source_message_id": "<order-1@customer.test>",
        "mail_from": "buyer@customer.test", "rcpt_to": "orders+acme@example.com", "subject": "Order 1 ✓",
        "raw_key": "raw/2026/12/06/abc.eml", "raw_size": 1234, "raw_sha256": DIGEST, "content_sha256": None,
        "received_at": datetime(2026, 12, 6, 20, 0, 1, 5, tzinfo=timezone.utc),
        "client_ip": "192.0.2.7", "helo": None, "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384", "rcpt_domain": "example.com",
    }
    fields.update(changes)
    return fields


class FakeWriter:
    """The parent's store, as the intake's calls reach it."""

    exclusive = True

    def __init__(self):
        self.inserted: list[list[dict]] = []
        self.answers: list = []

    def insert_messages(self, rows):
        self.inserted.append(rows)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def raw_key_in_use(self, key):
        return defer.succeed(key == "raw/used.eml")

    def get_org(self, slug):
        if slug == "gone":
            return defer.fail(RuntimeError("database is locked"))
        return defer.succeed({"id": 7, "slug": slug, "active": slug != "sleepy"} if slug != "nobody" else None)

    def active_orgs(self):
        return defer.succeed({f"org{n}": n for n in range(3000)})

    def routed_domains(self, known_version=None):
        if known_version == 9:
            return defer.succeed((9, None))
        domains = [{"domain": f"d{n}.example", "org_id": n, "slug": f"org{n}", "local_parts": []} for n in range(10000)]
        domains[0]["local_parts"] = ["orders", "invoices"]
        return defer.succeed((9, domains))


def settings(**overrides) -> Settings:
    given = {"smtp": ["tcp:0"], "processes": "2", "hostname": "mx.example.com", **overrides}
    return Settings.settle(given, environ={})


class RawInsert(amp.Command):
    """L{ip.InsertMessages} with its rows as bytes: what a child could put on the wire."""

    commandName = b"InsertMessages"
    arguments = [(b"rows", amp.String()), (b"rows.0", amp.String())]
    response = ip.InsertMessages.response
    errors = ip.InsertMessages.errors


class Pipe:
    """Two AMP ends on StringTransports; L{pump} moves the bytes until both are quiet, counting the boxes each way."""

    def __init__(self, child_end: amp.AMP, parent_end: amp.AMP):
        self.child_end, self.parent_end = child_end, parent_end
        self.child_transport, self.parent_transport = StringTransport(), StringTransport()
        child_end.makeConnection(self.child_transport)
        parent_end.makeConnection(self.parent_transport)
        self.sent_by_child: list[bytes] = []

    def pump(self) -> None:
        while self.child_transport.value() or self.parent_transport.value():
            data = self.child_transport.value()
            self.child_transport.clear()
            if data:
                self.sent_by_child.append(data)
                self.parent_end.dataReceived(data)
            data = self.parent_transport.value()
            self.parent_transport.clear()
            if data:
                self.child_end.dataReceived(data)


class ChildEnd(ip.QuietAMP):
    """An intake process's end, recording what the parent tells it."""

    def __init__(self):
        super().__init__()
        self.started: list[dict] = []
        self.refused: list[str] = []
        self.stopped = 0

    @ip.StartIntake.responder
    def start(self, **arguments):
        self.started.append(arguments)
        return {}

    @ip.StopIntake.responder
    def stop(self):
        self.stopped += 1
        return {}

    @ip.RecipientRefused.responder
    def refused_elsewhere(self, peer):
        self.refused.append(peer)
        return {}


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        self.writer = FakeWriter()
        self.stored = []
        self.processes = IntakeProcesses(task.Clock(), settings(), self.writer, lambda: self.stored.append(1), self.mktemp())
        self.pipes = [self.connect(index) for index in range(2)]
        self.child, self.pipe = self.pipes[0]
        self.clock = task.Clock()
        self.store = ip.ParentStore(self.pipe.child_end, self.clock)
        self.errors = []
        observer = lambda event: self.errors.append(event) if event.get("log_namespace") == "mailingest.daemon" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connect(self, index):
        child = _Child(self.processes, index)
        child.pid = 100 + index
        self.processes.children[index] = child
        return child, Pipe(ChildEnd(), child.amp)

    def result(self, d):
        self.clock.advance(0)
        self.pipe.pump()
        return self.successResultOf(d)

    def failure(self, d, *errors):
        d = ip.answer(d)
        self.clock.advance(0)
        self.pipe.pump()
        return self.failureResultOf(d, *errors)

    def test_parent_store_is_the_intake_role(self):
        """An intake process's store is the SMTP side's role (and its owner closes it), no more."""
        self.assertTrue(verifyObject(IIntakeStore, self.store))
        self.assertTrue(verifyObject(IDomainRoutes, self.store))
        self.assertTrue(verifyObject(IClosable, self.store))

    def test_messages_of_a_busy_moment_share_one_call(self):
        self.writer.answers = [[11], [Duplicate(5), Collision(12)], [13], [14]]
        # Stored in the same turn of the reactor: one call.
        first = self.store.insert_messages([row()])
        second = self.store.insert_messages([row(org_id=2), row(org_id=3, subject=None, client_ip=None)])
        third = self.store.insert_messages([row(source_message_id="<order-3@customer.test>")])
        self.assertEqual(self.result(first), [11])
        ids = self.successResultOf(second)
        self.assertEqual(ids, [5, 12])
        self.assertEqual([type(i) for i in ids], [Duplicate, Collision])
        self.assertEqual(self.successResultOf(third), [13])
        self.assertEqual(b"".join(self.pipe.sent_by_child).count(b"InsertMessages"), 1)
        # Later turns: two calls may wait for their answers; what comes
        # meanwhile goes together when the first is answered.
        fourth = self.store.insert_messages([row(org_id=4)])
        self.clock.advance(0)
        fifth = self.store.insert_messages([row(org_id=5)])
        self.clock.advance(0)
        self.assertEqual(self.pipe.child_transport.value().count(b"InsertMessages"), 2)
        sixth = self.store.insert_messages([row(org_id=6)])
        seventh = self.store.insert_messages([row(org_id=7)])
        self.clock.advance(0)
        self.assertEqual(self.pipe.child_transport.value().count(b"InsertMessages"), 2)
        self.writer.answers += [[15], [16], [17]]
        self.assertEqual(self.result(fourth), [14])
        self.assertEqual(self.successResultOf(fifth), [15])
        self.assertEqual((self.successResultOf(sixth), self.successResultOf(seventh)), ([16], [17]))
        self.assertEqual(b"".join(self.pipe.sent_by_child).count(b"InsertMessages"), 4)
        self.assertEqual([len(batch) for batch in self.writer.inserted], [1, 2, 1, 1, 1, 1, 1])
        # Every field arrives as it was, typed; absent ones as None.
        self.assertEqual(self.writer.inserted[0], [row()])
        self.assertEqual(self.writer.inserted[1][1], row(org_id=3, subject=None, client_ip=None))
        # The parent's extraction is woken once per call.
        self.assertEqual(len(self.stored), 4)

    def test_a_failed_batch_fails_its_message_only(self):
        self.writer.answers = [[1], RuntimeError("disk I/O error"), [3]]
        first = self.store.insert_messages([row()])
        second = self.store.insert_messages([row(org_id=2)])
        third = self.store.insert_messages([row(org_id=3)])
        self.result(first)
        self.assertIn("disk I/O error", self.failureResultOf(second, ip.StoreCallFailed).getErrorMessage())
        self.assertEqual(self.successResultOf(third), [3])

    def test_a_row_that_cannot_be_sent_is_refused_before_the_call(self):
        d = self.store.insert_messages([row(raw_key=None)])
        self.failure(d, ip.StoreCallFailed)
        self.assertEqual(self.pipe.sent_by_child, [])
        self.failure(self.store.insert_messages([row(subject="x" * 70000)]), ip.StoreCallFailed)

    def test_other_store_calls(self):
        self.assertTrue(self.result(self.store.raw_key_in_use("raw/used.eml")))
        self.assertFalse(self.result(self.store.raw_key_in_use("raw/free.eml")))
        self.assertEqual(self.result(self.store.get_org("acme")), {"id": 7, "slug": "acme", "active": True})
        self.assertEqual(self.result(self.store.get_org("sleepy"))["active"], False)
        self.assertIsNone(self.result(self.store.get_org("nobody")))
        failure = self.failure(self.store.get_org("gone"), ip.StoreCallFailed)
        self.assertIn("database is locked", failure.getErrorMessage())
        # More organisations than one AMP value holds.
        orgs = self.result(self.store.active_orgs())
        self.assertEqual(len(orgs), 3000)
        self.assertEqual(orgs["org2999"], 2999)

    def test_routed_domains_only_when_they_changed(self):
        """10,000 verified domains (more than one AMP value holds) cross once; an unchanged version sends none."""
        version, domains = self.result(self.store.routed_domains())
        self.assertEqual((version, len(domains)), (9, 10000))
        self.assertEqual(domains[0], {"domain": "d0.example", "org_id": 0, "slug": "org0", "local_parts": ["orders", "invoices"]})
        self.assertEqual(domains[9999], {"domain": "d9999.example", "org_id": 9999, "slug": "org9999", "local_parts": []})
        self.assertEqual(self.result(self.store.routed_domains(9)), (9, None))

    def test_no_store_calls_when_the_children_write_themselves(self):
        self.processes.writer = None
        failure = self.failure(self.store.raw_key_in_use("raw/used.eml"), ip.StoreCallFailed)
        self.assertIn("write to the database themselves", failure.getErrorMessage())
        self.failure(self.store.insert_messages([row()]), ip.StoreCallFailed)
        self.assertEqual(self.writer.inserted, [])

    def send_rows(self, packed: bytes):
        """An InsertMessages whose rows are these bytes, as a child could send them."""
        d = ip.answer(self.pipe.child_end.callRemote(RawInsert, **{"rows": b"1", "rows.0": packed}))
        self.pipe.pump()
        return d

    def test_bad_rows_are_refused_and_the_connection_keeps_serving(self):
        good = ip.pack(dict(row(), batch=1), ip.ROW_FIELDS)
        self.writer.answers = [[1]]
        self.assertEqual(self.successResultOf(self.send_rows(good))["ids"], [1])
        extra_key = good[:-2] + b"\x00\x06pickle\x00\x01x" + b"\x00\x00"
        missing = ip.pack(dict(row(), batch=1), {k: v for k, v in ip.ROW_FIELDS.items() if k != "raw_key"})
        repeated = good[:-2] + b"\x00\x05batch\x00\x011\x00\x00"
        bad_time = ip.pack(dict(row(), batch=1, received_at="2026-12-06T20:00:00"), dict(ip.ROW_FIELDS, received_at=ip.Field(ip.TEXT)))
        bad_key = ip.pack(dict(row(raw_key="documents/9/1/x.pdf"), batch=1), ip.ROW_FIELDS)
        for packed, error in (
            (extra_key, "unknown field 'pickle'"),
            (missing, "raw_key is missing"),
            (repeated, "repeated"),
            (bad_time, "zone"),
            (bad_key, "not a raw message key"),
            (ip.pack(dict(row(), batch=1), dict(ip.ROW_FIELDS, raw_sha256=ip.Field(ip.TEXT))) .replace(DIGEST.encode(), b"x" * 64), "not a hex sha256"),
            (good[:-1], "truncated"),
            (b"\xff\xff", "truncated"),
        ):
            failure = self.failureResultOf(self.send_rows(packed), ip.BadRecords)
            self.assertIn(error, failure.getErrorMessage())
        self.assertEqual(len(self.writer.inserted), 1)
        logged = [e for e in self.errors if "intake process 0 sent a bad InsertMessages: rows: " in formatEvent(e)]
        self.assertEqual(len(logged), 8)
        # Still connected, still answering.
        self.assertFalse(self.pipe.parent_transport.disconnecting)
        self.assertTrue(self.result(self.store.raw_key_in_use("raw/used.eml")))

    def test_a_command_not_declared_is_refused(self):
        class Pickled(amp.Command):
            arguments = [(b"data", amp.String())]
            response = []

        d = self.pipe.child_end.callRemote(Pickled, data=b"\x80\x04.")
        self.failure(d, amp.UnhandledCommand)

    def test_start_carries_the_settings_and_the_refusals_so_far(self):
        self.processes.settings = settings(proxy_trusted=["10.0.0.0/8"], dns_resolver="[2001:db8::53]:5353")
        self.processes.refusals.add("198.51.100.9")
        arguments = self.processes.start_arguments()
        d = self.child.amp.callRemote(ip.StartIntake, **arguments)
        self.pipe.pump()
        self.successResultOf(d)
        [started] = self.pipe.child_end.started
        self.assertEqual(started["smtp"], ["tcp:0"])
        self.assertEqual(started["hostname"], "mx.example.com")
        self.assertEqual(started["max_connections_per_ip"], 50)
        self.assertEqual([str(network) for network in started["proxy_trusted"]], ["10.0.0.0/8"])
        self.assertIsNone(started["tls_cert"])
        self.assertTrue(started["through_parent"])
        self.assertEqual([r["peer"] for r in started["refusals"]], ["198.51.100.9"])
        # Every setting arrives typed as the parent has it.
        values = {key: value for key, value in started.items() if key not in ("through_parent", "refusals")}
        self.assertEqual(Settings.from_values(values), self.processes.settings)
        self.assertEqual(values["dns_resolver"], ("2001:db8::53", 5353))

    def test_stop(self):
        self.child.amp.callRemote(ip.StopIntake)
        self.pipe.pump()
        self.assertEqual(self.pipe.child_end.stopped, 1)

    def test_a_refusal_is_counted_by_the_parent_and_told_to_the_other_processes(self):
        other_child, other_pipe = self.pipes[1]
        shared = SharedRefusals(task.Clock(), self.pipe.child_end)
        shared.add("203.0.113.5")
        self.assertEqual(shared.count("203.0.113.5"), 1)
        self.pipe.pump()
        other_pipe.pump()
        self.assertEqual(self.processes.refusals.count("203.0.113.5"), 1)
        self.assertEqual(other_pipe.child_end.refused, ["203.0.113.5"])
        # Not sent back to the process that reported it.
        self.assertEqual(self.pipe.child_end.refused, [])


class RecordsTests(unittest.SynchronousTestCase):
    def test_round_trip_over_several_values(self):
        argument = ip.Records(ip.ROW_FIELDS)
        rows = [dict(row(source_message_id=f"<m{n}@x>", subject="s" * 500), batch=n) for n in range(300)]
        strings = {}
        argument.toBox(b"rows", strings, {"rows": rows}, None)
        self.assertGreater(int(strings[b"rows"]), 1)
        self.assertTrue(all(len(v) <= amp.MAX_VALUE_LENGTH for v in strings.values()))
        objects = {}
        argument.fromBox(b"rows", strings, objects, None)
        self.assertEqual(objects["rows"], rows)

    def test_shared_refusals_count_toward_the_limit(self):
        clock = task.Clock()
        sent = []
        parent = type("Parent", (), {"callRemote": lambda self, command, **kw: sent.append(kw["peer"])})()
        shared = SharedRefusals(clock, parent)
        for _ in range(replies.REFUSED_RECIPIENT_LIMIT - 1):
            shared.refused_elsewhere("192.0.2.1")
        self.assertEqual(sent, [])
        shared.add("192.0.2.1")
        self.assertEqual(shared.count("192.0.2.1"), replies.REFUSED_RECIPIENT_LIMIT)
        self.assertEqual(sent, ["192.0.2.1"])
        clock.advance(replies.REFUSED_RECIPIENT_WINDOW + 1)
        self.assertEqual(shared.count("192.0.2.1"), 0)
