"""
The SMTP contract of SPEC section 4, from a real smtplib client against a
daemon listening on 127.0.0.1.
"""

import os
import socket
import smtplib
import threading
import time
import urllib.request

from twisted.internet import defer, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailingest.delivery.ingest import Ingest
from mailingest.errors import StorageError
from mailingest.delivery.routing import POSTMASTER_SLUG
from mailingest.delivery.spool import MEMORY_LIMIT
from mailingest.delivery.transaction import IngestDeliveries
from mailingest.smtp.protocol import IngestSMTPFactory
from tests import daemon
from tests.daemon import message, sleep
from tests.test_extraction import PDF, order


class DaemonTestCase(daemon.DaemonTestCase):
    """Also organisations C{beta} (active) and C{gone} (disabled)."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        store = self.daemon.store
        yield store.add_org("beta", "Beta Ltd")
        yield store.add_org("gone", "Gone Ltd")
        yield store.set_org_active("gone", False)

    def rcpt_reply(self, address):
        def attempt(client):
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            return client.rcpt(address)

        return self.daemon.smtp(attempt)


class RecipientTests(DaemonTestCase):
    @defer.inlineCallbacks
    def test_ehlo_advertises_extensions(self):
        code, reply = yield self.daemon.smtp(lambda c: c.ehlo("customer.test"))
        self.assertEqual(code, 250)
        for extension in (b"PIPELINING", b"8BITMIME", b"SIZE 52428800", b"ENHANCEDSTATUSCODES"):
            self.assertIn(extension, reply)

    @defer.inlineCallbacks
    def test_active_org(self):
        code, reply = yield self.rcpt_reply("orders+acme@example.com")
        self.assertEqual((code, reply[:5]), (250, b"2.1.5"))

    @defer.inlineCallbacks
    def test_slug_and_domain_are_case_insensitive(self):
        code, reply = yield self.rcpt_reply("Orders+ACME@Example.COM")
        self.assertEqual((code, reply[:5]), (250, b"2.1.5"))

    @defer.inlineCallbacks
    def test_refused_recipients(self):
        for address in (
            "orders@example.com",
            "orders+@example.com",
            "orders+nosuchorg@example.com",
            "orders+gone@example.com",
        ):
            code, reply = yield self.rcpt_reply(address)
            self.assertEqual((code, reply[:5]), (550, b"5.1.1"), address)

    @defer.inlineCallbacks
    def test_foreign_domain_is_relaying(self):
        code, reply = yield self.rcpt_reply("orders+acme@elsewhere.test")
        self.assertEqual((code, reply[:5]), (550, b"5.7.1"))
        self.assertIn(b"elay", reply)

    @defer.inlineCallbacks
    def test_org_added_while_running_is_accepted(self):
        code, _ = yield self.rcpt_reply("orders+newco@example.com")
        self.assertEqual(code, 550)
        yield self.daemon.store.add_org("newco", "New Co")
        code, _ = yield self.rcpt_reply("orders+newco@example.com")
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_org_disabled_while_running_is_refused_after_refresh(self):
        code, _ = yield self.rcpt_reply("orders+beta@example.com")
        self.assertEqual(code, 250)
        yield self.daemon.store.set_org_active("beta", False)
        directory = self.daemon.delivery.directory
        self.assertLessEqual(directory.interval, 5)
        yield directory.refresh()
        code, reply = yield self.rcpt_reply("orders+beta@example.com")
        self.assertEqual((code, reply[:5]), (550, b"5.1.1"))

    @defer.inlineCallbacks
    def test_commands_out_of_sequence(self):
        def attempt(client):
            client.ehlo("customer.test")
            replies = [client.rcpt("orders+acme@example.com")]
            replies.append(client.docmd("DATA"))
            client.mail("a@customer.test")
            replies.append(client.mail("b@customer.test"))
            replies.append(client.docmd("NOOP"))
            replies.append(client.docmd("BOGUS"))
            replies.append(client.docmd("RSET"))
            return replies

        replies = yield self.daemon.smtp(attempt)
        self.assertEqual(
            [(code, reply[:5]) for code, reply in replies],
            [(503, b"5.5.1"), (503, b"5.5.1"), (503, b"5.5.1"), (250, b"2.0.0"), (500, b"5.5.2"), (250, b"2.0.0")],
        )


class LimitTests(DaemonTestCase):
    overrides = {"max_recipients": "3", "max_message_size": "10000"}

    @defer.inlineCallbacks
    def test_too_many_recipients(self):
        def attempt(client):
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            return [client.rcpt("orders+acme@example.com") for _ in range(4)]

        replies = yield self.daemon.smtp(attempt)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 452])
        self.assertEqual(replies[-1][1][:5], b"4.5.3")

    @defer.inlineCallbacks
    def test_size_declared_too_large(self):
        def attempt(client):
            client.ehlo("customer.test")
            return client.mail("buyer@customer.test", ["SIZE=10001"])

        code, reply = yield self.daemon.smtp(attempt)
        self.assertEqual((code, reply[:5]), (552, b"5.3.4"))

    @defer.inlineCallbacks
    def test_message_exactly_at_the_limit_is_accepted(self):
        body = message()
        body += b"y" * (10000 - len(body) - 2) + b"\r\n"
        self.assertEqual(len(body), 10000)
        code, _ = yield self.daemon.send(body, ["orders+acme@example.com"])
        self.assertEqual(code, 250)


class SpooledDataTests(DaemonTestCase):
    """A message past the in-memory limit is received into a spool file: while DATA lasts, and never after."""

    overrides = {"max_message_size": str(2 * MEMORY_LIMIT)}

    @defer.inlineCallbacks
    def send_in_two_parts(self, first: bytes, then):
        """Open DATA and send C{first}; once the spool file exists, C{then(client)} goes on. Fires with (spool files, its result)."""
        spooled = threading.Event()

        def attempt(client):
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            client.rcpt("orders+acme@example.com")
            code, _ = client.docmd("DATA")
            assert code == 354, code
            client.send(first)
            spooled.wait(10)
            return then(client)

        sending = self.daemon.smtp(attempt)
        try:
            files = yield self.daemon.spooled()
        finally:
            spooled.set()
        result = yield sending
        return files, result

    @defer.inlineCallbacks
    def test_data_growing_past_the_limit(self):
        lines = (b"x" * 70 + b"\r\n") * (MEMORY_LIMIT // 72)

        def rest_too_large(client):
            client.send(lines * 2 + b".\r\n")
            refused = client.getreply()
            # the session stays usable
            client.rset()
            return refused, client.sendmail("b@customer.test", ["orders+acme@example.com"], message())

        files, ((code, reply), rejected) = yield self.send_in_two_parts(message() + lines * 2, rest_too_large)
        self.assertEqual(len(files), 1)
        self.assertEqual((code, reply[:5]), (552, b"5.3.4"))
        self.assertEqual(rejected, {})
        self.assertEqual((yield self.daemon.store.count_messages()), 1)
        self.assertEqual(self.daemon.spool_files(), [])

    @defer.inlineCallbacks
    def test_stored_message_leaves_no_spool_file(self):
        def end(client):
            client.send(b"the end\r\n.\r\n")
            return client.getreply()

        files, (code, _) = yield self.send_in_two_parts(message(body=("x" * 70 + "\r\n") * 2000), end)
        self.assertEqual(len(files), 1)
        self.assertEqual(code, 250)
        self.assertEqual((yield self.daemon.store.count_messages()), 1)
        self.assertEqual(self.daemon.spool_files(), [])

    @defer.inlineCallbacks
    def test_client_vanishing_mid_data_leaves_nothing(self):
        # lines of 1 KB past the in-memory limit (one line that long would pass the line limit too)
        past_memory = (b"x" * 1000 + b"\r\n") * (MEMORY_LIMIT // 1000 + 10)
        files, _ = yield self.send_in_two_parts(message() + past_memory, lambda client: client.close())
        self.assertEqual(len(files), 1)
        # let the daemon notice the close
        for _ in range(50):
            if not self.daemon.spool_files():
                break
            yield sleep(0.05)
        self.assertEqual(self.daemon.spool_files(), [])
        self.assertEqual(self.daemon.blob_files(), [])
        self.assertEqual((yield self.daemon.store.count_messages()), 0)
        code, _ = yield self.daemon.send(message(), ["orders+acme@example.com"])
        self.assertEqual(code, 250)


class AcceptanceTests(DaemonTestCase):
    @defer.inlineCallbacks
    def test_accepted_names_the_stored_message(self):
        code, reply = yield self.daemon.send(message(), ["orders+acme@example.com"])
        self.assertEqual((code, reply[:5]), (250, b"2.0.0"))
        [row] = yield self.daemon.store.list_messages()
        self.assertIn(str(row["id"]).encode(), reply)
        self.assertEqual(row["status"], "received")
        self.assertEqual(row["source"], "smtp")
        self.assertEqual(row["source_message_id"], "<order-1@customer.test>")
        self.assertEqual(row["mail_from"], "sender@customer.test")
        self.assertEqual(row["rcpt_to"], "orders+acme@example.com")
        self.assertEqual(row["subject"], "Order 1")

    @defer.inlineCallbacks
    def test_raw_bytes_round_trip(self):
        body = (
            b"From: buyer@customer.test\r\nSubject: dots\r\nMessage-ID: <dots@customer.test>\r\n\r\n"
            b".leading dot\r\n..two dots\r\n.\r\n \r\nbare\nlf and bare\rcr stay\r\n\xff\xfe 8bit\r\nno final newline"
        )

        def attempt(client):
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            client.rcpt("orders+acme@example.com")
            # smtplib dot-stuffs and normalises line endings; send DATA by hand
            client.putcmd("DATA")
            client.getreply()
            stuffed = body.replace(b"\r\n.", b"\r\n..")
            if stuffed.startswith(b"."):
                stuffed = b"." + stuffed
            client.send(stuffed + b"\r\n.\r\n")
            return client.getreply()

        code, _ = yield self.daemon.smtp(attempt)
        self.assertEqual(code, 250)
        [row] = yield self.daemon.store.list_messages()
        [path] = self.daemon.blob_files()
        with open(path, "rb") as f:
            stored = f.read()
        received, sep, rest = stored.partition(b"\r\n" + body[:5])
        self.assertTrue(received.startswith(b"Received: from customer.test ([127.0.0.1])\r\n\tby mx.test"))
        self.assertEqual(body[:5] + rest, body + b"\r\n")
        self.assertEqual(row["raw_size"], len(stored))
        import hashlib

        self.assertEqual(row["raw_sha256"], hashlib.sha256(stored).hexdigest())

    @defer.inlineCallbacks
    def test_one_message_to_several_orgs(self):
        code, reply = yield self.daemon.send(
            message(), ["orders+acme@example.com", "orders+beta@ingest.example.org", "other+ACME@example.com"]
        )
        self.assertEqual(code, 250)
        rows = yield self.daemon.store.list_messages()
        self.assertEqual(sorted(r["org_slug"] for r in rows), ["acme", "beta"])
        for row in rows:
            self.assertIn(str(row["id"]).encode(), reply)
        acme = [r for r in rows if r["org_slug"] == "acme"][0]
        self.assertEqual(acme["rcpt_to"], "orders+acme@example.com, other+ACME@example.com")

    @defer.inlineCallbacks
    def test_duplicate_message_id(self):
        first = yield self.daemon.send(message(), ["orders+acme@example.com"])
        again = yield self.daemon.send(message(), ["orders+acme@example.com"])
        self.assertEqual(first, (250, b"2.0.0 Ok: stored as message 1"))
        self.assertEqual(again, first)
        self.assertEqual((yield self.daemon.store.count_messages()), 1)
        self.assertEqual(len(self.daemon.blob_files()), 1)

    @defer.inlineCallbacks
    def test_retry_through_another_relay_is_a_duplicate(self):
        """Trace headers are not content: the same message with other Received headers is a retry."""
        first = yield self.daemon.send(message(), ["orders+acme@example.com"])
        relayed = b"Received: from relay2.customer.test by mx2.customer.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        relayed += b"DKIM-Signature: v=1; a=rsa-sha256; d=customer.test; b=abc\r\n" + message()
        again = yield self.daemon.send(relayed, ["orders+acme@example.com"])
        self.assertEqual(again, first)
        self.assertEqual((yield self.daemon.store.count_messages()), 1)

    @defer.inlineCallbacks
    def test_taken_message_id_does_not_suppress_the_real_message(self):
        """Issue 11: a fake order sent first with the real order's Message-ID."""
        message_id = "<PO-778899@erp.partner.example>"
        fake = order("PO 778899", message_id=message_id).as_bytes()
        real = order("PO 778899", [(PDF, "application", "pdf", "PO-778899.pdf")], message_id=message_id).as_bytes()
        code, reply = yield self.daemon.send(fake, ["orders+acme@example.com"])
        self.assertEqual((code, reply), (250, b"2.0.0 Ok: stored as message 1"))
        code, reply = yield self.daemon.send(real, ["orders+acme@example.com"])
        self.assertEqual(code, 250)
        self.assertRegex(reply, rb"^2\.0\.0 Ok: stored as message \d+$")
        real_id = int(reply.split()[-1])
        self.assertNotEqual(real_id, 1)
        retried = yield self.daemon.send(real, ["orders+acme@example.com"])
        self.assertEqual(retried, (code, reply))
        self.assertEqual((yield self.daemon.store.count_messages()), 2)
        row = yield self.daemon.settled(real_id)
        self.assertEqual(row["status"], "parsed")
        self.assertEqual(row["source_message_id"], message_id + "#collision-" + row["content_sha256"][:12])
        self.assertIs(row["message_id_collision"], True)
        [document] = yield self.daemon.store.list_documents(message_id=real_id)
        self.assertEqual(document["filename"], "PO-778899.pdf")
        self.assertEqual((yield self.daemon.store.get_message(1))["source_message_id"], message_id)

    @defer.inlineCallbacks
    def test_duplicate_without_message_id_is_deduplicated_by_content(self):
        body = message(message_id=None)
        yield self.daemon.send(body, ["orders+acme@example.com"])
        yield self.daemon.send(body, ["orders+acme@example.com"])
        yield self.daemon.send(body + b"changed\r\n", ["orders+acme@example.com"])
        rows = yield self.daemon.store.list_messages()
        self.assertEqual(len(rows), 2)
        for row in rows:
            self.assertTrue(row["source_message_id"].startswith("<sha256-"))
        self.assertNotEqual(rows[0]["source_message_id"], rows[1]["source_message_id"])

    @defer.inlineCallbacks
    def test_duplicates_are_per_organisation(self):
        yield self.daemon.send(message(), ["orders+acme@example.com"])
        code, reply = yield self.daemon.send(message(), ["orders+acme@example.com", "orders+beta@example.com"])
        self.assertEqual(code, 250)
        rows = yield self.daemon.store.list_messages()
        self.assertEqual(sorted(r["org_slug"] for r in rows), ["acme", "beta"])
        ids = {row["org_slug"]: row["id"] for row in rows}
        code, reply = yield self.daemon.send(message(), ["orders+beta@example.com", "orders+acme@example.com"])
        self.assertEqual((code, reply), (250, b"2.0.0 Ok: stored as message %d, %d" % (ids["beta"], ids["acme"])))
        self.assertEqual((yield self.daemon.store.count_messages()), 2)
        self.assertEqual(len(self.daemon.blob_files()), 2)

    @defer.inlineCallbacks
    def test_several_messages_in_one_session(self):
        def session(client):
            return [
                client.sendmail("b@customer.test", ["orders+acme@example.com"], message(message_id=f"<m{i}@x>"))
                for i in range(5)
            ]

        results = yield self.daemon.smtp(session)
        self.assertEqual(results, [{}] * 5)
        self.assertEqual((yield self.daemon.store.count_messages()), 5)


class PipeliningTests(DaemonTestCase):
    def converse(self, payload: bytes, replies: int) -> list[bytes]:
        def run():
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(payload)
                lines = []
                while len(lines) < replies:
                    line = f.readline()
                    if not line:
                        break
                    if line[3:4] == b" ":
                        lines.append(line.rstrip(b"\r\n"))
                return lines

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_pipelined_transaction_replies_in_order(self):
        data = message().replace(b"\r\n.", b"\r\n..")
        payload = (
            b"EHLO customer.test\r\n"
            b"MAIL FROM:<buyer@customer.test>\r\n"
            b"RCPT TO:<orders+nosuch@example.com>\r\n"
            b"RCPT TO:<orders+acme@example.com>\r\n"
            b"RCPT TO:<orders+newly@example.com>\r\n"
            b"RCPT TO:<orders+beta@example.com>\r\n"
            b"DATA\r\n" + data + b".\r\n"
            b"MAIL FROM:<buyer@customer.test>\r\n"
            b"RCPT TO:<orders+acme@example.com>\r\n"
            b"DATA\r\n" + data.replace(b"order-1", b"order-2") + b".\r\n"
            b"QUIT\r\n"
        )
        lines = yield self.converse(payload, 12)
        codes = [line[:3] for line in lines]
        self.assertEqual(
            codes,
            [b"250", b"250", b"550", b"250", b"550", b"250", b"354", b"250", b"250", b"250", b"354", b"250"],
        )
        rows = yield self.daemon.store.list_messages()
        self.assertEqual(sorted(r["org_slug"] for r in rows), ["acme", "acme", "beta"])


class FailingStorageTests(DaemonTestCase):
    @defer.inlineCallbacks
    def test_blob_store_failure_gives_451_and_nothing_stored(self):
        def broken(*args):
            return defer.fail(StorageError("disk on fire"))

        spool_existed = []

        def broken_put_file(key, path, sha256, size):
            spool_existed.append(os.path.exists(path))
            return broken()

        self.patch(self.daemon.blobs, "put_file", broken_put_file)
        self.patch(self.daemon.blobs, "put_bytes", broken)
        # Small messages are stored from memory, large ones from the spool file.
        for body in ("small\r\n", ("x" * 70 + "\r\n") * 3000):
            code, reply = yield self.daemon.send(message(body=body), ["orders+acme@example.com"])
            self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        self.assertEqual(spool_existed, [True])
        self.assertEqual((yield self.daemon.store.count_messages()), 0)
        self.assertEqual(self.daemon.blob_files(), [])
        self.assertEqual(self.daemon.spool_files(), [])

    @defer.inlineCallbacks
    def test_database_failure_gives_451_and_no_orphan_blob(self):
        def broken(rows):
            return defer.fail(RuntimeError("database gone"))

        self.patch(self.daemon.store, "insert_messages", broken)
        code, reply = yield self.daemon.send(message(), ["orders+acme@example.com", "orders+beta@example.com"])
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        self.patch(self.daemon.store, "insert_messages", type(self.daemon.store).insert_messages.__get__(self.daemon.store))
        self.assertEqual((yield self.daemon.store.count_messages()), 0)
        self.assertEqual(self.daemon.blob_files(), [])
        # once the database is back, the retried message is accepted
        code, _ = yield self.daemon.send(message(), ["orders+acme@example.com"])
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_database_failure_during_lookup_is_temporary(self):
        yield self.daemon.delivery.directory.refresh()

        def broken(slug):
            return defer.fail(RuntimeError("database gone"))

        self.patch(self.daemon.store, "get_org", broken)
        code, reply = yield self.rcpt_reply("orders+unknown@example.com")
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        # known organisations are still served from the last good list
        code, _ = yield self.rcpt_reply("orders+acme@example.com")
        self.assertEqual(code, 250)


class ConnectionLimitTests(DaemonTestCase):
    overrides = {"max_connections": "4", "max_connections_per_ip": "2"}

    @defer.inlineCallbacks
    def test_per_ip_and_total_limits(self):
        def run():
            open_ = [smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10) for _ in range(2)]
            refused = []
            try:
                smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10)
            except smtplib.SMTPConnectError as e:
                refused.append((e.smtp_code, e.smtp_error[:5]))
            # other source addresses in 127/8 count separately, up to the total
            more = [smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10, source_address=(f"127.0.0.{i}", 0)) for i in (2, 3)]
            try:
                smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10, source_address=("127.0.0.4", 0))
            except smtplib.SMTPConnectError as e:
                refused.append((e.smtp_code, e.smtp_error[:5]))
            for client in open_ + more:
                client.quit()
            return refused

        refused = yield threads.deferToThread(run)
        self.assertEqual(refused, [(421, b"4.7.0"), (421, b"4.7.0")])
        yield sleep(0.2)
        code, _ = yield self.daemon.send(message(), ["orders+acme@example.com"])
        self.assertEqual(code, 250)


class _Directory:
    """Active organisations by slug, without a database."""

    def __init__(self, active):
        self.active = active

    def lookup(self, slug):
        return defer.succeed(self.active.get(slug))

    def domain(self, key):
        """No verified custom domain (issue 27)."""
        return None


class AddressProtocolTests(unittest.TestCase):
    """Issue 12 items 3 and 4, in the dialogue: postmaster, quoted local parts, domain literals."""

    def setUp(self):
        directory = _Directory({"acme": 1, POSTMASTER_SLUG: 0})
        ingest = Ingest(None, None, directory, ["example.com", "ingest.example.org"], "mx.test", self.mktemp())
        self.clock = task.Clock()
        factory = IngestSMTPFactory(IngestDeliveries(ingest), "mx.test", 1_000_000, 10, 300, 10, 10, clock=self.clock)
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)
        self.addCleanup(self.protocol.connectionLost, Failure(ConnectionDone()))
        self.say(b"EHLO customer.test")

    def say(self, line: bytes) -> bytes:
        """The final reply line to one command, after any tarpit delay."""
        self.transport.clear()
        self.protocol.dataReceived(line + b"\r\n")
        self.clock.advance(30)
        return self.transport.value().rstrip(b"\r\n").split(b"\r\n")[-1]

    def rcpt(self, path: bytes, sender: bytes = b"<buyer@customer.test>") -> bytes:
        self.say(b"RSET")
        self.assertEqual(self.say(b"MAIL FROM:" + sender)[:3], b"250")
        return self.say(b"RCPT TO:" + path)

    def test_postmaster(self):
        for path in (b"<postmaster>", b"<Postmaster>", b"<POSTMASTER@example.com>", b"<postmaster@Ingest.Example.ORG>",
                     b"<postmaster@mx.test>", b'<"postmaster"@example.com>'):
            self.assertEqual(self.rcpt(path), b"250 2.1.5 Recipient OK", path)
        (user, make_message), = self.protocol.transaction.recipients
        self.assertEqual([r.slug for r in make_message().transaction.envelope.recipients], [POSTMASTER_SLUG])

    def test_postmaster_elsewhere_and_the_reserved_slug_are_refused(self):
        self.assertEqual(self.rcpt(b"<postmaster@elsewhere.test>")[:9], b"550 5.7.1")
        for path in (b"<orders+_postmaster@example.com>", b"<orders+postmaster@example.com>",
                     b'<"orders+_postmaster"@example.com>'):
            self.assertEqual(self.rcpt(path), b"550 5.1.1 No such recipient: unknown organisation", path)

    def test_quoted_local_part_is_the_same_mailbox(self):
        for path in (b'<"orders+acme"@example.com>', b'<"orders\\+acme"@example.com>', b'"orders+acme"@example.com'):
            self.assertEqual(self.rcpt(path), b"250 2.1.5 Recipient OK", path)
        self.assertEqual(self.rcpt(b'<"orders+ac\\"me"@example.com>'),
                         b"550 5.1.1 No such recipient: unknown organisation")

    def test_domain_literal_is_relaying(self):
        for path in (b"<orders+acme@[127.0.0.1]>", b"<orders+acme@[IPv6:::1]>"):
            reply = self.rcpt(path)
            self.assertTrue(reply.startswith(b"550 5.7.1 Relaying denied"), reply)

    def test_unparseable_addresses_get_our_text(self):
        for path in (b"<orders+acme@[127.0.0.1>", b"<a@b@example.com>", b'<"unterminated@example.com>',
                     b"<orders+acme@exa(mple).com>", b"<@route:>"):
            self.assertEqual(self.rcpt(path), b"553 5.1.3 Bad recipient address syntax", path)
        for sender in (b"<a@b@customer.test>", b"<buyer@[127.0.0.1>", b'<"x@customer.test>'):
            self.say(b"RSET")
            self.assertEqual(self.say(b"MAIL FROM:" + sender), b"553 5.1.7 Bad sender address syntax", sender)

    def test_source_route_and_null_sender_still_accepted(self):
        self.assertEqual(self.rcpt(b"<@relay.test,@other.test:orders+acme@example.com>"), b"250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt(b"<orders+acme@example.com>", sender=b"<>"), b"250 2.1.5 Recipient OK")


class AddressSocketTests(DaemonTestCase):
    """The same through a real socket: postmaster and a quoted local part are stored."""

    @defer.inlineCallbacks
    def test_postmaster_and_quoted_local_part_are_stored(self):
        def transaction(client):
            client.ehlo("customer.test")
            replies = [client.mail("buyer@customer.test")]
            for path in ("<postmaster>", "<postmaster@example.com>", '<"orders+acme"@example.com>'):
                replies.append(client.docmd("RCPT TO:" + path))
            replies.append(client.docmd("RCPT TO:<orders+acme@[127.0.0.1]>"))
            replies.append(client.data(message()))
            return replies

        replies = yield self.daemon.smtp(transaction)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 250, 550, 250])
        self.assertTrue(replies[4][1].startswith(b"5.7.1 Relaying denied"), replies[4])
        messages = yield self.daemon.store.list_messages()
        by_org = {m["org_slug"]: m for m in messages}
        self.assertEqual(set(by_org), {POSTMASTER_SLUG, "acme"})
        self.assertEqual(by_org[POSTMASTER_SLUG]["rcpt_to"], "postmaster@mx.test, postmaster@example.com")
        self.assertEqual(by_org["acme"]["rcpt_to"], '"orders+acme"@example.com')


class HostileSubjectTests(DaemonTestCase):
    """Issue 11: a crafted Subject froze every session and /healthz for 40 s."""

    overrides = {"http": "tcp:0:interface=127.0.0.1"}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        ops_port = self.daemon.service.ops_listener.port.getHost().port
        self.healthz = f"http://127.0.0.1:{ops_port}/healthz"

    @defer.inlineCallbacks
    def test_crafted_subject_answered_while_healthz_keeps_answering(self):
        subject = "=?a?q?x" * 18432
        body = f"From: a@customer.test\r\nSubject: {subject}\r\n {subject}\r\n\r\nbody\r\n".encode()
        sending = threading.Event()
        latencies = []

        def poll_healthz():
            """From the start of DATA until the reply, and at least once (after one unmeasured warm-up)."""
            urllib.request.urlopen(self.healthz, timeout=120).close()
            sending.wait(30)
            while True:
                started = time.monotonic()
                with urllib.request.urlopen(self.healthz, timeout=120) as response:
                    self.assertEqual(response.status, 200)
                latencies.append(time.monotonic() - started)
                if not sending.is_set():
                    return
                time.sleep(0.005)

        def send(client):
            client.ehlo("customer.test")
            client.mail("a@customer.test")
            client.rcpt("orders+acme@example.com")
            sending.set()
            started = time.monotonic()
            try:
                return client.data(body), time.monotonic() - started
            finally:
                sending.clear()

        polled = threads.deferToThread(poll_healthz)
        (code, reply), elapsed = yield self.daemon.smtp(send)
        yield polled
        self.assertEqual((code, reply[:24]), (250, b"2.0.0 Ok: stored as mess"))
        [row] = yield self.daemon.store.list_messages()
        self.assertEqual(len(row["subject"]), 998)
        # On main: the reply after about 40 s, /healthz as long.
        self.assertLess(elapsed, 1.0)
        self.assertTrue(latencies)
        # The bound of the issue (100 ms) on the typical poll; a poll delayed by
        # a loaded test machine may take longer, never the 40 s of the bug.
        self.assertLess(sorted(latencies)[len(latencies) // 2], 0.1, latencies)
        self.assertLess(max(latencies), 0.25, latencies)


def lf_message(size: int, header: bytes = b"From: a@customer.test\nSubject: bare LF order\nMessage-ID: <lf@customer.test>\n\n") -> bytes:
    """A message of C{size} bytes with bare LF line ends and no dot at a line start."""
    line = b"x" * 63 + b"\n"
    body = line * ((size - len(header)) // len(line))
    return header + body + b"y" * (size - len(header) - len(body))


class BareLineEndTests(DaemonTestCase):
    """Issue 12: bare-LF messages over 256 KiB were refused as "Header section too large"."""

    def send_raw(self, data: bytes) -> defer.Deferred:
        def run():
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"HELO customer.test\r\nMAIL FROM:<a@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n")
                for _ in range(4):
                    f.readline()
                s.sendall(data + b"\r\n.\r\n")
                return f.readline()

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_large_lf_only_message(self):
        data = lf_message(284048)
        self.assertEqual(len(data), 284048)
        reply = yield self.send_raw(data)
        self.assertTrue(reply.startswith(b"250 2.0.0"), reply)
        [row] = yield self.daemon.store.list_messages()
        self.assertEqual((row["subject"], row["source_message_id"]), ("bare LF order", "<lf@customer.test>"))

    @defer.inlineCallbacks
    def test_crlf_headers_ended_by_an_lf_blank_line(self):
        data = lf_message(300000, b"Subject: mixed\r\nMessage-ID: <mixed@customer.test>\r\n\n")
        reply = yield self.send_raw(data)
        self.assertTrue(reply.startswith(b"250 2.0.0"), reply)
        [row] = yield self.daemon.store.list_messages()
        self.assertEqual((row["subject"], row["source_message_id"]), ("mixed", "<mixed@customer.test>"))
