"""
The sender checks against a real DNS server on 127.0.0.1 (Twisted Names,
the zone of L{tests.sender_zone}). The checks use blocking DNS, as in the
parser worker, so they run in a thread while the reactor serves the zone.
"""

import io
import json
import re
import time

import dkim

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailingest.extraction import checker
from mailingest.verification.dkim_check import check_arc, check_dkim, read_message
from mailingest.verification.dmarc import check_dmarc, organisational_domain
from mailingest.verification.policy import SenderPolicy, violation
from mailingest.verification.resolver import BudgetResolver, DeadNames, NotCached, parse_resolver_address
from mailingest.verification.results import Check
from mailingest.verification.spf_check import check_spf
from mailingest.verification.verify import verify_message
from tests import sender_zone
from tests.dns_server import DnsServer
from tests.python_steps import python_lines
from tests.sender_zone import GOOD_IP, LOOP_IP, OTHER_IP, PTR_IP, arc_forwarded, message, signed

SILENT = ["quiet.example", "sel._domainkey.quiet.example", "_dmarc.quiet.example"]
SERVFAIL = ["broken.example", "sel._domainkey.broken.example", "_dmarc.broken.example"]


class ZoneTestCase(unittest.TestCase):
    budget = 5.0

    def setUp(self):
        self.server = DnsServer(sender_zone.zone(silent=SILENT, servfail=SERVFAIL))
        self.address = self.server.start()
        self.addCleanup(self.server.stop)

    def resolver(self, budget=None) -> BudgetResolver:
        return BudgetResolver(self.address, self.budget if budget is None else budget)

    def run_check(self, fn, *args, budget=None):
        """C{fn(*args, resolver)} in a thread, so the reactor can answer its lookups."""
        return threads.deferToThread(lambda: fn(*args, self.resolver(budget)))


class SpfTests(ZoneTestCase):
    @defer.inlineCallbacks
    def assertSpf(self, expected, mail_from, ip=GOOD_IP, helo="mx.sender.example", budget=None):
        check = yield self.run_check(check_spf, ip, mail_from, helo, budget=budget)
        self.assertEqual(check.result, expected, check)
        return check

    @defer.inlineCallbacks
    def test_pass(self):
        check = yield self.assertSpf("pass", "buyer@sender.example")
        self.assertEqual(check.domain, "sender.example")

    def test_pass_ipv4_mapped(self):
        return self.assertSpf("pass", "buyer@sender.example", ip="::ffff:127.0.0.1")

    def test_fail(self):
        return self.assertSpf("fail", "buyer@sender.example", ip=OTHER_IP)

    def test_softfail(self):
        return self.assertSpf("softfail", "buyer@soft.example")

    def test_neutral(self):
        return self.assertSpf("neutral", "buyer@neutral.example")

    def test_none(self):
        return self.assertSpf("none", "buyer@nospf.example")

    @defer.inlineCallbacks
    def test_null_sender_checks_helo(self):
        check = yield self.assertSpf("pass", "", helo="helo.sender.example")
        self.assertEqual(check.domain, "helo.sender.example")

    def test_temperror_no_answer(self):
        return self.assertSpf("temperror", "buyer@quiet.example", budget=0.5)

    def test_temperror_servfail(self):
        return self.assertSpf("temperror", "buyer@broken.example")

    def test_permerror_include_loop(self):
        return self.assertSpf("permerror", "buyer@loop.example")

    @defer.inlineCallbacks
    def test_permerror_label_too_long_not_given_to_pyspf(self):
        """pyspf's pattern for a domain's top label is quadratic in a long label: 0.2 s for 4,000 characters."""
        check = yield self.assertSpf("permerror", "buyer@longlabel.example")
        self.assertIn("SPF record of longlabel.example with a label longer than 63 characters", check.note)

    @defer.inlineCallbacks
    def test_permerror_more_than_ten_lookups(self):
        check = yield self.assertSpf("permerror", "buyer@many.example")
        self.assertIn("Too many DNS lookups", check.note)

    def test_no_client_address(self):
        return self.assertSpf("none", "buyer@sender.example", ip="local")

    @defer.inlineCallbacks
    def test_domain_is_the_one_pyspf_checked(self):
        """pyspf checks what follows the first @: that is the domain recorded (and aligned), not the last one."""
        check = yield self.assertSpf("none", "x@nospf.example@sender.example")
        self.assertEqual(check.domain, "nospf.example@sender.example")


class SpfPtrTests(ZoneTestCase):
    """RFC 7208 5.5: DNS errors inside the ptr mechanism skip a name or match nothing; they are no temperror."""

    def setUp(self):
        zones = (
            sender_zone.zone(servfail=["broken.ptr.example"], silent=["quiet.ptr.example"]),
            sender_zone.reverse_zone(servfail=["6.2.0.192.in-addr.arpa"]),
        )
        self.server = DnsServer(*zones)
        self.address = self.server.start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def assertSpf(self, expected, mail_from, ip, budget=None):
        check = yield self.run_check(check_spf, ip, mail_from, "mx.ptr.example", budget=budget)
        self.assertEqual(check.result, expected, check)

    def test_name_whose_address_lookup_fails_is_skipped(self):
        """broken.ptr.example answers SERVFAIL: skipped, and mail.ptr.example, the next PTR name, validates."""
        return self.assertSpf("pass", "b@ptr.example", PTR_IP)

    def test_suite_ptr_cname_loop(self):
        return self.assertSpf("neutral", "postmaster@loop.example.com", LOOP_IP)

    def test_reverse_lookup_failure_matches_nothing(self):
        return self.assertSpf("fail", "b@ptr.example", "192.0.2.6")

    def test_budget_spent_on_a_ptr_name_is_temperror(self):
        return self.assertSpf("temperror", "b@ptr.example", "192.0.2.7", budget=0.5)


class DkimTests(ZoneTestCase):
    @defer.inlineCallbacks
    def assertDkim(self, expected, text, budget=None):
        check, signatures = yield self.run_check(check_dkim, read_message(text), budget=budget)
        self.assertEqual(check.result, expected, (check, signatures))
        return check, signatures

    @defer.inlineCallbacks
    def test_pass(self):
        check, signatures = yield self.assertDkim("pass", signed(message()))
        self.assertEqual(check.domain, "sender.example")
        self.assertEqual([(s.domain, s.selector) for s in signatures], [("sender.example", "sel")])

    def test_fail_body_changed(self):
        text = signed(message()).replace(b"Please", b"Kindly")
        return self.assertDkim("fail", text)

    def test_none_unsigned(self):
        return self.assertDkim("none", message())

    def test_temperror_key_not_answered(self):
        return self.assertDkim("temperror", signed(message(), domain="quiet.example"), budget=0.5)

    def test_temperror_servfail(self):
        return self.assertDkim("temperror", signed(message(), domain="broken.example"))

    def test_permerror_no_key(self):
        return self.assertDkim("permerror", signed(message(), domain="nokey.example"))

    def test_permerror_bad_key(self):
        return self.assertDkim("permerror", signed(message(), domain="badkey.example"))

    @defer.inlineCallbacks
    def test_permerror_absurd_key_record(self):
        check, _ = yield self.assertDkim("permerror", signed(message(), domain="bigkey.example"))
        self.assertIn("larger than", check.note)

    @defer.inlineCallbacks
    def test_fifty_signatures_ten_verified(self):
        """Each signature hashes the body again: only the first ten are verified, the rest noted."""
        text = signed(message())
        for _ in range(50):
            text = signed(text, domain="nokey.example")
        check, signatures = yield self.assertDkim("permerror", text)
        self.assertEqual(len(signatures), 10)
        self.assertIn("41 more signatures not verified (limit 10)", check.note)

    def test_any_pass_wins(self):
        return self.assertDkim("pass", signed(signed(message(), domain="nokey.example")))

    @defer.inlineCallbacks
    def test_signed_tag_D_lends_no_domain(self):
        """Tag names are case-sensitive: dkimpy verifies d=attacker.example, and that is the domain recorded."""
        text = signed(message("customer.example"), domain="attacker.example", extra_tags={"D": "customer.example"})
        check, signatures = yield self.assertDkim("pass", text)
        self.assertEqual(check.domain, "attacker.example")
        self.assertEqual([(s.result, s.domain, s.selector) for s in signatures], [("pass", "attacker.example", "sel")])

    @defer.inlineCallbacks
    def test_repeated_d_tag_is_permerror_without_a_domain(self):
        """
        dkimpy refuses a repeated tag; the signature before it passed, and its
        domain is not carried over to this one.
        """
        bad = signed(message("customer.example"), domain="attacker.example", extra_tags={"d": "customer.example"})
        self.assertEqual(bad.count(b"d=customer.example"), 1)
        check, signatures = yield self.assertDkim("pass", signed(bad))
        self.assertEqual([(s.result, s.domain) for s in signatures], [("pass", "sender.example"), ("permerror", "")])
        self.assertEqual(check.domain, "sender.example")

    @defer.inlineCallbacks
    def test_signature_with_a_long_run_of_spaces_is_not_given_to_dkimpy(self):
        """dkimpy's check of b= takes time quadratic in such a run (200,000 spaces: minutes)."""
        text = re.sub(rb"(\s)b=", rb"\1b=A" + b" " * 200000 + b"!", signed(message()), count=1)
        check, signatures = yield self.assertDkim("permerror", text)
        self.assertEqual(
            [s.note for s in signatures], ["signature not read: a run of more than 64 spaces, line ends or '=' in the field"]
        )

    test_signature_with_a_long_run_of_spaces_is_not_given_to_dkimpy.timeout = 30

    @defer.inlineCallbacks
    def test_unreadable_header_section(self):
        text = signed(message()).replace(b"To: ", b"no colon on this line\r\nTo: ")
        check, signatures = yield self.assertDkim("permerror", text)
        self.assertEqual((check.note, signatures), ("message header cannot be read: not a field: b'no colon on this line'", []))


class ArcTests(ZoneTestCase):
    @defer.inlineCallbacks
    def test_forwarded_with_valid_chain(self):
        text = arc_forwarded(signed(message()))
        arc = yield self.run_check(check_arc, read_message(text))
        self.assertEqual((arc.result, arc.domain), ("pass", "forwarder.example"), arc)
        dkim_check, _ = yield self.run_check(check_dkim, read_message(text))
        self.assertEqual(dkim_check.result, "fail", "the footer broke the original signature")

    @defer.inlineCallbacks
    def test_tampered_chain_fails(self):
        text = arc_forwarded(signed(message())).replace(b"sent through the list", b"sent through a thief")
        arc = yield self.run_check(check_arc, read_message(text))
        self.assertEqual(arc.result, "fail")

    @defer.inlineCallbacks
    def test_none(self):
        arc = yield self.run_check(check_arc, read_message(signed(message())))
        self.assertEqual(arc.result, "none")

    @defer.inlineCallbacks
    def test_set_without_seal_fails(self):
        """RFC 8617 5.2: an ARC-Message-Signature and ARC-Authentication-Results without their ARC-Seal."""
        text = arc_forwarded(signed(message()), seal=False)
        self.assertIn(b"ARC-Message-Signature: i=1", text)
        self.assertIn(b"ARC-Authentication-Results: i=1", text)
        arc = yield self.run_check(check_arc, read_message(text))
        self.assertEqual((arc.result, arc.domain), ("fail", None), arc)
        self.assertIn("Incomplete ARC set", arc.note)

    @defer.inlineCallbacks
    def test_chain_with_a_long_run_of_spaces_is_not_given_to_dkimpy(self):
        text = arc_forwarded(signed(message())).replace(b"ARC-Seal: i=1;", b"ARC-Seal: i=1;" + b" " * 100000, 1)
        self.assertIn(b" " * 100000, text)
        arc = yield self.run_check(check_arc, read_message(text))
        self.assertEqual((arc.result, arc.note), ("fail", "ARC chain not read: a run of more than 64 spaces, line ends or '=' in the field"))

    @defer.inlineCallbacks
    def test_temperror(self):
        text = arc_forwarded(signed(message()), forwarder="quiet.example")
        arc = yield self.run_check(check_arc, read_message(text), budget=0.5)
        self.assertEqual(arc.result, "temperror", arc)


class DmarcTests(ZoneTestCase):
    @defer.inlineCallbacks
    def dmarc(self, text, ip=GOOD_IP, mail_from="bounce@sender.example", budget=None):
        def run(resolver):
            spf = check_spf(ip, mail_from, "mx.sender.example", resolver)
            verifier = read_message(text)
            _, signatures = check_dkim(verifier, resolver)
            return check_dmarc(verifier, spf, signatures, resolver)

        return (yield threads.deferToThread(run, self.resolver(budget)))

    @defer.inlineCallbacks
    def test_pass_aligned_dkim_only(self):
        check, policy = yield self.dmarc(signed(message()), ip=OTHER_IP)
        self.assertEqual((check.result, check.domain, policy), ("pass", "sender.example", "reject"))
        self.assertEqual(check.note, "aligned DKIM pass")

    @defer.inlineCallbacks
    def test_pass_aligned_spf_only(self):
        check, policy = yield self.dmarc(message())
        self.assertEqual((check.result, policy), ("pass", "reject"))
        self.assertEqual(check.note, "aligned SPF pass")

    @defer.inlineCallbacks
    def test_fail_neither_aligned(self):
        """SPF passes for another domain, DKIM signs for another domain: a forged From:."""
        check, policy = yield self.dmarc(signed(message(), domain="forwarder.example"), mail_from="x@strict.example")
        self.assertEqual((check.result, policy), ("fail", "reject"))

    @defer.inlineCallbacks
    def test_subdomain_uses_organisational_record(self):
        check, policy = yield self.dmarc(message(from_domain="orders.sender.example"), ip=OTHER_IP)
        self.assertEqual((check.result, check.domain, policy), ("fail", "orders.sender.example", "quarantine"))

    @defer.inlineCallbacks
    def test_relaxed_alignment_subdomain_passes(self):
        check, _ = yield self.dmarc(message(from_domain="orders.sender.example"))
        self.assertEqual(check.result, "pass")

    @defer.inlineCallbacks
    def test_strict_alignment(self):
        check, _ = yield self.dmarc(message(from_domain="orders.strict.example"), mail_from="b@strict.example")
        self.assertEqual(check.result, "fail")

    @defer.inlineCallbacks
    def test_none_without_record(self):
        check, policy = yield self.dmarc(message(from_domain="nospf.example"))
        self.assertEqual((check.result, policy), ("none", None))

    @defer.inlineCallbacks
    def test_temperror(self):
        check, _ = yield self.dmarc(message(from_domain="quiet.example"), mail_from="b@sender.example", budget=0.5)
        self.assertEqual(check.result, "temperror")

    @defer.inlineCallbacks
    def test_permerror_invalid_policy(self):
        check, _ = yield self.dmarc(message(from_domain="badpolicy.example"))
        self.assertEqual(check.result, "permerror")

    @defer.inlineCallbacks
    def test_permerror_several_from_domains(self):
        text = message(extra=b"From: other@forwarder.example\r\n")
        check, _ = yield self.dmarc(text)
        self.assertEqual((check.result, check.note), ("permerror", "several From: fields"))

    def with_from(self, field: bytes):
        """The DMARC check of the test message with C{field} as its From: line."""
        return self.dmarc(message().replace(b"From: Buyer <buyer@sender.example>", field))

    @defer.inlineCallbacks
    def test_permerror_from_not_an_address(self):
        """A From: a reader could take for sender.example, but that is no address: no guess at its domain."""
        check, policy = yield self.with_from(b"From: Macro Error@sender.example")
        self.assertEqual((check.result, check.domain, policy), ("permerror", None, None))
        self.assertIn("From: field cannot be parsed", check.note)

    @defer.inlineCallbacks
    def test_permerror_absurdly_long_from(self):
        check, _ = yield self.with_from(b"From: Buyer" + b" x" * 1500 + b" <buyer@sender.example>")
        self.assertEqual((check.result, check.note), ("permerror", "From: field longer than 2048 bytes"))

    @defer.inlineCallbacks
    def test_folded_from_with_a_display_name_holding_an_address(self):
        check, _ = yield self.with_from(b'From: "buyer@customer.example"\r\n <buyer@sender.example>')
        self.assertEqual((check.result, check.domain), ("pass", "sender.example"))

    @defer.inlineCallbacks
    def test_8bit_display_name_leaves_the_address_certain(self):
        check, _ = yield self.with_from(b"From: M\xfcller \x01 <buyer@sender.example>")
        self.assertEqual((check.result, check.domain), ("pass", "sender.example"))
        check, _ = yield self.with_from(b"From: buyer@sender\xfc.example")
        self.assertEqual((check.result, check.note), ("permerror", "From: address without a domain name"))

    @defer.inlineCallbacks
    def test_permerror_unreadable_header_section(self):
        check, _ = yield self.dmarc(message(extra=b"no colon on this line\r\n"))
        self.assertEqual((check.result, check.note), ("permerror", "message header cannot be read: not a field: b'no colon on this line'"))

    def test_organisational_domain(self):
        self.assertEqual(organisational_domain("mail.customer.co.uk"), "customer.co.uk")
        self.assertEqual(organisational_domain("a.b.sender.example"), "sender.example")


class VerifyMessageTests(ZoneTestCase):
    def verify(self, text: bytes, mail_from: str):
        """All the checks of C{text} from GOOD_IP, in a thread."""
        return threads.deferToThread(verify_message, text, GOOD_IP, "mx", mail_from, "mx.ingest.test", self.address, 5.0)

    @defer.inlineCallbacks
    def test_authentication_results(self):
        verdicts = yield self.verify(signed(message()), "bounce@sender.example")
        self.assertEqual(
            verdicts.authentication_results,
            "mx.ingest.test; spf=pass smtp.mailfrom=bounce@sender.example;"
            " dkim=pass header.d=sender.example header.s=sel;"
            " dmarc=pass reason=\"aligned DKIM pass\" header.from=sender.example policy.dmarc=reject; arc=none",
        )
        self.assertEqual(verdicts.header_from, "sender.example")

    @defer.inlineCallbacks
    def test_server_never_answers_whole_message_bounded(self):
        """Every check of a message whose DNS never answers: temperror, within the one budget."""
        text = signed(message(from_domain="quiet.example"), domain="quiet.example")
        verdicts = yield threads.deferToThread(
            verify_message, text, GOOD_IP, "mx", "b@quiet.example", "mx.ingest.test", self.address, 0.5
        )
        self.assertEqual(
            [verdicts.spf.result, verdicts.dkim.result, verdicts.dmarc.result], ["temperror"] * 3
        )

    @defer.inlineCallbacks
    def test_forged_domain_in_extra_tag(self):
        text = signed(message("customer.example"), domain="attacker.example", extra_tags={"D": "customer.example"})
        verdicts = yield self.verify(text, "bounce@attacker.example")
        self.assertEqual(
            verdicts.authentication_results,
            "mx.ingest.test; spf=none smtp.mailfrom=bounce@attacker.example;"
            " dkim=pass header.d=attacker.example header.s=sel;"
            ' dmarc=fail reason="no aligned SPF or DKIM pass" header.from=customer.example policy.dmarc=reject; arc=none',
        )

    @defer.inlineCallbacks
    def test_arc_chain_read_when_its_fields_are_there(self):
        verdicts = yield self.verify(arc_forwarded(signed(message())), "bounce@sender.example")
        self.assertEqual((verdicts.arc.result, verdicts.arc.domain), ("pass", "forwarder.example"))

    @defer.inlineCallbacks
    def test_without_arc_fields_the_message_is_not_read_again(self):
        """Issue 29: dkimpy's header list says there is no chain; its ARC reader is not asked to parse the message too."""
        def no_second_reading(*args, **kwargs):
            raise AssertionError("the message was read again for ARC")

        self.patch(dkim, "ARC", no_second_reading)
        verdicts = yield self.verify(signed(message()), "bounce@sender.example")
        self.assertEqual((verdicts.arc.result, verdicts.dkim.result), ("none", "pass"))

    @defer.inlineCallbacks
    def test_crafted_signature_costs_what_the_message_is_long(self):
        """
        A signature whose h= lists 300 names no field has, over 300 fields:
        dkimpy walked every field for each name (90,000 steps of Python);
        the checks' steps follow the message's length instead.
        """
        names = b":".join(b"x%d" % i for i in range(300))
        text = signed(message(extra=b"a: b\r\n" * 300))
        text = re.sub(rb"h=from : to :\r\n subject : message-id;", b"h=" + names + b";", text)
        self.assertIn(b"h=x0:x1:", text)

        verdicts, lines = yield threads.deferToThread(
            python_lines, verify_message, text, GOOD_IP, "mx", "b@sender.example", "mx.ingest.test", self.address, 5.0
        )
        self.assertEqual(verdicts.dkim.result, "fail", "the body hash was right: the fields were hashed")
        self.assertLess(lines, 30000)

    def test_hostile_domains_kept_out_of_header_syntax(self):
        text = signed(message())
        text = text.replace(b"d=sender.example", b"d=evil; dmarc=pass")
        verdicts = verify_message(text, None, "", "", "mx", ("127.0.0.1", 9), 0.01)
        self.assertNotIn("dmarc=pass", verdicts.authentication_results.split("dkim=")[1].split(";")[0])


class CachedOnlyTests(ZoneTestCase):
    """Issue 29: a check from the DNS cache alone asks no server, and says so when the cache lacks an answer."""

    def verify(self, text: bytes, cached_only: bool):
        return threads.deferToThread(
            verify_message, text, GOOD_IP, "mx", "bounce@sender.example", "mx.ingest.test", self.address, 5.0, cached_only
        )

    @defer.inlineCallbacks
    def test_nothing_sent_until_cached_then_the_same_verdicts(self):
        text = signed(message())
        yield self.assertFailure(self.verify(text, True), NotCached)
        self.assertEqual(self.server.zone.asked, [])
        full = yield self.verify(text, False)
        asked = list(self.server.zone.asked)
        self.assertIn(("_dmarc.sender.example", "TXT"), asked)
        cached = yield self.verify(text, True)
        self.assertEqual(cached.as_dict(), full.as_dict())
        self.assertEqual(self.server.zone.asked, asked)

    @defer.inlineCallbacks
    def test_a_cached_nxdomain_is_an_answer(self):
        text = message(from_domain="nowhere.example")
        full = yield threads.deferToThread(
            verify_message, text, GOOD_IP, "mx", "a@nowhere.example", "mx.ingest.test", self.address, 5.0
        )
        asked = list(self.server.zone.asked)
        cached = yield threads.deferToThread(
            verify_message, text, GOOD_IP, "mx", "a@nowhere.example", "mx.ingest.test", self.address, 5.0, True
        )
        self.assertEqual((cached.spf.result, cached.as_dict()), ("none", full.as_dict()))
        self.assertEqual(self.server.zone.asked, asked)


class CheckProcessTests(ZoneTestCase):
    """The sender check process's loop (L{checker.serve}), on pipes of bytes."""

    def request(self, n: int, path: str, mail_from: str) -> bytes:
        facts = {
            "raw_path": path, "client_ip": GOOD_IP, "helo": "mx", "mail_from": mail_from,
            "authserv_id": "mx.ingest.test", "resolver": list(self.address), "budget": 1.0,
        }
        return json.dumps({"id": n, "verify": facts}).encode() + b"\n"

    def path(self, text: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(text)
        return path

    @defer.inlineCallbacks
    def test_a_cached_check_is_not_queued_behind_a_silent_server(self):
        """With its one thread waiting on a silent server, a check whose answers are cached is answered first."""
        known = self.path(message())
        yield threads.deferToThread(checker.verify, json.loads(self.request(0, known, "a@sender.example"))["verify"])
        silent = self.path(message(from_domain="quiet.example"))
        requests = io.BytesIO(self.request(1, silent, "a@quiet.example") + self.request(2, known, "a@sender.example"))
        replies = io.BytesIO()
        yield threads.deferToThread(checker.serve, requests, replies, 1)
        answered = [json.loads(line) for line in replies.getvalue().splitlines()]
        self.assertEqual([reply["id"] for reply in answered], [2, 1])
        self.assertEqual(answered[0]["verdicts"]["spf"]["result"], "pass")
        self.assertEqual(answered[1]["verdicts"]["spf"]["result"], "temperror")

    @defer.inlineCallbacks
    def test_a_large_message_goes_to_a_thread(self):
        """A signed message is checked whole (its body hash): past the size, even a cached check waits for a thread."""
        large = self.path(signed(message(body=b"x" * 100 + b"\r\n" * 1000)))
        facts = json.loads(self.request(0, large, "a@sender.example"))["verify"]
        full = yield threads.deferToThread(checker.verify, facts)
        self.assertEqual(full["verdicts"]["dkim"]["result"], "pass")
        self.patch(checker, "CHECKED_AT_ONCE_BYTES", 1000)
        self.assertIsNone(checker.verify(facts, cached_only=True))
        with open(large, "rb") as raw:
            self.assertIsNone(checker.message_for_checks(raw, 1000))
            self.assertLessEqual(raw.tell(), 1001, "the reading thread read the whole body")


class DeadNamesTests(unittest.TestCase):
    def test_a_name_and_the_names_under_it_for_a_minute(self):
        dead = DeadNames(ttl=60, size=10)
        self.assertIsNone(dead.covering("y1.silent.example", 0))
        dead.add("Y1.silent.example.", 0)
        self.assertEqual(dead.covering("_dmarc.y1.SILENT.example", 59), "y1.silent.example")
        self.assertEqual(dead.covering("y1.silent.example", 59), "y1.silent.example")
        self.assertIsNone(dead.covering("silent.example", 59))
        self.assertIsNone(dead.covering("y1.silent.example", 60))

    def test_bounded(self):
        dead = DeadNames(ttl=60, size=3)
        for n in range(4):
            dead.add(f"y{n}.silent.example", n)
        self.assertIsNone(dead.covering("y0.silent.example", 5))
        self.assertEqual([dead.covering(f"y{n}.silent.example", 5) for n in (1, 2, 3)],
                         [f"y{n}.silent.example" for n in (1, 2, 3)])


class SilentDomainTests(unittest.TestCase):
    """A domain whose nameservers never answer costs the DNS budget once, not once per message."""

    def setUp(self):
        self.zone = sender_zone.zone(silent_zones=["silent.example"])
        self.server = DnsServer(self.zone)
        self.address = self.server.start()
        self.addCleanup(self.server.stop)

    def check(self, domain: str):
        text = message(from_domain=domain)
        started = time.monotonic()
        d = threads.deferToThread(
            verify_message, text, GOOD_IP, "mx", f"a@{domain}", "mx.ingest.test", self.address, 1.0
        )
        return d.addCallback(lambda verdicts: (verdicts, time.monotonic() - started))

    def asked_under(self, domain: str) -> list:
        return [name for name, _ in self.zone.asked if name == domain or name.endswith("." + domain)]

    @defer.inlineCallbacks
    def test_second_message_asks_nothing(self):
        first, first_seconds = yield self.check("y1.silent.example")
        self.assertEqual([first.spf.result, first.dmarc.result], ["temperror", "temperror"])
        self.assertGreaterEqual(first_seconds, 0.9)
        asked = self.asked_under("y1.silent.example")
        self.assertIn("y1.silent.example", asked)
        second, second_seconds = yield self.check("y1.silent.example")
        self.assertEqual([second.spf.result, second.dmarc.result], ["temperror", "temperror"])
        self.assertLess(second_seconds, 0.5)
        self.assertEqual(self.asked_under("y1.silent.example"), asked)
        # Another domain of the same server is asked as before.
        other, _ = yield self.check("sender.example")
        self.assertEqual(other.spf.result, "pass")


class AuthenticationResultsTests(unittest.TestCase):
    """Every property value is an RFC 8601 token, a plain local@domain or a quoted string with the original characters."""

    def header(self, **fields) -> str:
        from mailingest.verification.results import Verdicts, authentication_results

        base = dict(spf=Check("none"), dkim=Check("none"), dmarc=Check("none"), arc=Check("none"))
        base.update(fields)
        return authentication_results("mx.test", Verdicts(**base))

    def test_helo_address_literal_quoted(self):
        header = self.header(helo="[1.2.3.5]")
        self.assertIn('spf=none smtp.helo="[1.2.3.5]";', header)

    def test_mail_from_with_a_space_quoted(self):
        header = self.header(mail_from="Macro Error@e8.example.com")
        self.assertIn('smtp.mailfrom="Macro Error@e8.example.com";', header)

    def test_plain_address_and_domain_as_they_are(self):
        header = self.header(mail_from="a.b+c@e8.example.com", header_from="e8.example.com", dmarc=Check("none", "e8.example.com"))
        self.assertIn("smtp.mailfrom=a.b+c@e8.example.com;", header)
        self.assertIn("header.from=e8.example.com;", header)

    def test_values_cannot_add_results(self):
        from mailingest.verification.results import Signature

        header = self.header(
            mail_from='x@y.example; dkim=pass header.d="customer.example"',
            spf=Check("fail", None, "see postmaster@y.example; dmarc=pass"),
            signatures=[Signature("fail", "evil.example;dkim=pass", 'a"b\\c', "")],
            dkim=Check("fail"),
        )
        self.assertEqual(
            header,
            'mx.test; spf=fail reason="see postmaster@y.example; dmarc=pass"'
            ' smtp.mailfrom="x@y.example; dkim=pass header.d=\\"customer.example\\"";'
            ' dkim=fail header.d="evil.example;dkim=pass" header.s="a\\"b\\\\c"; dmarc=none; arc=none',
        )


class VerdictsFormTests(unittest.TestCase):
    """The verdicts' JSON form (the check process's reply, the stored row): every field, and back."""

    def test_as_dict_is_every_field_and_reads_back(self):
        import dataclasses

        from mailingest.verification.results import Signature, Verdicts

        verdicts = Verdicts(
            spf=Check("pass", "e8.example.com", "ok"), dkim=Check("fail", "x.example"), dmarc=Check("none"),
            arc=Check("temperror", None, "timeout"), signatures=[Signature("fail", "x.example", "s1", "bad")],
            mail_from="a@e8.example.com", helo="mx.e8.example.com", header_from="e8.example.com",
            dmarc_policy="reject", authentication_results="mx.test; spf=pass",
        )
        form = verdicts.as_dict()
        self.assertEqual(form, dataclasses.asdict(verdicts))
        self.assertEqual(json.loads(json.dumps(form)), form)
        self.assertEqual(Verdicts.from_dict(form), verdicts)
        form["signatures"][0]["note"] = "changed"
        self.assertEqual(verdicts.signatures[0].note, "bad", "the form is a copy, not the verdicts' own objects")


class PolicyTests(unittest.TestCase):
    def verdicts(self, **checks):
        from mailingest.verification.results import Signature, Verdicts

        base = dict(spf=Check("none"), dkim=Check("none"), dmarc=Check("none"), arc=Check("none"))
        base.update(checks)
        signatures = [Signature("pass", checks["dkim"].domain, "s")] if "dkim" in checks and checks["dkim"].result == "pass" else []
        return Verdicts(**base, signatures=signatures, header_from="customer.example")

    def test_default_allows_everything(self):
        self.assertTrue(SenderPolicy().is_default)
        self.assertIsNone(violation(SenderPolicy(), self.verdicts()))

    def test_domain_not_allowed(self):
        kind, reason = violation(SenderPolicy(("other.example",)), self.verdicts())
        self.assertEqual(kind, "domain")
        self.assertEqual(reason, "From: domain customer.example is not allowed (allowed: other.example)")

    def test_subdomain_of_allowed(self):
        self.assertIsNone(violation(SenderPolicy(("example",)), self.verdicts()))

    def test_require_dmarc(self):
        policy = SenderPolicy((), "dmarc")
        self.assertIn("DMARC did not pass", violation(policy, self.verdicts(dmarc=Check("fail", "customer.example", "x"))).reason)
        self.assertIsNone(violation(policy, self.verdicts(dmarc=Check("pass", "customer.example"))))

    def test_require_dkim_aligned(self):
        policy = SenderPolicy((), "dkim")
        self.assertIn("no DKIM pass", violation(policy, self.verdicts(dkim=Check("pass", "attacker.example"))).reason)
        self.assertIsNone(violation(policy, self.verdicts(dkim=Check("pass", "mail.customer.example"))))

    def test_require_spf_aligned(self):
        policy = SenderPolicy((), "spf")
        self.assertIn("no SPF pass", violation(policy, self.verdicts(spf=Check("pass", "attacker.example"))).reason)
        self.assertIsNone(violation(policy, self.verdicts(spf=Check("pass", "customer.example"))))


class ResolverAddressTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(parse_resolver_address("10.0.0.2"), ("10.0.0.2", 53))
        self.assertEqual(parse_resolver_address("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_resolver_address("[::1]:5353"), ("::1", 5353))
        self.assertEqual(parse_resolver_address("::1"), ("::1", 53))
        for bad in ("", "host:x", "host:0", "[::1]:99999"):
            self.assertRaises(ValueError, parse_resolver_address, bad)


class MessageForChecksTests(unittest.TestCase):
    """The worker reads a big unsigned message's header section only: its body is never held whole."""

    def read(self, data: bytes) -> bytes:
        import io

        from mailingest.extraction.checker import message_for_checks

        return message_for_checks(io.BytesIO(data))

    def test_unsigned_message_gives_its_header_section(self):
        header = b"Received: from x\r\n by y\r\nFrom: a@customer.example\r\nSubject: order\r\n\r\n"
        self.assertEqual(self.read(header + b"x" * 100000), header)

    def test_signed_message_is_read_whole(self):
        for field in (b"DKIM-Signature: v=1; d=customer.example\r\n", b"ARC-Seal: i=1; cv=none\r\n"):
            message = b"From: a@customer.example\r\n" + field + b"\r\n" + b"body\r\n" * 1000
            self.assertEqual(self.read(message), message)

    def test_a_folded_line_is_no_field(self):
        header = b"Subject: order\r\n dkim-signature: not a field\r\n\r\n"
        self.assertEqual(self.read(header + b"body"), header)
