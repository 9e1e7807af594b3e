"""
The SMTP dialogue at the protocol level: IngestSMTP on a StringTransport, time
on a task.Clock, the real delivery (Ingest) on an in-memory store and blob store.
No sockets, no sleeps.
"""

import ast
import errno
import io
import ipaddress
import itertools
import os
import pathlib
import re

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.mail import smtp
from twisted.trial import unittest
from zope.interface import alsoProvides, implementer
from zope.interface.verify import verifyObject

from mailingest.interfaces import Duplicate, IDeliveryOutcome, IIngestMessage, IIntakeStore, ISMTPDelivery
from mailingest.ops import metrics
from mailingest.delivery import spool as spool_module
from mailingest.delivery.directory import OrgDirectory
from mailingest.delivery.ingest import Ingest
from mailingest.smtp import limits as smtp_limits
from mailingest.smtp import replies as smtp_replies
from mailingest.delivery.transaction import IngestDeliveries
from mailingest.smtp import protocol as smtp_protocol
from mailingest.smtp.protocol import IngestSMTP, IngestSMTPFactory
from mailingest.smtp.proxy import ProxyHeaderFirstFactory
from tests.daemon import temp_dir

DOMAIN = "example.com"


@implementer(IIntakeStore)
class MemoryStore:
    """The SMTP side's store role, in memory."""

    def __init__(self, orgs=("acme", "beta")):
        self.orgs = {slug: number for number, slug in enumerate(orgs, 1)}
        self.disabled = {"gone": 99}
        self.rows: list[dict] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.insert_result: defer.Deferred | None = None

    def active_orgs(self):
        return defer.succeed(dict(self.orgs))

    def get_org(self, slug):
        """A slug in C{pending} is answered when the test fires its Deferred."""
        if slug in self.pending:
            return self.pending[slug]
        if slug in self.disabled:
            return defer.succeed({"id": self.disabled[slug], "slug": slug, "active": False})
        org_id = self.orgs.get(slug)
        return defer.succeed(None if org_id is None else {"id": org_id, "slug": slug, "active": True})

    def insert_messages(self, rows):
        if self.insert_result is not None:
            return self.insert_result
        ids = []
        for row in rows:
            held = [r for r in self.rows if (r["org_id"], r["source_message_id"], r["content_sha256"]) == (row["org_id"], row["source_message_id"], row["content_sha256"])]
            if held:
                ids.append(Duplicate(held[0]["id"]))
                continue
            self.rows.append(dict(row, id=len(self.rows) + 1, org_slug=self.slug_of(row["org_id"])))
            ids.append(len(self.rows))
        return defer.succeed(ids)

    def raw_key_in_use(self, key):
        return defer.succeed(any(row["raw_key"] == key for row in self.rows))

    def slug_of(self, org_id: int) -> str:
        return next(slug for slug, number in self.orgs.items() if number == org_id)


class MemoryBlobs:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.broken = False

    def put_bytes(self, key, data, sha256):
        if self.broken:
            return defer.fail(OSError("object storage unreachable"))
        self.blobs[key] = data
        return defer.succeed(None)

    def put_file(self, key, path, sha256, size):
        with open(path, "rb") as f:
            self.blobs[key] = f.read()
        return defer.succeed(None)

    def delete(self, key):
        self.blobs.pop(key, None)
        return defer.succeed(None)


@implementer(ITLSTransport)
class StartTLSTransport(StringTransport):
    """A StringTransport that can start TLS: afterwards it is an SSL transport, as a real one is."""

    tls_context = None

    def startTLS(self, contextFactory):
        self.tls_context = contextFactory
        alsoProvides(self, ISSLTransport)

    def getHandle(self):
        return FakeTLSConnection()


class FakeTLSConnection:
    def get_protocol_version_name(self):
        return "TLSv1.3"

    def get_cipher_name(self):
        return "TLS_AES_256_GCM_SHA384"


class Server:
    """One daemon's SMTP side: a factory on a Clock, with its store and blobs."""

    def __init__(
        self, test: unittest.TestCase, tls: bool = False, timeout: float = 300, max_message_size: int = 52428800,
        max_recipients: int = 100, max_connections_per_ip: int = 50, spool_dir: str | None = None,
    ):
        self.clock = task.Clock()
        self.store = MemoryStore()
        self.blobs = MemoryBlobs()
        self.spool_dir = spool_dir or temp_dir(test)
        self.ingest = Ingest(
            self.store, self.blobs, OrgDirectory(self.store), [DOMAIN], "mx.test", self.spool_dir, clock=self.clock
        )
        self.tls = tls
        self.factory = IngestSMTPFactory(
            IngestDeliveries(self.ingest),
            hostname="mx.test",
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            timeout=timeout,
            max_connections=1000,
            max_connections_per_ip=max_connections_per_ip,
            tls_context=object() if tls else None,
            clock=self.clock,
        )
        self._ports = itertools.count(40000)

    def connect(self, peer: str = "192.0.2.1") -> "Session":
        transport_type = StartTLSTransport if self.tls else StringTransport
        transport = transport_type(peerAddress=IPv4Address("TCP", peer, next(self._ports)))
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return Session(protocol, transport)


class Session:
    """A client's view of one connection: what it sends, the replies it got."""

    def __init__(self, protocol, transport):
        self.protocol = protocol
        self.transport = transport
        self.greeting = self.replies()[0]

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def replies(self) -> list[bytes]:
        """The replies written since the last call, each as its lines joined by LF."""
        written = self.transport.value()
        self.transport.clear()
        replies, lines = [], []
        for line in written.split(b"\r\n")[:-1]:
            lines.append(line)
            if line[3:4] != b"-":
                replies.append(b"\n".join(lines))
                lines = []
        return replies

    def command(self, line: bytes) -> bytes:
        """Send one command; its reply, which must have come at once."""
        self.send(line + b"\r\n")
        [reply] = self.replies()
        return reply

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason)._value.get()


MESSAGE = b"From: buyer@customer.test\r\nSubject: Order\r\nMessage-ID: <order@customer.test>\r\n\r\nHello\r\n"
DATE = rb"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]0000"
TRANSACTION = b"EHLO customer.test\r\nMAIL FROM:<buyer@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n"


def open_data(session) -> None:
    """EHLO, MAIL, RCPT for acme and DATA, answered."""
    session.send(TRANSACTION)
    assert [reply[:3] for reply in session.replies()] == [b"250", b"250", b"250", b"354"]


class BasicsTests(unittest.TestCase):
    def test_greeting(self):
        session = Server(self).connect()
        self.assertEqual(session.greeting, b"220 mx.test ESMTP mailingest")

    def test_ehlo_extensions(self):
        reply = Server(self).connect().command(b"EHLO customer.test")
        lines = reply.split(b"\n")
        self.assertEqual(lines[0], b"250-mx.test Hello 192.0.2.1")
        self.assertEqual(
            [line[4:] for line in lines[1:]],
            [b"SIZE 52428800", b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SMTPUTF8"],
        )

    def test_ehlo_offers_starttls_with_a_certificate(self):
        reply = Server(self, tls=True).connect().command(b"EHLO customer.test")
        self.assertIn(b"250-STARTTLS", reply)
        self.assertNotIn(b"AUTH", reply)

    def test_pipelined_transaction_replies_in_order(self):
        server = Server(self)
        session = server.connect()
        session.send(
            b"EHLO customer.test\r\nMAIL FROM:<buyer@customer.test>\r\nRCPT TO:<orders+nosuch@example.com>\r\n"
            b"RCPT TO:<orders+acme@example.com>\r\nRCPT TO:<orders+beta@example.com>\r\nDATA\r\n"
            + MESSAGE
            + b".\r\nQUIT\r\n"
        )
        codes = [reply[:3] for reply in session.replies()]
        self.assertEqual(codes, [b"250", b"250", b"550", b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual(sorted(row["org_slug"] for row in server.store.rows), ["acme", "beta"])
        self.assertTrue(session.closed)


class StartTLSInjectionTests(unittest.TestCase):
    """CVE-2011-0411 class: plaintext pipelined after STARTTLS must not run inside TLS."""

    INJECTED = (
        b"STARTTLS\r\nEHLO mitm\r\nMAIL FROM:<mitm@evil.test>\r\nRCPT TO:<orders+beta@example.com>\r\nDATA\r\n"
    )

    def test_commands_pipelined_after_starttls_are_discarded(self):
        server = Server(self, tls=True)
        session = server.connect()
        session.command(b"EHLO victim")
        dropped = rejected("pipelining")
        session.send(self.INJECTED)
        self.assertEqual(session.replies(), [b"220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(session.transport.tls_context)
        self.assertEqual(rejected("pipelining"), dropped + 1)
        session.send(
            b"EHLO victim\r\nMAIL FROM:<victim@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n"
        )
        self.assertEqual([reply[:3] for reply in session.replies()], [b"250", b"250", b"250", b"354"])
        session.send(MESSAGE + b".\r\n")
        [stored] = session.replies()
        self.assertTrue(stored.startswith(b"250 2.0.0 Ok: stored"), stored)
        [row] = server.store.rows
        self.assertEqual((row["org_slug"], row["mail_from"]), ("acme", "victim@customer.test"))
        [blob] = server.blobs.blobs.values()
        self.assertTrue(blob.endswith(b"\r\n" + MESSAGE), blob)
        self.assertIn(b"with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384)", blob)

    def test_a_half_line_after_starttls_is_discarded_too(self):
        session = Server(self, tls=True).connect()
        session.command(b"EHLO victim")
        session.send(b"STARTTLS\r\nMAIL FROM:<mi")
        self.assertEqual(session.replies(), [b"220 2.0.0 Ready to start TLS"])
        session.send(b"EHLO victim\r\n")
        [ehlo] = session.replies()
        self.assertTrue(ehlo.startswith(b"250-mx.test"), ehlo)

    def test_starttls_state_starts_afresh(self):
        session = Server(self, tls=True).connect()
        session.command(b"EHLO victim")
        session.command(b"MAIL FROM:<a@customer.test>")
        session.command(b"STARTTLS")
        self.assertTrue(session.command(b"RCPT TO:<orders+acme@example.com>").startswith(b"503 5.5.1"))
        self.assertTrue(session.command(b"STARTTLS").startswith(b"503 5.5.1"))

    def test_starttls_with_an_argument(self):
        session = Server(self, tls=True).connect()
        self.assertEqual(session.command(b"STARTTLS now"), b"501 5.5.4 Syntax: STARTTLS")
        self.assertIsNone(session.transport.tls_context)


class RepliesTests(unittest.TestCase):
    def test_known_but_unimplemented_verbs(self):
        self.patch(smtp_replies, "SOFT_ERROR_LIMIT", 100)
        session = Server(self).connect()
        session.command(b"EHLO customer.test")
        for verb in (b"EXPN orders", b"ETRN example.com", b"TURN", b"ATRN", b"BDAT 10 LAST", b"SEND FROM:<a@b>", b"SOML FROM:<a@b>", b"SAML FROM:<a@b>", b"expn x"):
            self.assertEqual(session.command(verb), b"502 5.5.1 Command not implemented", verb)
        self.assertEqual(session.command(b"FROBNICATE"), b"500 5.5.2 Command not recognised")

    def test_auth_is_not_offered(self):
        session = Server(self).connect()
        session.command(b"EHLO customer.test")
        self.assertEqual(session.command(b"AUTH PLAIN AGFkbWluAHNlY3JldA=="), b"503 5.5.1 Authentication not enabled")

    def test_declared_size_too_large_states_the_limit(self):
        session = Server(self).connect()
        session.command(b"EHLO customer.test")
        self.assertEqual(
            session.command(b"MAIL FROM:<a@customer.test> SIZE=52428801"),
            b"552 5.3.4 Message size exceeds fixed maximum message size of 52428800 bytes",
        )

    def test_data_too_large_states_the_limit(self):
        server = Server(self, max_message_size=1000)
        session = server.connect()
        session.send(b"EHLO customer.test\r\nMAIL FROM:<a@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n")
        session.replies()
        session.send(MESSAGE + b"x" * 2000 + b"\r\n.\r\n")
        self.assertEqual(session.replies(), [b"552 5.3.4 Message size exceeds fixed maximum message size of 1000 bytes"])
        self.assertEqual(server.store.rows, [])


class ReceivedHeaderTests(unittest.TestCase):
    def transaction(self, session, mail_from: bytes, rcpt: bytes, params: bytes = b"") -> None:
        session.send(b"EHLO customer.test\r\nMAIL FROM:<" + mail_from + b">" + params + b"\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
        session.send(MESSAGE + b".\r\n")
        self.assertTrue(session.replies()[-1].startswith(b"250 2.0.0 Ok: stored"))

    def received(self, server) -> bytes:
        [blob] = server.blobs.blobs.values()
        return blob.split(b"\r\nFrom:")[0]

    def test_smtputf8_transaction_keeps_the_utf8_address(self):
        server = Server(self)
        rcpt = "bestellung-für+acme@example.com".encode()
        self.transaction(server.connect(), "jürgen@münchen.test".encode(), rcpt, b" SMTPUTF8")
        received = self.received(server)
        self.assertIn(b" with UTF8SMTP id ", received)
        self.assertIn(b"\tfor <" + rcpt + b">;", received)
        received.decode("utf-8")

    def test_smtputf8_over_tls(self):
        server = Server(self, tls=True)
        session = server.connect()
        session.command(b"STARTTLS")
        self.transaction(session, b"a@customer.test", b"orders+acme@example.com", b" SMTPUTF8")
        self.assertIn(b" with UTF8SMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384) id ", self.received(server))

    def test_header_text(self):
        """The whole header, for one recipient and for several (then no "for" clause)."""
        server = Server(self)
        session = server.connect()
        self.transaction(session, b"a@customer.test", b"orders+acme@example.com")
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nRCPT TO:<orders+beta@example.com>\r\n")
        session.send(b"DATA\r\n" + MESSAGE.replace(b"<order@", b"<other@") + b".\r\n")
        headers = [blob.split(b"\r\nFrom:")[0] for blob in server.blobs.blobs.values()]
        ids = [row["raw_key"].rsplit("/", 1)[1][: -len(".eml")].encode() for row in server.store.rows]
        self.assertRegex(
            headers[0],
            rb"\AReceived: from customer\.test \(\[192\.0\.2\.1\]\)\r\n\tby mx\.test \(mailingest\) with ESMTP id "
            + ids[0] + rb"\r\n\tfor <orders\+acme@example\.com>;\r\n\t" + DATE + rb"\Z",
        )
        self.assertRegex(
            headers[1],
            rb"\AReceived: from customer\.test \(\[192\.0\.2\.1\]\)\r\n\tby mx\.test \(mailingest\) with ESMTP id "
            + ids[1] + rb";\r\n\t" + DATE + rb"\Z",
        )

    def test_ascii_transaction_is_esmtp(self):
        server = Server(self)
        self.transaction(server.connect(), b"a@customer.test", b"orders+acme@example.com")
        received = self.received(server)
        self.assertIn(b" with ESMTP id ", received)
        self.assertIn(b"\tfor <orders+acme@example.com>;", received)


class ProbingTests(unittest.TestCase):
    """Guessing organisations: error replies slow down, then the client is cut off."""

    def probe(self, session, clock, slug: bytes) -> tuple[bytes, float]:
        """One RCPT for an unknown organisation; its reply and how long it took on the clock."""
        session.send(b"RCPT TO:<orders+" + slug + b"@example.com>\r\n")
        waited = 0.0
        replies = session.replies()
        while not replies:
            clock.advance(0.25)
            waited += 0.25
            replies = session.replies()
        return replies[0], waited

    def test_delays_grow_and_noop_does_not_forgive(self):
        server = Server(self)
        session = server.connect()
        session.command(b"EHLO prober.test")
        session.command(b"MAIL FROM:<p@prober.test>")
        cut = rejected("errors")
        delays = []
        for n in range(smtp_replies.ERROR_LIMIT):
            reply, waited = self.probe(session, server.clock, b"guess%d" % n)
            self.assertTrue(reply.startswith(b"550 5.1.1"), reply)
            delays.append(waited)
            if not session.closed:
                self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")
        soft = smtp_replies.SOFT_ERROR_LIMIT
        self.assertEqual(delays[:soft], [0.0] * soft)
        self.assertEqual(delays[soft : soft + 3], [1.0, 2.0, 3.0])
        self.assertEqual(max(delays), smtp_replies.MAX_ERROR_SLEEP_SECONDS)
        self.assertTrue(session.closed)
        self.assertEqual(session.replies(), [])
        self.assertEqual(session.transport.value(), b"")
        self.assertEqual(rejected("errors"), cut + 1)

    def test_cut_off_reply(self):
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.0)
        session = Server(self).connect()
        session.send(b"EHLO prober.test\r\nMAIL FROM:<p@prober.test>\r\n")
        session.send(b"".join(b"RCPT TO:<orders+g%d@example.com>\r\nNOOP\r\n" % n for n in range(30)))
        replies = session.replies()
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Too many errors, closing connection")
        self.assertEqual(sum(r.startswith(b"550") for r in replies), smtp_replies.ERROR_LIMIT)
        self.assertTrue(session.closed)

    def test_input_is_held_during_a_delay(self):
        server = Server(self)
        session = server.connect()
        session.send(b"EHLO prober.test\r\nMAIL FROM:<p@prober.test>\r\n")
        session.send(b"".join(b"RCPT TO:<orders+g%d@example.com>\r\n" % n for n in range(smtp_replies.SOFT_ERROR_LIMIT + 1)))
        session.send(b"RCPT TO:<orders+acme@example.com>\r\n")
        replies = session.replies()
        self.assertEqual(len(replies), 2 + smtp_replies.SOFT_ERROR_LIMIT)
        server.clock.advance(0.99)
        self.assertEqual(session.replies(), [])
        server.clock.advance(0.01)
        self.assertEqual([r[:3] for r in session.replies()], [b"550", b"250"])

    def test_refused_recipients_counted_per_address_across_sessions(self):
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.0)
        self.patch(smtp_replies, "REFUSED_RECIPIENT_LIMIT", 30)
        server = Server(self)
        cut = rejected("refused_recipients")
        first = server.connect("198.51.100.7")
        first.send(b"EHLO prober.test\r\nMAIL FROM:<p@prober.test>\r\n")
        first.send(b"".join(b"RCPT TO:<orders+g%d@example.com>\r\n" % n for n in range(20)))
        self.assertTrue(first.closed)
        second = server.connect("198.51.100.7")
        second.send(b"EHLO prober.test\r\nMAIL FROM:<p@prober.test>\r\n")
        second.send(b"".join(b"RCPT TO:<orders+h%d@example.com>\r\n" % n for n in range(15)))
        replies = second.replies()
        self.assertEqual(sum(r.startswith(b"550") for r in replies), 10)
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Too many refused recipients, closing connection")
        self.assertTrue(second.closed)
        self.assertEqual(rejected("refused_recipients"), cut + 1)
        # A new session from that address learns nothing, not even about a real organisation.
        third = server.connect("198.51.100.7")
        third.command(b"EHLO prober.test")
        third.command(b"MAIL FROM:<p@prober.test>")
        self.assertEqual(
            third.command(b"RCPT TO:<orders+acme@example.com>"),
            b"421 4.7.0 mx.test Too many refused recipients, closing connection",
        )
        # Another address is not affected, and the window moves on.
        other = server.connect("198.51.100.8")
        other.command(b"MAIL FROM:<b@customer.test>")
        self.assertTrue(other.command(b"RCPT TO:<orders+acme@example.com>").startswith(b"250"))
        server.clock.advance(smtp_replies.REFUSED_RECIPIENT_WINDOW)
        later = server.connect("198.51.100.7")
        later.command(b"MAIL FROM:<p@prober.test>")
        self.assertTrue(later.command(b"RCPT TO:<orders+acme@example.com>").startswith(b"250"))
        self.assertEqual(server.factory.refused_recipients("198.51.100.7"), 0)

    def test_address_history_slows_a_new_session_at_once(self):
        server = Server(self)
        for n in range(smtp_replies.SOFT_ERROR_LIMIT + 2):
            server.factory.refused_recipient("198.51.100.9")
        session = server.connect("198.51.100.9")
        session.command(b"MAIL FROM:<p@prober.test>")
        self.assertEqual(self.probe(session, server.clock, b"again")[1], 3.0)

    def test_table_of_addresses_is_swept(self):
        server = Server(self)
        server.factory.refused_recipient("198.51.100.1")
        server.clock.advance(smtp_replies.REFUSED_RECIPIENT_WINDOW + 1)
        self.assertIn("198.51.100.1", server.factory.refusals._times)
        server.factory.refused_recipient("198.51.100.2")
        self.assertEqual(list(server.factory.refusals._times), ["198.51.100.2"])

    def test_a_long_recipient_list_is_not_an_error(self):
        server = Server(self)
        session = server.connect()
        session.send(b"EHLO relay.test\r\nMAIL FROM:<b@customer.test>\r\n")
        session.send(b"".join(b"RCPT TO:<orders+acme@example.com>\r\n" for _ in range(120)))
        session.send(b"DATA\r\n" + MESSAGE + b".\r\n")
        codes = [r[:9] for r in session.replies()]
        self.assertEqual(codes[2:102], [b"250 2.1.5"] * 100)
        self.assertEqual(codes[102:122], [b"452 4.5.3"] * 20)
        self.assertEqual(codes[122:], [b"354 End d", b"250 2.0.0"])
        self.assertFalse(session.closed)
        self.assertEqual(len(server.store.rows), 1)

    def test_junk_commands_count_as_errors_past_their_limit(self):
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.0)
        session = Server(self).connect()
        session.send(b"NOOP\r\n" * (smtp_replies.JUNK_COMMAND_LIMIT + smtp_replies.ERROR_LIMIT))
        replies = session.replies()
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Too many errors, closing connection")
        self.assertEqual(len(replies), smtp_replies.JUNK_COMMAND_LIMIT + smtp_replies.ERROR_LIMIT + 1)


class CommandPaceTests(unittest.TestCase):
    def test_a_command_line_must_complete_within_the_timeout(self):
        server = Server(self, timeout=10)
        session = server.connect()
        session.command(b"EHLO slow.test")
        for byte in b"MAIL FROM:<slow@slow.test>":
            session.send(bytes([byte]))
            server.clock.advance(1)
            if session.closed:
                break
        self.assertEqual(session.replies(), [b"421 4.4.2 mx.test Timeout, closing connection"])
        self.assertTrue(session.closed)

    def test_complete_lines_keep_the_session(self):
        server = Server(self, timeout=10)
        session = server.connect()
        for _ in range(5):
            server.clock.advance(9)
            self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")
        self.assertFalse(session.closed)

    def test_a_client_waiting_for_us_is_not_timed_out(self):
        self.patch(smtp_replies, "SOFT_ERROR_LIMIT", 0)
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 20.0)
        self.patch(smtp_replies, "MAX_ERROR_SLEEP_SECONDS", 20.0)
        server = Server(self, timeout=10)
        session = server.connect()
        session.send(b"BOGUS\r\n")
        server.clock.advance(19)
        self.assertEqual(session.replies(), [])
        server.clock.advance(1)
        self.assertEqual(session.replies(), [b"500 5.5.2 Command not recognised"])
        server.clock.advance(9)
        self.assertFalse(session.closed)
        server.clock.advance(1)
        self.assertTrue(session.closed)


class DeliverySeamTests(unittest.TestCase):
    """Delivery through Twisted's own interfaces, as Twisted defines them."""

    HELO = (b"customer.test", b"192.0.2.1")

    def transaction(self, slugs):
        server = Server(self)
        protocol = server.connect().protocol
        delivery = protocol.deliveryFactory.getMessageDelivery()
        origin = smtp.Address(b"buyer@customer.test")
        self.assertIs(delivery.validateFrom(self.HELO, origin), origin)
        users = [smtp.User(b"orders+%s@example.com" % slug, self.HELO, protocol, origin) for slug in slugs]
        factories = [self.successResultOf(defer.maybeDeferred(delivery.validateTo, user)) for user in users]
        return server, delivery, origin, users, factories

    def test_objects_provide_twisted_interfaces(self):
        server, delivery, origin, users, factories = self.transaction([b"acme"])
        verifyObject(ISMTPDelivery, server.factory.delivery)
        factory = server.connect().protocol.deliveryFactory
        verifyObject(smtp.IMessageDeliveryFactory, factory)
        verifyObject(smtp.IMessageDelivery, delivery)
        message = factories[0]()
        verifyObject(smtp.IMessage, message)
        verifyObject(IIngestMessage, message)
        message.lineReceived(delivery.receivedHeader(self.HELO, origin, users))
        message.write(MESSAGE)
        verifyObject(IDeliveryOutcome, self.successResultOf(message.eomReceived()))

    def test_memory_store_is_the_intake_role(self):
        """The in-memory store stands in for exactly the role the SMTP side is given."""
        self.assertTrue(verifyObject(IIntakeStore, Server(self).store))

    def test_refused_recipient_fails_with_twisted_error(self):
        server, delivery, origin, users, factories = self.transaction([])
        user = smtp.User(b"orders+nosuch@example.com", self.HELO, None, origin)
        failure = self.failureResultOf(defer.maybeDeferred(delivery.validateTo, user), smtp.SMTPBadRcpt)
        self.assertEqual((failure.value.code, failure.value.resp), (550, "5.1.1 No such recipient: unknown organisation"))

    def test_fed_line_by_line_as_twisted_feeds_it(self):
        """Twisted's SMTP.do_DATA: each recipient's message, its Received header, then every line to each."""
        server, delivery, origin, users, factories = self.transaction([b"acme", b"beta"])
        messages = []
        for user, factory in zip(users, factories):
            message = factory()
            message.lineReceived(delivery.receivedHeader(self.HELO, origin, [user]))
            messages.append(message)
        for line in MESSAGE.split(b"\r\n")[:-1]:
            for message in messages:
                message.lineReceived(line)
        outcomes = [self.successResultOf(message.eomReceived()) for message in messages]
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual([row["org_slug"] for row in server.store.rows], ["acme", "beta"])
        [blob] = server.blobs.blobs.values()
        header, sent = blob.split(b";\r\n\t", 1)
        self.assertEqual(header.split(b"\r\n")[0], b"Received: from customer.test ([192.0.2.1])")
        self.assertTrue(sent.endswith(b"\r\n" + MESSAGE), sent)
        self.assertEqual(blob.count(b"Hello"), 1)

    def test_connection_lost_discards_the_spool(self):
        server, delivery, origin, users, factories = self.transaction([b"acme"])
        message = factories[0]()
        message.write(b"x" * 70 + b"\r\n")
        message.write(b"y" * (200 * 1024))
        spool = message.transaction.spool
        self.assertTrue(os.path.exists(spool.path))
        message.connectionLost()
        self.assertFalse(os.path.exists(spool.path))
        self.assertEqual(server.store.rows, [])


class ReplyTableTests(unittest.TestCase):
    """Each row of README's "Addresses and replies" table, at the protocol level."""

    def setUp(self):
        self.server = Server(self)
        self.session = self.server.connect()
        self.session.command(b"EHLO customer.test")
        self.session.command(b"MAIL FROM:<buyer@customer.test>")

    def rcpt(self, address: bytes) -> bytes:
        return self.session.command(b"RCPT TO:<" + address + b">")

    def data(self) -> list[bytes]:
        self.session.send(b"DATA\r\n" + MESSAGE + b".\r\n")
        return self.session.replies()

    def test_recipients(self):
        self.assertEqual(self.rcpt(b"orders+acme@example.com"), b"250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt(b"orders+ACME@EXAMPLE.com"), b"250 2.1.5 Recipient OK")
        self.assertEqual(
            self.rcpt(b"orders@example.com"), b"550 5.1.1 No such recipient: address must be LOCAL+ORGANISATION@example.com"
        )
        self.assertEqual(self.rcpt(b"orders+nosuch@example.com"), b"550 5.1.1 No such recipient: unknown organisation")
        self.assertEqual(self.rcpt(b"orders+gone@example.com"), b"550 5.1.1 No such recipient: unknown organisation")
        self.assertEqual(
            self.rcpt(b"orders+acme@elsewhere.test"), b"550 5.7.1 Relaying denied: we do not accept mail for elsewhere.test"
        )
        self.assertEqual(self.session.protocol.replies.errors, 4)

    def test_lookup_failure_is_temporary_and_no_error(self):
        self.server.store.pending["acme"] = defer.fail(ConnectionError("database down"))
        self.assertEqual(
            self.rcpt(b"orders+acme@example.com"), b"451 4.3.0 Temporary failure looking up the recipient, try again later"
        )
        self.assertEqual(self.session.protocol.replies.errors, 0)

    def test_accepted_for_two_organisations(self):
        self.rcpt(b"orders+acme@example.com")
        self.rcpt(b"orders+beta@example.com")
        self.assertEqual(self.data(), [b"354 End data with <CR><LF>.<CR><LF>", b"250 2.0.0 Ok: stored as message 1, 2"])

    def test_duplicate_answered_like_accepted(self):
        self.rcpt(b"orders+acme@example.com")
        self.assertEqual(self.data()[-1], b"250 2.0.0 Ok: stored as message 1")
        self.session.command(b"MAIL FROM:<buyer@customer.test>")
        self.rcpt(b"orders+acme@example.com")
        self.assertEqual(self.data()[-1], b"250 2.0.0 Ok: stored as message 1")
        self.assertEqual(len(self.server.store.rows), 1)

    def test_storage_failure_is_451_and_nothing_stored(self):
        self.server.blobs.broken = True
        self.rcpt(b"orders+acme@example.com")
        self.assertEqual(self.data()[-1], b"451 4.3.0 Temporary storage failure, message not accepted, try again later")
        self.assertEqual(self.server.store.rows, [])
        self.assertEqual(self.session.command(b"NOOP"), b"250 2.0.0 OK")

    def test_store_timeout_is_451_and_input_held_meanwhile(self):
        self.server.store.insert_result = defer.Deferred()
        self.rcpt(b"orders+acme@example.com")
        self.session.send(b"DATA\r\n" + MESSAGE + b".\r\nNOOP\r\n")
        self.assertEqual(self.session.replies(), [b"354 End data with <CR><LF>.<CR><LF>"])
        self.server.clock.advance(self.server.ingest.store_timeout - 0.1)
        self.assertEqual(self.session.replies(), [])
        self.server.clock.advance(0.1)
        self.assertEqual(
            self.session.replies(),
            [b"451 4.3.0 Temporary storage failure, message not accepted, try again later", b"250 2.0.0 OK"],
        )

    def test_commands(self):
        self.patch(smtp_replies, "SOFT_ERROR_LIMIT", 100)
        session = self.session
        self.assertEqual(session.command(b"MAIL FROM:<other@customer.test>"), b"503 5.5.1 Sender already given")
        self.assertEqual(session.command(b"DATA"), b"503 5.5.1 Need MAIL and RCPT before DATA")
        self.assertEqual(session.command(b"RCPT TO:<orders+acme@example.com> NOTIFY=NEVER"), b"555 5.5.4 Unsupported RCPT TO parameter")
        self.assertEqual(session.command(b"RCPT orders+acme@example.com"), b"501 5.5.4 Syntax: RCPT TO:<address>")
        self.assertEqual(session.command(b"RSET"), b"250 2.0.0 OK")
        self.assertEqual(session.command(b"RCPT TO:<orders+acme@example.com>"), b"503 5.5.1 Need MAIL before RCPT")
        self.assertEqual(session.command(b"MAIL FROM:<a@customer.test> SIZE=x"), b"501 5.5.4 Bad SIZE parameter")
        self.assertEqual(session.command(b"MAIL FROM:<a@customer.test> BODY=BINARYMIME"), b"501 5.5.4 Bad BODY parameter")
        self.assertEqual(session.command(b"MAIL FROM:<a@customer.test> RET=HDRS"), b"555 5.5.4 Unsupported MAIL FROM parameter RET")
        self.assertEqual(session.command(b"MAIL FROM <a@customer.test>"), b"501 5.5.4 Syntax: MAIL FROM:<address>")
        self.assertEqual(session.command(b"VRFY orders"), b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
        self.assertEqual(session.command(b"HELP"), b"214 2.0.0 See RFC 5321")
        self.assertEqual(session.command(b""), b"500 5.5.2 Syntax error")
        self.assertEqual(session.command(b"HELO customer.test"), b"250 mx.test Hello 192.0.2.1")
        self.assertEqual(session.command(b"STARTTLS"), b"454 4.7.0 TLS not available")
        self.assertEqual(session.command(b"QUIT"), b"221 2.0.0 Bye")
        self.assertTrue(session.closed)

    def test_too_many_connections_from_one_address(self):
        server = Server(self, max_connections_per_ip=1)
        first = server.connect()
        second = server.connect()
        self.assertEqual(second.greeting, b"421 4.7.0 mx.test Too many connections, try again later")
        self.assertTrue(second.closed)
        self.assertFalse(first.closed)
        self.assertTrue(server.connect("192.0.2.2").greeting.startswith(b"220 "))


class LimitTests(unittest.TestCase):
    def test_command_lines(self):
        session = Server(self).connect()
        self.assertEqual(session.command(b"NOOP " + b"x" * 508), b"500 5.5.2 Line too long")
        session.send(b"NOOP " + b"x" * 2000)
        self.assertEqual(session.replies(), [b"500 5.5.2 Line too long"])
        session.send(b"x" * 2000 + b"\r\n")
        self.assertEqual(session.replies(), [])
        self.assertEqual(session.command(b"NOOP a\x00b"), b"500 5.5.2 Invalid characters in command")
        self.assertEqual(session.command(b"NOOP \xc3\xa4"), b"500 5.5.2 Invalid characters in command")
        self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")

    def test_header_section_too_large(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        session.send(b"X-Filler: " + b"x" * 900 + b"\r\n")
        session.send((b"X-Filler: " + b"x" * 900 + b"\r\n") * 300 + b"\r\nbody\r\n.\r\n")
        self.assertEqual(session.replies(), [b"552 5.3.4 Header section too large"])
        self.assertEqual(server.store.rows, [])
        self.assertEqual(os.listdir(server.spool_dir), [])

    def test_message_line_too_long(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        session.send(b"Subject: x\r\n\r\n" + b"y" * (128 * 1024 + 1) + b"\r\n.\r\n")
        self.assertEqual(session.replies(), [b"500 5.5.2 Message line longer than 131072 bytes"])
        self.assertEqual(server.store.rows, [])
        self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")

    def test_spool_that_cannot_be_written_is_451(self):
        """On main the OSError escaped dataReceived: no reply, the connection dropped."""
        server = Server(self, spool_dir=os.path.join(temp_dir(self), "missing"))
        session = server.connect()
        open_data(session)
        dropped = rejected("temporary_failure")
        session.send(MESSAGE + (b"x" * 70 + b"\r\n") * 3000 + b".\r\n")
        self.assertEqual(session.replies(), [b"451 4.3.0 Temporary local problem, try again later"])
        self.assertEqual(rejected("temporary_failure"), dropped + 1)
        self.assertEqual(server.store.rows, [])
        self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")

    def test_full_disk_is_451_and_leaves_no_spool_file(self):
        """
        On main, a write that failed with ENOSPC left its bytes in the file's
        buffer: discarding the spool closed the file, the close failed the
        same way before the unlink, and the error escaped the reactor
        ("Unhandled Error"), a 0-byte spool-*.eml left per try.
        """

        class FullDisk(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real_open = spool_module.Spool._open
        opened = []

        def full_open(spool):
            real = real_open(spool)
            opened.append(spool.path)
            fd = os.dup(real.fileno())
            real.close()
            return io.BufferedWriter(FullDisk(fd, "wb"), 1 << 20)

        self.patch(spool_module.Spool, "_open", full_open)
        self.patch(spool_module, "deferToThread", lambda f, *args: defer.maybeDeferred(f, *args))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = Server(self)
        session = server.connect()
        # Past the write buffer the failure comes during DATA; within it, at the
        # close before the message is stored.
        for lines in (20000, 3000):
            del events[:]
            open_data(session)
            data = MESSAGE + (b"x" * 70 + b"\r\n") * lines
            for start in range(0, len(data), 65536):
                session.send(data[start : start + 65536])
            self.assertTrue(os.path.exists(opened[-1]))
            session.send(b".\r\n")
            self.assertEqual(session.replies()[-1][:10], b"451 4.3.0 ", lines)
            self.assertEqual(os.listdir(server.spool_dir), [], lines)
            errors = [formatEvent(e) for e in events if e["log_level"] in (LogLevel.error, LogLevel.critical)]
            self.assertEqual(len(errors), 1, errors)
            self.assertIn("No space left on device", errors[0])
            self.assertEqual(session.command(b"RSET"), b"250 2.0.0 OK")
        self.assertEqual(len(opened), 2)
        self.assertEqual(server.store.rows, [])
        self.assertFalse(session.closed)

    def test_big_message_spool_file_is_gone_after_storing(self):
        self.patch(spool_module, "deferToThread", lambda f, *args: defer.maybeDeferred(f, *args))
        server = Server(self)
        session = server.connect()
        open_data(session)
        body = (b"x" * 70 + b"\r\n") * 3000
        session.send(MESSAGE + body)
        self.assertEqual(len(os.listdir(server.spool_dir)), 1)
        session.send(b".\r\n")
        self.assertEqual(session.replies(), [b"250 2.0.0 Ok: stored as message 1"])
        self.assertEqual(os.listdir(server.spool_dir), [])
        [blob] = server.blobs.blobs.values()
        self.assertTrue(blob.endswith(body), len(blob))

    def test_transaction_without_helo(self):
        """On main this crashed at DATA (Twisted's peer before HELO is text)."""
        server = Server(self)
        session = server.connect()
        session.send(b"MAIL FROM:<buyer@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(session.replies()[-1], b"250 2.0.0 Ok: stored as message 1")
        [blob] = server.blobs.blobs.values()
        self.assertTrue(blob.startswith(b"Received: from unknown ([192.0.2.1])\r\n\tby mx.test (mailingest) with SMTP id "), blob)


class DataPaceTests(unittest.TestCase):
    """Slow DATA is cut off by the pace rules, on the clock."""

    def drip(self, server, session, chunk: bytes, every: float, seconds: float) -> None:
        waited = 0.0
        while waited < seconds and not session.closed:
            session.send(chunk)
            server.clock.advance(every)
            waited += every

    def test_slow_drip_cut_off_after_the_grace_period(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        slow = rejected("slow")
        self.drip(server, session, b"x" * 100 + b"\r\n", 1.0, smtp_limits.DATA_RATE_GRACE_SECONDS)
        self.assertFalse(session.closed)
        self.drip(server, session, b"x" * 100 + b"\r\n", 1.0, smtp_limits.DATA_CHECK_SECONDS)
        self.assertEqual(session.replies(), [b"421 4.4.2 mx.test Data too slow, closing connection"])
        self.assertTrue(session.closed)
        self.assertEqual(rejected("slow"), slow + 1)
        session.protocol.connectionLost(None)
        self.assertEqual(server.store.rows, [])

    def test_steady_data_passes(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        self.drip(server, session, b"x" * 600 + b"\r\n", 1.0, 120)
        session.send(b".\r\n")
        self.assertEqual(session.replies(), [b"250 2.0.0 Ok: stored as message 1"])

    def test_data_may_not_take_longer_than_the_limit(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        self.drip(server, session, b"x" * 2998 + b"\r\n", smtp_limits.DATA_CHECK_SECONDS, smtp_limits.MAX_DATA_SECONDS + 10)
        self.assertEqual(session.replies(), [b"421 4.4.2 mx.test Data too slow, closing connection"])
        self.assertTrue(session.closed)

    def test_pace_check_stops_with_the_data(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        session.send(MESSAGE + b".\r\n")
        self.assertEqual(server.clock.getDelayedCalls()[0].getTime(), 300.0)
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)


class SessionTests(unittest.TestCase):
    """The session's facts, as delivery and its log lines get them."""

    def test_behind_a_proxy_header(self):
        server = Server(self)
        factory = ProxyHeaderFirstFactory(server.factory, [ipaddress.ip_network("10.0.0.0/8")])
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.5", 40000))
        wrapper = factory.buildProtocol(transport.getPeer())
        wrapper.makeConnection(transport)
        self.addCleanup(wrapper.connectionLost, None)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        wrapper.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n" + TRANSACTION + MESSAGE + b".\r\n")
        self.assertTrue(transport.value().endswith(b"250 2.0.0 Ok: stored as message 1\r\n"), transport.value())
        session = wrapper.wrappedProtocol.session
        self.assertEqual((session.peer, session.proxy), ("203.0.113.7", "10.0.0.5"))
        [accepted] = [e for e in events if e.get("event") == "accepted"]
        self.assertEqual((accepted["peer"], accepted["proxy"]), ("203.0.113.7", "10.0.0.5"))

    def test_no_proxy_and_starttls_forgets_the_helo(self):
        server = Server(self, tls=True)
        session = server.connect()
        session.send(b"EHLO victim.test\r\nSTARTTLS\r\n")
        session.replies()
        self.assertEqual((session.protocol.session.helo, session.protocol.session.esmtp), (None, False))
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(session.replies()[-1], b"250 2.0.0 Ok: stored as message 1")
        self.assertIsNone(session.protocol.session.proxy)
        [blob] = server.blobs.blobs.values()
        self.assertTrue(
            blob.startswith(b"Received: from unknown ([192.0.2.1])\r\n\tby mx.test (mailingest) with SMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384) id "),
            blob[:200],
        )


@implementer(smtp.IMessage)
class RecordedMessage:
    """A message that provides Twisted's IMessage and nothing more."""

    def __init__(self, delivery, user):
        self.delivery = delivery
        self.user = user
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.delivery.received.append((self.user, self.lines))
        return defer.succeed("queued")

    def connectionLost(self):
        self.delivery.lost += 1


@implementer(IIngestMessage)
class BulkMessage(RecordedMessage):
    """An IIngestMessage of another delivery: its data in bulk, its outcome its own IDeliveryOutcome."""

    def write(self, chunk):
        self.lines.append(chunk)

    def eomReceived(self):
        super().eomReceived()
        return defer.succeed(Stored([7, 9]))


@implementer(IDeliveryOutcome)
class Stored:
    def __init__(self, ids):
        self.ids = ids



@implementer(ISMTPDelivery, smtp.IMessageDeliveryFactory, smtp.IMessageDelivery)
class RecordingDelivery:
    """
    Another delivery, on Twisted's interfaces and ours only: one per
    connection (the session's), a transaction per MAIL FROM, messages of
    C{message_type}.
    """

    def __init__(self, message_type=RecordedMessage):
        self.message_type = message_type
        self.sessions = []
        self.transactions = 0
        self.received = []
        self.lost = 0

    def deliveryFactory(self, session):
        self.sessions.append(session)
        return self

    def getMessageDelivery(self):
        self.transactions += 1
        return self

    def validateFrom(self, helo, origin):
        if origin.local == b"refused":
            raise smtp.SMTPBadSender(origin, 550, "5.7.1 Not from you")
        return origin

    def validateTo(self, user):
        return defer.succeed(lambda: self.message_type(self, bytes(user.dest)))

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + (helo[0] or b"unknown") + b" by test"


class InjectedDeliveryTests(unittest.TestCase):
    """
    The protocol is given its delivery and talks to it through declared
    interfaces only. On main the factory took an Ingest and built our own
    delivery from it, and DATA called C{write} on every message.
    """

    def connect(self, delivery):
        factory = IngestSMTPFactory(delivery, "mx.test", 1_000_000, 10, 300, 10, 10, clock=task.Clock())
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return Session(protocol, transport)

    def test_a_delivery_on_twisteds_interfaces_alone(self):
        delivery = RecordingDelivery()
        session = self.connect(delivery)
        self.assertEqual(delivery.sessions, [session.protocol.session])
        session.send(
            b"EHLO customer.test\r\nMAIL FROM:<refused@customer.test>\r\nMAIL FROM:<a@customer.test>\r\n"
            b"RCPT TO:<x@example.com>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n" + MESSAGE + b"..dot\r\n.\r\n"
        )
        self.assertEqual(
            [reply[:9] for reply in session.replies()],
            [b"250-mx.te", b"550 5.7.1", b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"354 End d", b"250 2.0.0"],
        )
        self.assertEqual(delivery.transactions, 2)
        lines = [b"Received: from customer.test by test"] + MESSAGE.split(b"\r\n")[:-1] + [b".dot"]
        self.assertEqual(delivery.received, [(b"x@example.com", lines), (b"y@example.com", lines)])
        session.send(b"RSET\r\nMAIL FROM:<a@customer.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhalf a line")
        session.protocol.connectionLost(None)
        self.assertEqual((delivery.transactions, delivery.lost), (3, 1))

    def test_the_reply_names_the_outcomes_ids(self):
        delivery = RecordingDelivery(BulkMessage)
        session = self.connect(delivery)
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(session.replies()[-1], b"250 2.0.0 Ok: stored as message 7, 9")
        self.assertEqual(delivery.received, [(b"x@example.com", [b"Received: from unknown by test", MESSAGE])])

    def test_a_delivery_failing_at_data_is_a_reply(self):
        """Twisted's do_DATA answers a delivery's error there; the session goes on."""
        delivery = RecordingDelivery()
        delivery.receivedHeader = lambda helo, origin, recipients: 1 / 0
        session = self.connect(delivery)
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        self.assertEqual(session.replies()[-1], b"451 4.3.0 Temporary failure, try again later")
        self.assertEqual(delivery.lost, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")

    def test_a_sender_decided_later(self):
        """
        validateFrom may answer with a Deferred (Twisted's IMessageDelivery):
        what the client pipelined waits for it, in order, refused or accepted.
        (Ours answers at once, and is answered without a Deferred: issue 29.)
        """
        delivery = RecordingDelivery()
        pending = []
        delivery.validateFrom = lambda helo, origin: pending.append(defer.Deferred()) or pending[-1]
        session = self.connect(delivery)
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<x@example.com>\r\nNOOP\r\n")
        self.assertEqual((session.replies(), len(pending)), ([], 1))
        pending[0].errback(smtp.SMTPBadSender(smtp.Address(b"a@customer.test"), 550, "5.7.1 Not from you"))
        self.assertEqual(session.replies(), [b"550 5.7.1 Not from you", b"503 5.5.1 Need MAIL before RCPT", b"250 2.0.0 OK"])
        session.send(b"MAIL FROM:<b@customer.test>\r\nRCPT TO:<x@example.com>\r\n")
        self.assertEqual(session.replies(), [])
        pending[1].callback(smtp.Address(b"b@customer.test"))
        self.assertEqual(session.replies(), [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"])
        self.assertEqual(delivery.transactions, 2)

    def test_a_recipient_decided_later_or_failing(self):
        """
        validateTo's answer holds the client's pipelined input until it comes,
        and an unexpected error there is a logged 451.
        """
        delivery = RecordingDelivery()
        pending = defer.Deferred()
        answers = iter([lambda user: 1 / 0, lambda user: pending])
        delivery.validateTo = lambda user: next(answers)(user)
        session = self.connect(delivery)
        session.send(b"MAIL FROM:<a@customer.test>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<y@example.com>\r\nNOOP\r\n")
        self.assertEqual(session.replies(), [b"250 2.1.0 Sender OK", b"451 4.3.0 Temporary failure, try again later"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        pending.callback(lambda: RecordedMessage(delivery, b"y@example.com"))
        self.assertEqual(session.replies(), [b"250 2.1.5 Recipient OK", b"250 2.0.0 OK"])

    def test_a_delivery_that_declares_nothing_is_refused(self):
        class Undeclared:
            def deliveryFactory(self, session):
                return RecordingDelivery()

        self.assertRaises(TypeError, IngestSMTPFactory, Undeclared(), "mx.test", 1_000_000, 10, 300, 10, 10)


class OverrideTests(unittest.TestCase):
    """Issue 24 item 4: which of Twisted's ESMTP methods the protocol still replaces, each listed with its reason."""

    def overridden(self) -> set[str]:
        return {
            name for name in vars(IngestSMTP)
            if callable(getattr(smtp.ESMTP, name, None)) and (name == "__init__" or not name.startswith("__"))
        }

    def test_back_to_twisted(self):
        self.assertIn("do_QUIT", self.overridden())
        for name in ("lookupMethod", "sendSyntaxError", "lineReceived", "validateFrom", "validateTo", "receivedHeader"):
            self.assertNotIn(name, self.overridden())
            self.assertIs(getattr(IngestSMTP, name), getattr(smtp.ESMTP, name))

    def test_every_override_is_listed_with_its_reason(self):
        overrides = self.overridden()
        self.assertGreater(len(overrides), 10)
        listed = smtp_protocol.__doc__.split("Every method of Twisted's")[1].split("Not overridden any more")[0]
        # Each bullet names its methods, then after the colon the reason.
        bullets = listed.split("\n- ")[1:]
        named = {name for bullet in bullets for name in re.findall(r"C\{(\w+)\}", bullet.split(":", 1)[0])}
        self.assertEqual(named & set(dir(smtp.ESMTP)), overrides)

    def test_the_replies_contract(self):
        verifyObject(smtp_replies.IReplyChannel, Server(self).connect().protocol)

    def test_the_input_and_transaction_contracts(self):
        """The collaborators the session was split into (issue 24) reach it only through declared interfaces."""
        from mailingest.smtp.command_input import ICommandChannel
        from mailingest.smtp.transaction import ITransactionChannel

        protocol = Server(self).connect().protocol
        verifyObject(ICommandChannel, protocol)
        verifyObject(ITransactionChannel, protocol)


class ClassSizeTests(unittest.TestCase):
    def test_no_smtp_class_over_250_lines(self):
        """Issue 24: no class over 250 lines (IngestSMTP was 481 on main)."""
        root = pathlib.Path(smtp_protocol.__file__).parent
        sizes = {
            f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
            for path in root.glob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef)
        }
        self.assertIn("protocol.py:IngestSMTP", sizes)
        self.assertEqual({name: size for name, size in sizes.items() if size > 250}, {})


class EightBitVerbTests(unittest.TestCase):
    def test_utf8_after_mail_is_no_verb(self):
        """On main, Twisted's lookupMethod raised UnicodeDecodeError out of dataReceived."""
        session = Server(self).connect()
        self.assertEqual(session.command("MAILÄ FROM:<a@customer.test>".encode()), b"500 5.5.2 Command not recognised")
        self.assertEqual(session.command("RCPTé TO:<a@customer.test>".encode()), b"500 5.5.2 Command not recognised")
        self.assertEqual(session.command(b"NOOP"), b"250 2.0.0 OK")


class RefusedRecipientCountTests(unittest.TestCase):
    """The refused-recipient count per address over its sliding window, and a failure while counting."""

    def test_an_address_whose_refusals_expired_is_forgotten(self):
        """
        Counting an address whose refusals have all expired left an empty
        entry that the next sweep could not read (IndexError): the RCPT that
        triggered the sweep got no reply at all, about once every 10 minutes.
        """
        clock = task.Clock()
        counter = smtp_limits.AddressWindow(clock, limit=50, window=600)
        counter.add("192.0.2.1")
        self.assertEqual(counter.count("192.0.2.1"), 1)
        clock.advance(601)
        self.assertEqual(counter.count("192.0.2.1"), 0)
        counter.add("192.0.2.2")  # the sweep, due now
        self.assertEqual((counter.count("192.0.2.1"), counter.count("192.0.2.2")), (0, 1))
        self.assertEqual(counter.snapshot(), [{"peer": "192.0.2.2", "at": 601}])

    def test_a_command_that_fails_unexpectedly_is_answered(self):
        """A bug in a command's work is logged and answered 451; the client is never left waiting."""
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.0)
        server = Server(self)
        session = server.connect("198.51.100.7")
        self.patch(server.factory, "refused_recipient", lambda peer: 1 / 0)
        session.send(b"EHLO prober.test\r\nMAIL FROM:<p@prober.test>\r\nRCPT TO:<orders+nobody@example.com>\r\n")
        replies = session.replies()
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"451"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(session.command(b"RCPT TO:<orders+acme@example.com>")[:3], b"250")
