"""
Custom domains (issue 27): one stored form per domain, the proof state
machine on a clock, routing at the SMTP dialogue (on a StringTransport), and
end to end: a daemon on 127.0.0.1 and the admin command checking a real DNS
server (Twisted Names, as the sender check tests use) through --dns-resolver.
"""

import unicodedata
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, task, threads
from twisted.names import dns
from twisted.trial import unittest

from mailingest.delivery.domains import BadDomain, domain_key, recipient_domain_key, shown_domain
from mailingest.smtp import replies as smtp_replies
from mailingest.verification.domain_checker import DomainChecker
from mailingest.verification.domain_proof import Evidence, look_up, mail_targets, next_state
from tests.daemon import RunningDaemon, mailingest_cli, poll, temp_dir
from tests.dns_server import DnsServer, Zone
from tests.test_smtp_protocol import Server, rejected

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
GRACE = 3600.0


class DomainKeyTests(unittest.SynchronousTestCase):
    def test_every_form_of_a_domain_is_one_key(self):
        forms = [
            "bücher.example", "Bücher.Example.", "BÜCHER.EXAMPLE", "xn--bcher-kva.example", "XN--BCHER-KVA.example.",
            unicodedata.normalize("NFD", "bücher.example"), "ｂücher.example", "bücher\u3002example",
        ]
        self.assertEqual({domain_key(form) for form in forms}, {"xn--bcher-kva.example"})
        self.assertEqual({recipient_domain_key(form) for form in forms}, {"xn--bcher-kva.example"})
        self.assertEqual(shown_domain("xn--bcher-kva.example"), "bücher.example")

    def test_what_is_no_domain(self):
        for text in ("[192.0.2.1]", "[IPv6:2001:db8::1]", "localhost", "a..example", "xn--zz.example", "-a.example", "a_b.example", "", "a" * 64 + ".example"):
            self.assertRaises(BadDomain, domain_key, text)
        self.assertIsNone(recipient_domain_key("[192.0.2.1]"))


class ProofTests(unittest.SynchronousTestCase):
    def test_pending_until_txt_and_mx(self):
        self.assertEqual(next_state("pending", None, Evidence(True, False, "MX"), T0, GRACE).status, "pending")
        self.assertEqual(next_state("pending", None, Evidence(False, True, "TXT"), T0, GRACE).status, "pending")
        self.assertEqual(next_state("pending", None, Evidence(None, None, "timeout"), T0, GRACE).status, "pending")
        verified = next_state("pending", None, Evidence(True, True), T0, GRACE)
        self.assertEqual((verified.status, verified.next_check_at), ("verified", T0 + timedelta(days=1)))

    def test_a_missing_txt_record_suspends_after_the_grace_period_only(self):
        first = next_state("verified", None, Evidence(False, True, "no TXT"), T0, GRACE)
        self.assertEqual((first.status, first.txt_missing_since), ("verified", T0))
        self.assertLessEqual(first.next_check_at, T0 + timedelta(seconds=GRACE))
        # DNS failing says nothing: no change, not even to when it went missing.
        failing = next_state("verified", T0, Evidence(None, None, "timeout"), T0 + timedelta(seconds=GRACE * 2), GRACE)
        self.assertEqual((failing.status, failing.txt_missing_since), ("verified", T0))
        almost = next_state("verified", T0, Evidence(False, True), T0 + timedelta(seconds=GRACE - 1), GRACE)
        self.assertEqual(almost.status, "verified")
        gone = next_state("verified", T0, Evidence(False, True), T0 + timedelta(seconds=GRACE), GRACE)
        self.assertEqual(gone.status, "suspended")
        back = next_state("verified", T0, Evidence(True, True), T0 + timedelta(seconds=GRACE - 1), GRACE)
        self.assertEqual((back.status, back.txt_missing_since), ("verified", None))
        again = next_state("suspended", T0, Evidence(True, True), T0 + timedelta(days=9), GRACE)
        self.assertEqual(again.status, "verified")


class _DueDomains:
    """The two calls of IDomainStore the checker's loop makes, with C{count} pending domains due."""

    def __init__(self, count: int):
        self.due = [
            {"domain": f"d{n}.example", "token": "t", "status": "pending", "txt_missing_since": None, "org_slug": "acme"}
            for n in range(count)
        ]
        self.recorded: list[str] = []

    def due_domains(self, now, limit):
        return defer.succeed(self.due[:limit])

    def record_check(self, domain, status, next_check_at, error, txt_missing_since):
        self.recorded.append(domain)
        return defer.succeed({"domain": domain, "status": status})


class CheckerLoopTests(unittest.TestCase):
    def test_stop_waits_for_the_checks_in_hand_and_starts_no_other(self):
        store, asked = _DueDomains(6), []

        def look(domain, token):
            asked.append(defer.Deferred())
            return asked[-1]

        checker = DomainChecker(store, mail_targets("mx.test", ()), None, 2.0, task.Clock(), look=look)
        checker.startService()
        self.assertEqual(len(asked), 4)
        stopped = checker.stopService()
        self.assertNoResult(stopped)
        for d in asked[:4]:
            d.callback(Evidence(False, False, "none yet"))
        self.successResultOf(stopped)
        self.assertEqual((len(asked), store.recorded), (4, [f"d{n}.example" for n in range(4)]))

    def test_a_failed_round_is_logged_and_the_next_one_runs(self):
        store, clock = _DueDomains(1), task.Clock()
        failing = [defer.fail(RuntimeError("database gone"))]
        store.due_domains = lambda now, limit: failing.pop() if failing else defer.succeed([])
        checker = DomainChecker(store, mail_targets("mx.test", ()), None, 2.0, clock, interval=60, look=lambda d, t: None)
        checker.startService()
        self.addCleanup(checker.stopService)
        clock.advance(60)
        self.assertEqual(failing, [])
        self.assertTrue(checker._loop.running)


def verified(domain: str, org_id: int, slug: str, local_parts=()) -> dict:
    return {"domain": domain, "org_id": org_id, "slug": slug, "local_parts": list(local_parts)}


class RoutingTests(unittest.TestCase):
    """RCPT at verified domains, on a StringTransport (L{tests.test_smtp_protocol.Server})."""

    def setUp(self):
        self.server = Server(self)
        self.server.store.orgs["_postmaster"] = 0
        self.domains = [
            verified("acme-corp.example", 1, "acme"),
            verified("beta.example", 2, "beta", ["orders", "invoices"]),
            verified("xn--bcher-kva.example", 2, "beta"),
        ]
        self.server.store.routed_domains = lambda known=None: defer.succeed((1, self.domains))
        self.successResultOf(self.server.ingest.directory.refresh())
        self.session = self.server.connect()
        self.session.command(b"EHLO customer.test")
        self.session.command(b"MAIL FROM:<buyer@customer.test> SMTPUTF8")

    def rcpt(self, address: bytes) -> bytes:
        return self.session.command(b"RCPT TO:<" + address + b">")

    def routed(self) -> list:
        return [(r.slug, r.address, r.domain) for r in self.session.protocol.transaction.delivery.transaction.envelope.recipients]

    def test_any_local_part_or_the_listed_ones(self):
        for address in (b"orders@acme-corp.example", b"Anything.Else@ACME-CORP.example", b'"quoted name"@acme-corp.example'):
            self.assertTrue(self.rcpt(address).startswith(b"250 2.1.5"), address)
        self.assertTrue(self.rcpt(b"Invoices@beta.example").startswith(b"250 2.1.5"))
        self.assertTrue(self.rcpt(b"orders+2024@beta.example").startswith(b"250 2.1.5"))
        self.assertEqual(self.rcpt(b"sales@beta.example"), b"550 5.1.1 No such recipient")

    def test_the_domain_decides_never_a_plus_tag(self):
        self.assertTrue(self.rcpt(b"orders+beta@acme-corp.example").startswith(b"250"))
        self.assertTrue(self.rcpt(b"postmaster@acme-corp.example").startswith(b"250"))
        self.assertTrue(self.rcpt(b"orders+acme@example.com").startswith(b"250"))
        open_data = self.session.command(b"DATA")
        self.assertTrue(open_data.startswith(b"354"))
        self.session.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        slugs = sorted((row["org_slug"], row["rcpt_to"], row["rcpt_domain"]) for row in self.server.store.rows)
        self.assertEqual(
            slugs,
            [
                ("_postmaster", "postmaster@acme-corp.example", "acme-corp.example"),
                ("acme", "orders+beta@acme-corp.example, orders+acme@example.com", "acme-corp.example, example.com"),
            ],
        )

    def test_idn_in_every_form(self):
        for address in ("orders@xn--bcher-kva.example", "orders@XN--BCHER-KVA.EXAMPLE", "orders@bücher.example", "orders@BÜCHER.example"):
            self.assertTrue(self.rcpt(address.encode()).startswith(b"250 2.1.5"), address)

    def test_unknown_unverified_and_literal_domains_are_relaying(self):
        for address in (b"orders@pending.example", b"orders@[192.0.2.1]", b"orders@sub.acme-corp.example", b"orders@acme-corp.example.evil"):
            self.assertTrue(self.rcpt(address).startswith(b"550 5.7.1 Relaying denied"), address)

    def test_a_removed_domain_is_refused_after_the_refresh(self):
        self.assertTrue(self.rcpt(b"orders@acme-corp.example").startswith(b"250"))
        self.domains = [d for d in self.domains if d["domain"] != "acme-corp.example"]
        self.server.store.routed_domains = lambda known=None: defer.succeed((2, self.domains))
        self.successResultOf(self.server.ingest.directory.refresh())
        self.assertTrue(self.rcpt(b"orders@acme-corp.example").startswith(b"550 5.7.1"))

    def test_with_the_database_down_the_cache_keeps_routing(self):
        self.server.store.routed_domains = lambda known=None: defer.fail(OSError("database is gone"))
        self.successResultOf(self.server.ingest.directory.refresh())
        self.assertTrue(self.rcpt(b"orders@acme-corp.example").startswith(b"250"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_probing_domains_counts_toward_the_same_limits(self):
        """Guessing domains costs what guessing organisations costs: the error budget, then the per-address cut-off."""
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.0)
        self.patch(smtp_replies, "REFUSED_RECIPIENT_LIMIT", 15)
        cut = rejected("refused_recipients")
        self.session.send(b"".join(b"RCPT TO:<orders@guess%d.example>\r\n" % n for n in range(30)))
        answers = self.session.replies()
        self.assertEqual(sum(r.startswith(b"550 5.7.1") for r in answers), 15)
        self.assertTrue(self.session.closed)
        self.assertEqual(rejected("refused_recipients"), cut + 1)
        later = self.server.connect()
        later.command(b"EHLO customer.test")
        later.command(b"MAIL FROM:<buyer@customer.test>")
        self.assertTrue(later.command(b"RCPT TO:<orders@acme-corp.example>").startswith(b"421 4.7.0"))


def domain_zone(**records) -> Zone:
    """Names under C{example} with TTL 0 records (so a changed record is seen at once)."""
    return Zone({name: list(rs) for name, rs in records.items()})


def txt0(text: str) -> dns.Record_TXT:
    return dns.Record_TXT(text.encode(), ttl=0)


def mx0(host: str) -> dns.Record_MX:
    return dns.Record_MX(10, host.encode(), ttl=0)


class DnsDomainTests(unittest.TestCase):
    """A daemon, the admin command and a real DNS server."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DnsServer(domain_zone())
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.directory = temp_dir(self)
        self.daemon = RunningDaemon(self.directory, dns_resolver=self.dns.spec, dns_budget="2", mx_host=["mx2.test"])
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.acme = (yield self.daemon.store.add_org("acme", "Acme Corp"))["id"]

    def publish(self, name: str, *records) -> None:
        self.dns.zone.records[name.encode()] = list(records)

    def withdraw(self, name: str) -> None:
        self.dns.zone.records.pop(name.encode(), None)

    def cli(self, *args: str) -> defer.Deferred:
        options = ["--database=" + self.daemon.settings.database, "--storage=" + self.daemon.settings.storage]
        return threads.deferToThread(mailingest_cli, self.directory, *options, *args)

    def rcpt(self, address: str) -> defer.Deferred:
        def ask(client):
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            return client.rcpt(address)

        return self.daemon.smtp(ask)

    def accepted_within(self, address: str, seconds: float = 6.0) -> defer.Deferred:
        """
        A change takes effect at the directory's next refresh, every 2 s; the margin is for a loaded,
        shared machine (a refresh meeting a write lock gives way to the next) and for the slower
        replies a client gets after its fifth refused recipient.
        """
        return poll(lambda: self.rcpt(address), lambda answer: answer[0] == 250, seconds, lambda answer: f"{address}: {answer}", 0.25)

    def refused_within(self, address: str, seconds: float = 6.0) -> defer.Deferred:
        return poll(lambda: self.rcpt(address), lambda answer: answer[0] == 550, seconds, lambda answer: f"{address}: {answer}", 0.25)

    @defer.inlineCallbacks
    def test_added_then_verified_by_txt_and_mx_receives_mail(self):
        added = yield self.cli("org", "domain", "add", "acme", "Acme-Corp.example.", "--hostname", "mx.test")
        self.assertEqual(added.returncode, 0, added.stderr)
        out = added.stdout.decode()
        token = next(line.split()[-1] for line in out.splitlines() if line.startswith("token: "))
        self.assertIn(f'_mailingest.acme-corp.example. 3600 IN TXT "mailingest-verification={token}"', out)
        self.assertIn("acme-corp.example. 3600 IN MX 10 mx.test.", out)
        # Pending: refused as any foreign domain.
        code, reply = yield self.rcpt("orders@acme-corp.example")
        self.assertEqual((code, reply[:5]), (550, b"5.7.1"))
        self.publish("_mailingest.acme-corp.example", txt0(f"mailingest-verification={token}"))
        self.publish("acme-corp.example", mx0("elsewhere.example"))
        check = yield self.cli("org", "domain", "verify", "acme-corp.example", "--hostname", "mx.test", "--dns-resolver", self.dns.spec)
        self.assertEqual(check.returncode, 1)
        self.assertIn(b"MX (elsewhere.example) names none of mx.test", check.stdout)
        self.publish("acme-corp.example", mx0("other.example"), mx0("MX2.test."))  # --mx-host
        check = yield self.cli(
            "org", "domain", "verify", "acme-corp.example", "--hostname", "mx.test", "--mx-host", "mx2.test", "--dns-resolver", self.dns.spec
        )
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertIn(b"acme-corp.example of acme: verified", check.stdout)
        yield self.accepted_within("anyone@acme-corp.example")
        code, reply = yield self.daemon.send(b"Subject: order\r\n\r\nwidgets\r\n", ["orders@acme-corp.example", "orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        row = yield self.daemon.store.get_message(int(reply.decode().rsplit(" ", 1)[1]))
        self.assertEqual(
            (row["org_id"], row["rcpt_to"], row["rcpt_domain"]),
            (self.acme, "orders@acme-corp.example, orders+acme@example.com", "acme-corp.example, example.com"),
        )
        listed = yield self.cli("org", "domain", "list", "acme")
        self.assertIn(b"acme-corp.example  acme-corp.example  acme      verified", listed.stdout)
        removed = yield self.cli("org", "domain", "remove", "ACME-CORP.EXAMPLE")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        yield self.refused_within("anyone@acme-corp.example")

    @defer.inlineCallbacks
    def test_idn_added_in_u_labels_receives_mail_at_its_a_labels(self):
        key = "xn--bcher-kva.example"
        row = yield self.daemon.store.add_domain("acme", domain_key("Bücher.example"), "tok-idn", ["orders"])
        self.publish("_mailingest." + key, txt0("mailingest-verification=tok-idn"))
        self.publish(key, mx0("mx.test"))
        checker = DomainChecker(self.daemon.store, mail_targets("mx.test", ()), self.dns.address, 2.0, task.Clock())
        self.assertEqual((yield checker.check(row))["status"], "verified")
        yield self.accepted_within("orders@xn--bcher-kva.example")
        code, _ = yield self.rcpt("sales@xn--bcher-kva.example")
        self.assertEqual(code, 550)
        taken = yield self.cli("org", "add", "globex")
        taken = yield self.cli("org", "domain", "add", "globex", "XN--BCHER-KVA.EXAMPLE.", "--hostname", "mx.test")
        self.assertEqual(taken.returncode, 1)
        self.assertIn(b"already an organisation's", taken.stderr)

    @defer.inlineCallbacks
    def test_txt_removed_suspends_after_the_grace_period(self):
        clock = task.Clock()
        clock.advance(self.daemon.store.clock.seconds())
        row = yield self.daemon.store.add_domain("acme", "acme-corp.example", "tok")
        self.publish("_mailingest.acme-corp.example", txt0("mailingest-verification=tok"))
        self.publish("acme-corp.example", mx0("mx.test"))
        checker = DomainChecker(self.daemon.store, mail_targets("mx.test", ()), self.dns.address, 2.0, clock, grace=GRACE)
        row = yield checker.check(row)
        self.assertEqual(row["status"], "verified")
        yield self.accepted_within("orders@acme-corp.example")
        self.withdraw("_mailingest.acme-corp.example")
        clock.advance(60)
        row = yield checker.check(row)
        self.assertEqual((row["status"], row["txt_missing_since"] is not None), ("verified", True))
        code, _ = yield self.rcpt("orders@acme-corp.example")
        self.assertEqual(code, 250, "still verified during the grace period")
        clock.advance(GRACE)
        row = yield checker.check(row)
        self.assertEqual(row["status"], "suspended")
        self.assertIn("TXT record missing since", row["last_error"])
        yield self.refused_within("orders@acme-corp.example")
        listed = yield self.cli("org", "domain", "list", "--json")
        self.assertIn(b'"status": "suspended"', listed.stdout)

    @defer.inlineCallbacks
    def test_the_forwarding_record_stands_for_the_mx(self):
        self.publish("_mailingest.fwd.example", txt0("mailingest-verification=tok"), txt0("mailingest-route=forward"))
        self.publish("fwd.example", mx0("mx.provider.example"))
        evidence = yield threads.deferToThread(look_up, "fwd.example", "tok", frozenset({"mx.test"}), self.dns.address, 2.0)
        self.assertEqual(evidence, Evidence(True, True, None))
        wrong = yield threads.deferToThread(look_up, "fwd.example", "other", frozenset({"mx.test"}), self.dns.address, 2.0)
        self.assertEqual((wrong.txt, wrong.mx), (False, True))
