"""
Sender checks end to end: a daemon on 127.0.0.1 whose parser workers ask a
real DNS server (Twisted Names, L{tests.sender_zone}) through
C{--dns-resolver}; verdicts recorded after the 250, a sender policy
quarantining a message, and the admin command releasing it.
"""

import json
import re
import time
from email.message import EmailMessage

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests import sender_zone
from tests.daemon import RunningDaemon, mailingest_cli, temp_dir
from tests.dns_server import DnsServer
from tests.sender_zone import signed


def order(from_domain: str = "sender.example", signer: str | None = None, extra_tags: dict[str, str] | None = None) -> bytes:
    """A purchase order with one CSV attachment, signed by C{signer} (default the From: domain)."""
    mail = EmailMessage()
    mail["From"] = f"Buyer <buyer@{from_domain}>"
    mail["To"] = "orders+acme@example.com"
    mail["Subject"] = "Order 7"
    mail["Message-ID"] = f"<order-7@{from_domain}>"
    mail.set_content("Please find our order.\n")
    mail.add_attachment(b"item,qty\nwidget,12\n", maintype="text", subtype="csv", filename="order.csv")
    text = mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))
    return signed(text, domain=signer or from_domain, extra_tags=extra_tags)


class SenderChecksTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DnsServer(sender_zone.zone(silent=["quiet.example", "_dmarc.quiet.example", "sel._domainkey.quiet.example"]))
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.directory = temp_dir(self)
        self.daemon = RunningDaemon(self.directory, dns_resolver=self.dns.spec, dns_budget="1")
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        yield self.daemon.store.add_org("acme", "Acme Corp")

    @defer.inlineCallbacks
    def deliver(self, text: bytes, mail_from: str = "bounce@sender.example") -> dict:
        code, reply = yield self.daemon.send(text, ["orders+acme@example.com"], mail_from=mail_from)
        self.assertEqual(code, 250, reply)
        message_id = int(reply.decode().rsplit(" ", 1)[1])
        return (yield self.daemon.settled(message_id))

    def cli(self, *args: str) -> defer.Deferred:
        database = "--database=" + self.daemon.settings.database
        storage = "--storage=" + self.daemon.settings.storage
        return threads.deferToThread(mailingest_cli, self.directory, database, storage, *args)

    @defer.inlineCallbacks
    def test_verdicts_recorded_with_the_smtp_facts(self):
        row = yield self.deliver(order())
        self.assertEqual(row["status"], "parsed")
        self.assertEqual(
            (row["client_ip"], row["helo"], row["tls"]), ("127.0.0.1", "customer.test", None)
        )
        self.assertEqual(
            (row["spf"], row["spf_domain"], row["dkim"], row["dkim_domain"], row["dmarc"], row["dmarc_domain"], row["arc"]),
            ("pass", "sender.example", "pass", "sender.example", "pass", "sender.example", "none"),
        )
        self.assertEqual(row["dmarc_policy"], "reject")
        self.assertTrue(row["authentication_results"].startswith("mx.test; spf=pass smtp.mailfrom=bounce@sender.example;"))
        raw = yield self.cli("messages", "raw", str(row["id"]))
        self.assertNotIn(b"Authentication-Results", raw.stdout, "the stored raw message is not changed")
        shown = yield self.cli("messages", "show", str(row["id"]))
        self.assertIn(b"dmarc:", shown.stdout)
        self.assertIn(b"authentication_results: mx.test; spf=pass", shown.stdout)

    @defer.inlineCallbacks
    def test_dns_never_answering_gives_temperror_and_the_worker_stays_healthy(self):
        slow = yield self.deliver(order("quiet.example"), mail_from="b@quiet.example")
        self.assertEqual((slow["status"], slow["spf"], slow["dkim"], slow["dmarc"]), ("parsed", "temperror", "temperror", "temperror"))
        after = yield self.deliver(order())
        self.assertEqual((after["status"], after["dmarc"]), ("parsed", "pass"))

    @defer.inlineCallbacks
    def test_quarantined_message_released_and_extracted_once(self):
        policy = yield self.cli("org", "policy", "acme", "--allow-domain", "customer.example", "--require", "dmarc")
        self.assertEqual(policy.returncode, 0, policy.stderr)
        self.assertIn(b"from: customer.example; require: dmarc", policy.stdout)
        row = yield self.deliver(order())
        self.assertEqual(row["status"], "quarantined")
        self.assertEqual(row["quarantine_reason"], "From: domain sender.example is not allowed (allowed: customer.example)")
        self.assertEqual(row["dmarc"], "pass", "verdicts are kept with the quarantine")
        self.assertEqual((yield self.daemon.store.list_documents(message_id=row["id"])), [])
        listed = yield self.cli("messages", "list", "--status", "quarantined")
        self.assertIn(b"From: domain sender.example is not allowed", listed.stdout)
        released = yield self.cli("release", str(row["id"]))
        self.assertEqual(released.returncode, 0, released.stderr)
        self.assertIn(f"released message {row['id']}".encode(), released.stdout)
        row = yield self.daemon.settled(row["id"])
        self.assertEqual(row["status"], "parsed")
        documents = yield self.daemon.store.list_documents(message_id=row["id"])
        self.assertEqual([d["filename"] for d in documents], ["order.csv"])
        again = yield self.cli("release", str(row["id"]))
        self.assertEqual(again.returncode, 1)
        self.assertIn(b"is parsed, not quarantined", again.stderr)
        shown = yield self.cli("messages", "show", "--json", str(row["id"]))
        self.assertEqual(len(json.loads(shown.stdout)["documents"]), 1)

    @defer.inlineCallbacks
    def test_forged_signing_domain_in_an_extra_tag_is_quarantined(self):
        """
        The attacker signs with their own key (d=attacker.example) and adds a
        signed tag D=customer.example, which DKIM does not read (tag names are
        case-sensitive): the verified domain is attacker.example, so DMARC
        for customer.example fails.
        """
        policy = yield self.cli("org", "policy", "acme", "--allow-domain", "customer.example", "--require", "dmarc")
        self.assertEqual(policy.returncode, 0, policy.stderr)
        forged = order("customer.example", signer="attacker.example", extra_tags={"D": "customer.example"})
        self.assertIn(b"D=customer.example", forged)
        row = yield self.deliver(forged, mail_from="bounce@attacker.example")
        results = row["authentication_results"]
        self.assertEqual(row["status"], "quarantined", results)
        self.assertEqual((row["dkim"], row["dkim_domain"], row["dmarc"]), ("pass", "attacker.example", "fail"))
        self.assertIn("dkim=pass header.d=attacker.example header.s=sel;", results)
        self.assertIn("dmarc=fail", results)
        self.assertNotIn("customer.example;", results.split("dmarc=")[0])
        self.assertEqual(row["quarantine_reason"], "DMARC did not pass (dmarc=fail: no aligned SPF or DKIM pass)")
        genuine = yield self.deliver(order("customer.example"), mail_from="bounce@attacker.example")
        self.assertEqual((genuine["status"], genuine["dkim_domain"]), ("parsed", "customer.example"), "the customer's own signature passes")

    @defer.inlineCallbacks
    def test_default_policy_quarantines_nothing(self):
        row = yield self.deliver(order("quiet.example"), mail_from="b@quiet.example")
        self.assertEqual(row["status"], "parsed")


class SilentDnsFairnessTests(unittest.TestCase):
    """One organisation's mail from a domain whose DNS never answers does not hold up another's."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DnsServer(sender_zone.zone(silent_zones=["silent.example"]))
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.daemon = RunningDaemon(temp_dir(self), dns_resolver=self.dns.spec, dns_budget="5")
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        yield self.daemon.store.add_org("acme", "Acme Corp")
        yield self.daemon.store.add_org("globex", "Globex")

    def flood(self, client, first: int, step: int, count: int) -> list[int]:
        """Mails from a@yN.silent.example to acme on one connection; their message ids."""
        client.ehlo("customer.test")
        ids = []
        for n in range(first, count, step):
            mail_from = f"a@y{n}.silent.example"
            text = f"From: {mail_from}\r\nTo: orders+acme@example.com\r\nSubject: {n}\r\nMessage-ID: <s{n}@x>\r\n\r\nhi\r\n"
            client.sendmail(mail_from, ["orders+acme@example.com"], text)
            ids.append(n)
        return ids

    @defer.inlineCallbacks
    def test_other_organisation_parsed_within_5_seconds(self):
        yield defer.gatherResults([self.daemon.smtp(self.flood, n, 6, 60) for n in range(6)])
        text = order().replace(b"orders+acme@", b"orders+globex@")
        code, reply = yield self.daemon.send(text, ["orders+globex@example.com"], mail_from="bounce@sender.example")
        replied = time.monotonic()
        self.assertEqual(code, 250, reply)
        message_id = int(reply.decode().rsplit(" ", 1)[1])
        row = yield self.daemon.settled(message_id, timeout=30)
        waited = time.monotonic() - replied
        self.assertEqual((row["status"], row["dmarc"]), ("parsed", "pass"))
        self.assertLess(waited, 5.0, f"parsed {waited:.1f} s after its 250")
        flooded = yield self.daemon.store.count_messages("received")
        self.assertGreater(flooded, 40, "the silent domain's mails were still waiting on their DNS")
        asked = [name for name, _ in self.dns.zone.asked if name.endswith(".silent.example")]
        self.assertTrue(asked, "the silent zone was asked")


class CraftedSignatureFairnessTests(unittest.TestCase):
    """A sender's crafted signatures to several organisations do not hold up another organisation's checks."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DnsServer(sender_zone.zone())
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.daemon = RunningDaemon(temp_dir(self), dns_resolver=self.dns.spec, dns_budget="5")
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        for n in range(4):
            yield self.daemon.store.add_org(f"crafted{n}", f"Crafted {n}")
        yield self.daemon.store.add_org("globex", "Globex")

    @staticmethod
    def crafted() -> bytes:
        """
        Signed by sender.example (its key is published, the body hash right),
        the h= listing 35,000 names no field has, over 990 fields (within the
        1,000 read): dkimpy's own header selection walked all the fields for
        each name, seconds of the shared check process.
        """
        text = signed(sender_zone.message(extra=b"a:\r\n" * 985))
        names = b":\r\n ".join(b":".join(b"x%d" % i for i in range(n, n + 10)) for n in range(0, 35000, 10))
        crafted = re.sub(rb"([;\s])h=[^;]*;", rb"\1h=" + names + b";", text, count=1)
        assert b"h=x0:x1:" in crafted and len(crafted) < 250 * 1024
        return crafted

    def send_crafted(self, client, text: bytes, first: int) -> list[int]:
        client.ehlo("customer.test")
        ids = []
        for n in range(first, 16, 4):
            client.mail("bounce@sender.example")
            client.rcpt(f"orders+crafted{n % 4}@example.com")
            code, reply = client.data(text)
            assert code == 250, (code, reply)
            ids.append(int(reply.decode().rsplit(" ", 1)[1]))
        return ids

    @defer.inlineCallbacks
    def test_other_organisation_checked_while_crafted_ones_are(self):
        text = self.crafted()
        sent = yield defer.gatherResults([self.daemon.smtp(self.send_crafted, text, n) for n in range(4)])
        crafted_ids = [i for ids in sent for i in ids]
        self.assertEqual(len(crafted_ids), 16)
        code, reply = yield self.daemon.send(
            order().replace(b"orders+acme@", b"orders+globex@"), ["orders+globex@example.com"], mail_from="bounce@sender.example"
        )
        replied = time.monotonic()
        self.assertEqual(code, 250, reply)
        row = yield self.daemon.settled(int(reply.decode().rsplit(" ", 1)[1]), timeout=30)
        waited = time.monotonic() - replied
        self.assertEqual((row["status"], row["dmarc"]), ("parsed", "pass"))
        self.assertLess(waited, 5.0, f"parsed {waited:.1f} s after its 250")
        rows = yield defer.gatherResults([self.daemon.settled(i, timeout=30) for i in crafted_ids])
        self.assertEqual({(r["status"], r["dkim"]) for r in rows}, {("parsed", "fail")}, "each crafted one was checked")

    test_other_organisation_checked_while_crafted_ones_are.timeout = 120
