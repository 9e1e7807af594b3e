"""
Webhooks end to end: mail in over SMTP, signed events out to a real HTTP
receiver on 127.0.0.1, from the durable outbox.
"""

import hashlib
import os
import random
import socket
import sqlite3
import time
from datetime import datetime, timezone

import treq
from standardwebhooks import Webhook
from twisted.internet import defer, reactor, task, threads
from twisted.names import client, dns
from twisted.trial import unittest
from twisted.web.client import URI
from zope.interface.verify import verifyObject

from mailingest.handoff.api import new_token, token_hash
from mailingest.handoff.events import MESSAGE_EVENTS, as_datetime, new_secret
from mailingest.handoff import targets
from mailingest.handoff.targets import CheckedEndpointFactory, TargetPolicy, TargetRefused
from mailingest.handoff.webhooks import WebhookService, jittered, request_url
from mailingest.interfaces import IWebhookEvents
from mailingest.retry import Backoff
from tests.daemon import DaemonTestCase, RunningDaemon, free_port, message, poll, sleep, temp_dir
from tests.dns_server import DnsServer, Zone
from tests.test_api import order
from tests.webhook_receiver import Receiver, SilentReceiver

FAST = Backoff(0.05, maximum=0.2)


def send_order(daemon, n: int, org: str = "acme"):
    return daemon.send(message(subject=f"Order {n}", message_id=f"<order-{n}@customer.test>"), [f"orders+{org}@example.com"])


def send_orders(daemon, org: str, count: int):
    """C{count} orders to C{org} on one SMTP session."""

    def transaction(client):
        client.ehlo("customer.test")
        for n in range(count):
            client.sendmail("sender@customer.test", [f"orders+{org}@example.com"], message(message_id=f"<{org}-{n}@customer.test>"))

    return daemon.smtp(transaction)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def event_rows(store, until, timeout: float = 20.0, limit: int = 50):
    """Poll the outbox (the C{limit} newest events) until C{until(rows)} holds; fire with the rows."""
    return poll(lambda: store.list_events(limit=limit), until, timeout, lambda rows: f"the outbox never reached the expected state: {rows}")


class EventsOfStatusChanges(unittest.TestCase):
    """Which status changes raise an event, and its id, are decided here, not in the store."""

    def test_message_events(self):
        self.assertTrue(verifyObject(IWebhookEvents, MESSAGE_EVENTS))
        self.assertEqual(
            {status: MESSAGE_EVENTS.event_type(status) for status in ("received", "retrying", "parsed", "failed", "quarantined")},
            {"received": None, "retrying": None, "parsed": "message.parsed", "failed": "message.failed", "quarantined": "message.quarantined"},
        )
        first, second = MESSAGE_EVENTS.new_event_id(), MESSAGE_EVENTS.new_event_id()
        self.assertRegex(first, "^evt_[0-9a-f]{32}$")
        self.assertNotEqual(first, second)


class WebhookCase(DaemonTestCase):
    overrides = {"poll_interval": "0.2", "webhook_allow_http": True, "webhook_allow_private": True}
    codes = (200,)

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.daemon.service.webhooks.backoff = FAST
        self.receiver = yield Receiver(self.codes).start()
        self.addCleanup(self.receiver.stop)
        self.secret = new_secret()
        yield self.daemon.store.set_webhook("acme", self.receiver.url, self.secret)


class SignedEvents(WebhookCase):
    @defer.inlineCallbacks
    def test_one_signed_event_per_parsed_message(self):
        ids = []
        for n in range(3):
            code, reply = yield send_order(self.daemon, n)
            ids.append(int(reply.split()[-1]))
        requests = yield self.receiver.received(3)
        bodies = []
        for headers, body, _ in requests:
            self.assertEqual(headers["content-type"], "application/json")
            bodies.append(Webhook(self.secret).verify(body, headers))
            self.assertEqual(headers["webhook-id"], bodies[-1]["id"])
        self.assertEqual(sorted(b["message"]["id"] for b in bodies), ids)
        self.assertEqual({b["type"] for b in bodies}, {"message.parsed"})
        self.assertEqual({b["organization"] for b in bodies}, {"acme"})
        first = next(b for b in bodies if b["message"]["id"] == ids[0])
        self.assertEqual(first["message"]["message_id_header"], "<order-0@customer.test>")
        self.assertEqual(first["message"]["envelope"], {"from": "sender@customer.test", "to": ["orders+acme@example.com"], "domains": ["example.com"]})
        self.assertEqual(first["message"]["subject"], "Order 0")
        self.assertEqual(first["message"]["status"], "parsed")
        rows = yield event_rows(self.daemon.store, lambda rows: all(r["status"] == "delivered" for r in rows))
        self.assertEqual(len(rows), 3)
        self.assertEqual({r["last_status"] for r in rows}, {200})
        yield sleep(0.5)
        self.assertEqual(len(self.receiver.requests), 3, "an event was sent twice")

    def test_tampered_body_fails_verification(self):
        """The check above can fail: the official verifier refuses a changed body."""
        d = send_order(self.daemon, 1).addCallback(lambda _: self.receiver.received(1))

        def tamper(requests):
            headers, body, _ = requests[0]
            self.assertRaises(Exception, Webhook(self.secret).verify, body.replace(b"acme", b"acmf"), headers)

        return d.addCallback(tamper)


class SameObjectsAsTheApi(WebhookCase):
    """A webhook's message and documents are the API's objects: same names, same values, the same absolute links."""

    overrides = dict(WebhookCase.overrides, api="tcp:0:interface=127.0.0.1", api_public_url="https://mail-api.example/")

    @defer.inlineCallbacks
    def test_event_fields_are_the_api_objects_fields(self):
        token = new_token()
        yield self.daemon.store.add_token("acme", token_hash(token))
        code, reply = yield self.daemon.send(order("acme", 1), ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        (headers, body, _), = yield self.receiver.received(1)
        event = Webhook(self.secret).verify(body, headers)
        api = f"http://127.0.0.1:{self.daemon.service.api_listener.port.getHost().port}"
        response = yield treq.get(f"{api}/v1/messages/{event['message']['id']}", headers={"Authorization": f"Bearer {token}"}, persistent=False)
        message = yield treq.json_content(response)
        documents = message.pop("documents")
        self.assertEqual(message["message_id_header"], "<acme-1@customer.test>")
        self.assertEqual(message["raw_url"], f"https://mail-api.example/v1/messages/{message['id']}/raw")
        self.assertEqual({k: message[k] for k in event["message"]}, event["message"])
        self.assertEqual(len(event["documents"]), 1)
        self.assertEqual(documents[0]["content_url"], f"https://mail-api.example/v1/documents/{documents[0]['id']}/content")
        self.assertEqual(documents[0]["message_id"], message["id"])  # our row id, as in the log lines
        self.assertEqual({k: documents[0][k] for k in event["documents"][0]}, event["documents"][0])


class NoWebhookNoEvent(DaemonTestCase):
    overrides = {"poll_interval": "0.2"}

    @defer.inlineCallbacks
    def test_org_without_webhook_gets_no_events(self):
        code, reply = yield send_order(self.daemon, 1)
        yield self.daemon.settled(int(reply.split()[-1]))
        self.assertEqual((yield self.daemon.store.list_events()), [])


class Retries(WebhookCase):
    codes = (500, 500, 500, 200)

    @defer.inlineCallbacks
    def test_500_three_times_then_200(self):
        yield send_order(self.daemon, 1)
        requests = yield self.receiver.received(4)
        rows = yield event_rows(self.daemon.store, lambda rows: rows and rows[0]["status"] == "delivered")
        yield sleep(0.5)
        self.assertEqual(len(self.receiver.requests), 4)
        self.assertEqual(len({headers["webhook-id"] for headers, _, _ in requests}), 1)
        self.assertEqual(len({body for _, body, _ in requests}), 1)
        self.assertEqual((rows[0]["attempts"], rows[0]["last_status"]), (4, 200))


class ReceiverDown(unittest.TestCase):
    @defer.inlineCallbacks
    def test_pending_while_down_then_delivered_after_restart(self):
        directory = temp_dir(self)
        port = free_port()
        options = {"webhook_allow_http": True, "webhook_allow_private": True, "poll_interval": "0.2"}
        daemon = yield RunningDaemon(directory, **options).start()
        try:
            daemon.service.webhooks.backoff = Backoff(0.3, maximum=0.3)
            yield daemon.store.add_org("acme", "Acme")
            secret = new_secret()
            yield daemon.store.set_webhook("acme", f"http://127.0.0.1:{port}/hooks/mail", secret)
            yield send_order(daemon, 1)
            rows = yield event_rows(daemon.store, lambda rows: rows and rows[0]["attempts"] >= 2)
        finally:
            yield daemon.stop()
        self.assertEqual(rows[0]["status"], "pending")
        self.assertIn("Connection refused", rows[0]["last_error"])
        self.assertGreater(as_datetime(rows[0]["next_attempt_at"]), as_datetime(rows[0]["created_at"]))

        receiver = yield Receiver().start(port)
        self.addCleanup(receiver.stop)
        daemon = yield RunningDaemon(directory, **options).start()
        self.addCleanup(daemon.stop)
        requests = yield receiver.received(1)
        Webhook(secret).verify(requests[0][1], requests[0][0])
        rows = yield event_rows(daemon.store, lambda rows: rows[0]["status"] == "delivered")
        self.assertEqual(len(rows), 1)


class Fairness(DaemonTestCase):
    """Issue 22: one organisation's receiver that hangs, and one that refuses, do not hold up another's events."""

    overrides = {"poll_interval": "0.2", "webhook_allow_http": True, "webhook_allow_private": True}

    @defer.inlineCallbacks
    def delivered_within(self, receiver, n: int, seconds: float):
        started = time.monotonic()
        yield send_order(self.daemon, n)
        requests = yield receiver.received(n + 1, timeout=30)
        delay = requests[n][2] - started
        self.assertLess(delay, seconds, f"the healthy organisation's event took {delay:.1f} s")

    @defer.inlineCallbacks
    def test_healthy_event_within_5s_beside_a_silent_and_a_refusing_receiver(self):
        healthy = yield Receiver().start()
        self.addCleanup(healthy.stop)
        silent = yield SilentReceiver().start()
        self.addCleanup(silent.stop)  # before the daemon stops: its attempts end at once
        store = self.daemon.store
        yield store.set_webhook("acme", healthy.url, new_secret())
        for slug, url in (("hang", silent.url), ("refused", f"http://127.0.0.1:{free_port()}/hooks")):
            yield store.add_org(slug, slug)
            yield store.set_webhook(slug, url, new_secret())
        yield send_orders(self.daemon, "hang", 40)
        yield send_orders(self.daemon, "refused", 200)
        yield event_rows(store, lambda rows: len(rows) == 240 and silent.held, timeout=60, limit=1000)
        yield self.delivered_within(healthy, 0, 5.0)
        # (before any of its attempts has ended)
        self.assertEqual(silent.most_at_once, 4, "one organisation has at most 4 attempts at a time")
        # Again once the silent receiver's first attempts have timed out, and the refusing one is paused.
        yield event_rows(store, lambda rows: any(r["org_slug"] == "hang" and r["attempts"] for r in rows), timeout=30, limit=1000)
        yield self.paused(1)
        yield self.delivered_within(healthy, 1, 5.0)
        rows = yield store.list_events(org_slug="hang", limit=1000)
        self.assertIn("no answer within 10 s", {r["last_error"] for r in rows})

    def paused(self, count: int, timeout: float = 5.0):
        """Wait until C{count} receivers are paused (one that is tried again at the end of its pause is not, for a moment)."""
        return poll(self.daemon.store.count_paused_receivers, lambda paused: paused == count, timeout, lambda paused: f"never {count} receivers paused")


class _FakeStore:
    def __init__(self, failures: list[int | None]):
        self.failures = failures
        self.failed: list[tuple] = []
        self.paused: list[tuple[int, float]] = []

    def event_failed(self, event_id, status, error, delay):
        self.failed.append((event_id, status, error))
        return defer.succeed(self.failures.pop(0))

    def pause_receiver(self, org_id, seconds):
        self.paused.append((org_id, seconds))
        return defer.succeed(None)


class _HangingAgent:
    def __init__(self):
        self.requests: list[defer.Deferred] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append(defer.Deferred())
        return self.requests[-1]


def claimed_event(n: int = 1) -> dict:
    now = datetime.now(timezone.utc)
    return {
        "id": n, "event_id": f"evt_{n}", "event_type": "message.parsed", "message_status": "parsed",
        "message_error": None, "attempts": 0, "retry_from": now, "org_id": 7, "org_slug": "acme",
        "url": "http://[2001:db8::1]:8080/hooks", "secret": new_secret(), "message_id": n,
        "source_message_id": f"<{n}@x>", "mail_from": "a@x", "rcpt_to": "orders+acme@example.com",
        "subject": "order", "received_at": now, "documents": [],
    }


class Attempts(unittest.TestCase):
    """One attempt on L{task.Clock}: bounded, never sent twice, and a receiver failing again and again paused."""

    def service(self, failures: list[int | None]) -> tuple[WebhookService, _FakeStore, _HangingAgent, task.Clock]:
        clock, store, agent = task.Clock(), _FakeStore(failures), _HangingAgent()
        webhooks = WebhookService(store, TargetPolicy(allow_http=True, allow_private=True), clock)
        webhooks._agent = agent
        return webhooks, store, agent, clock

    def test_a_silent_receiver_costs_one_post_and_10_seconds(self):
        webhooks, store, agent, clock = self.service([1])
        done = defer.ensureDeferred(webhooks.deliver(claimed_event()))
        clock.advance(9.9)
        self.assertFalse(done.called)
        self.assertEqual(len(agent.requests), 1)
        clock.advance(0.2)
        self.assertTrue(done.called)
        self.assertEqual(store.failed, [(1, None, "no answer within 10 s")])
        clock.advance(60)
        self.assertEqual(len(agent.requests), 1, "POSTed again after the timeout")

    def test_fifth_failure_in_a_row_pauses_the_receiver_doubling(self):
        webhooks, store, agent, clock = self.service([4, 5, None, 6, 30])
        for n in range(5):
            done = defer.ensureDeferred(webhooks.deliver(claimed_event(n)))
            clock.advance(10.1)
            self.assertTrue(done.called)
        self.assertEqual(len(store.failed), 5)
        self.assertEqual(store.paused, [(7, 5.0), (7, 10.0), (7, 600.0)])


class IPv6Literal(WebhookCase):
    """Issue 22: a webhook URL whose host is an IPv6 literal is delivered to."""

    @defer.inlineCallbacks
    def setUp(self):
        if not ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback here (request_url is tested on its own)")
        yield super().setUp()
        self.receiver6 = yield Receiver().start(interface="::1")
        self.addCleanup(self.receiver6.stop)
        yield self.daemon.store.set_webhook("acme", self.receiver6.url, self.secret)

    @defer.inlineCallbacks
    def test_delivered_to_ipv6_loopback(self):
        self.assertTrue(self.receiver6.url.startswith("http://[::1]:"))
        yield send_order(self.daemon, 1)
        [(headers, body, _)] = yield self.receiver6.received(1)
        Webhook(self.secret).verify(body, headers)
        self.assertEqual(headers["host"], f"[::1]:{self.receiver6.port.getHost().port}")
        rows = yield event_rows(self.daemon.store, lambda rows: rows and rows[0]["status"] == "delivered")
        self.assertEqual(rows[0]["last_status"], 200)


class _RefusalCase(DaemonTestCase):
    """The name or the policy may change after `org webhook` checked the URL: the daemon checks again."""

    @defer.inlineCallbacks
    def check_refused(self, url: str, reason: str):
        receiver = yield Receiver().start()
        self.addCleanup(receiver.stop)
        self.daemon.service.webhooks.backoff = FAST
        yield self.daemon.store.set_webhook("acme", url.format(port=receiver.port.getHost().port), new_secret())
        yield send_order(self.daemon, 1)
        rows = yield event_rows(self.daemon.store, lambda rows: rows and rows[0]["attempts"] >= 2)
        self.assertIn(reason, rows[0]["last_error"])
        self.assertEqual(rows[0]["status"], "pending")
        self.assertEqual(receiver.requests, [])



class RefusedAtSendTime(_RefusalCase):
    overrides = {"poll_interval": "0.2", "webhook_allow_http": True}

    def test_loopback_refused(self):
        return self.check_refused("http://127.0.0.1:{port}/hooks/mail", "(loopback): refused")

    def test_name_resolving_to_loopback_refused(self):
        return self.check_refused("http://localhost:{port}/hooks/mail", "resolves to 127.0.0.1 (loopback)")


class PlainHttpRefusedAtSendTime(_RefusalCase):
    overrides = {"poll_interval": "0.2", "webhook_allow_private": True}

    def test_plain_http_refused(self):
        return self.check_refused("http://127.0.0.1:{port}/hooks/mail", "is plain http")


class Policy(unittest.TestCase):
    def test_urls(self):
        strict = TargetPolicy()
        self.assertEqual(strict.check_url("https://App.example/h"), ("https", "app.example", 443))
        for url, reason in (
            ("http://app.example/h", "plain http"),
            ("ftp://app.example/h", "use https"),
            ("https:///h", "no host"),
            ("https://u:p@app.example/h", "no user or password"),
            ("https://app.example:99999/h", "bad webhook URL"),
        ):
            with self.assertRaises(TargetRefused) as caught:
                strict.check_url(url)
            self.assertIn(reason, str(caught.exception))
        self.assertEqual(TargetPolicy(allow_http=True).check_url("http://app.example:8080/h"), ("http", "app.example", 8080))

    def test_addresses(self):
        strict = TargetPolicy()
        for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "0.0.0.0",
                        "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "100.64.0.1"):
            self.assertRaises(TargetRefused, strict.check_address, "h", address)
        strict.check_address("h", "93.184.216.34")
        strict.check_address("h", "2606:2800:220:1:248:1893:25c8:1946")
        TargetPolicy(allow_private=True).check_address("h", "127.0.0.1")

    def test_ipv6_forms_of_ipv4_are_checked_through(self):
        """Issue 22: ipaddress calls these global; the IPv4 address they carry decides, or the form is refused."""
        strict = TargetPolicy()
        for address, reason in (
            ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254, link-local"),
            ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1, loopback"),
            ("64:ff9b::a00:1", "NAT64 of 10.0.0.1, private"),
            ("2002:7f00:1::1", "6to4 of 127.0.0.1, loopback"),
            ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254, link-local"),
            ("::ffff:0:a9fe:a9fe", "IPv4-translated of 169.254.169.254, link-local"),
            ("4000::1", "not global unicast"),
            ("3fff::1", "documentation"),
            ("::ffff:169.254.169.254", "IPv4-mapped of 169.254.169.254, link-local"),
            ("::a9fe:a9fe", "IPv4-compatible"),
            ("::5db8:d822", "IPv4-compatible"),
            ("64:ff9b:1::5db8:d822", "local-use NAT64"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("fec0::1", "site-local"),
        ):
            with self.assertRaises(TargetRefused) as caught:
                strict.check_address("h", address)
            self.assertIn(f"resolves to {address} ({reason})", str(caught.exception))
        # the same forms carrying a public address are public
        for address in ("64:ff9b::5db8:d822", "2002:5db8:d822::1", "::ffff:93.184.216.34"):
            strict.check_address("h", address)
        TargetPolicy(allow_private=True).check_address("h", "64:ff9b::a9fe:a9fe")

    def serve_dns(self, records: dict, silent_zones=()) -> client.Resolver:
        """A resolver asking only a test DNS server on 127.0.0.1 that serves C{records}."""
        server = DnsServer(Zone(records, silent_zones=silent_zones))
        address = server.start()
        self.addCleanup(server.stop)
        resolver = client.Resolver(servers=[address])
        return resolver

    @defer.inlineCallbacks
    def test_names_resolving_to_ipv6_forms_refused_at_connect_time(self):
        """The connection checks what the name resolves to now, through the same forms."""
        answers = {"nat64.example": "64:ff9b::7f00:1", "sixtofour.example": "2002:7f00:1::1"}
        resolver = self.serve_dns({name: [dns.Record_AAAA(address, ttl=60)] for name, address in answers.items()})
        factory = CheckedEndpointFactory(reactor, TargetPolicy(), resolver)
        for host, reason in (("nat64.example", "NAT64 of 127.0.0.1"), ("sixtofour.example", "6to4 of 127.0.0.1")):
            endpoint = factory.endpointForURI(URI.fromBytes(f"https://{host}/hooks".encode()))
            with self.assertRaises(TargetRefused) as caught:
                yield endpoint.connect(None)
            self.assertIn(f"webhook host {host} resolves to {answers[host]} ({reason}", str(caught.exception))

    @defer.inlineCallbacks
    def test_silent_dns_holds_no_thread(self):
        """
        Hosts whose DNS never answers take no thread of the reactor's pool,
        which every organisation's webhooks and the S3 client share: with 30
        such lookups under way a job on the pool runs before any of them ends, and each
        lookup ends as a refusal within an attempt's 10 s.
        """
        def no_thread_lookups(*args, **kwargs):
            raise AssertionError("getaddrinfo called: a lookup that can hang holds a thread")

        self.patch(socket, "getaddrinfo", no_thread_lookups)
        resolver = self.serve_dns({}, silent_zones=["silent.example"])
        self.patch(targets, "LOOKUP_TIMEOUT", (1, 2))
        factory = CheckedEndpointFactory(reactor, TargetPolicy(), resolver)
        started = time.monotonic()
        attempts = [
            factory.endpointForURI(URI.fromBytes(b"https://h%d.silent.example/hooks" % n)).connect(None) for n in range(30)
        ]
        self.assertEqual((yield threads.deferToThread(lambda: "free")), "free")
        self.assertEqual([attempt for attempt in attempts if attempt.called], [], "the job on the pool waited for lookups")
        for attempt in attempts:
            with self.assertRaises(TargetRefused) as caught:
                yield attempt
            self.assertIn("does not resolve: its DNS did not answer", str(caught.exception))
        self.assertLess(time.monotonic() - started, 10)

    def test_request_url_keeps_an_ipv6_literal(self):
        """Issue 22: hyperlink's to_uri (what treq sends) fails on an IPv6 literal with InvalidCodepoint U+003A."""
        self.assertEqual(request_url("http://[::1]:8080/hooks/é?x=ü"), b"http://[::1]:8080/hooks/%C3%A9?x=%C3%BC")
        self.assertEqual(request_url("https://[2001:db8::1]/h"), b"https://[2001:db8::1]/h")
        self.assertEqual(request_url("https://bücher.example/h"), b"https://xn--bcher-kva.example/h")

    def test_jitter_stays_within_half_and_whole_delay(self):
        rng = random.Random(1)
        delays = [jittered(10.0, rng) for _ in range(1000)]
        self.assertTrue(all(5.0 <= d <= 10.0 for d in delays))
        self.assertGreater(max(delays) - min(delays), 4.0, "no jitter")


class TwoDaemonsOnPostgres(unittest.TestCase):
    @defer.inlineCallbacks
    def test_each_event_delivered_once(self):
        from tests import postgres

        database = postgres.create_database()
        self.addCleanup(postgres.drop_database, database)
        shared = temp_dir(self)
        options = {
            "database": database, "storage": "file:" + shared, "poll_interval": "0.2",
            "webhook_allow_http": True, "webhook_allow_private": True,
        }
        daemons = []
        for _ in range(2):
            daemon = yield RunningDaemon(temp_dir(self), **options).start()
            self.addCleanup(daemon.stop)
            daemons.append(daemon)
        receiver = yield Receiver().start()
        self.addCleanup(receiver.stop)
        yield daemons[0].store.add_org("acme", "Acme")
        secret = new_secret()
        yield daemons[0].store.set_webhook("acme", receiver.url, secret)
        count = 20
        for n in range(count):
            # One at a time: client threads and the daemons share this process's thread pool.
            yield send_order(daemons[n % 2], n)
        requests = yield receiver.received(count)
        rows = yield event_rows(daemons[1].store, lambda rows: len(rows) == count and all(r["status"] == "delivered" for r in rows))
        yield sleep(1.0)
        self.assertEqual(len(receiver.requests), count)
        self.assertEqual(len({headers["webhook-id"] for headers, _, _ in requests}), count)
        self.assertEqual({r["attempts"] for r in rows}, {1})
        for headers, body, _ in requests:
            Webhook(secret).verify(body, headers)


class AdminCommands(unittest.TestCase):
    def setUp(self):
        self.directory = temp_dir(self)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}
        self.run_ok("migrate")
        self.run_ok("org", "add", "acme")

    def cli(self, *args, env=None):
        from tests.daemon import mailingest_cli

        return mailingest_cli(self.directory, *args, env=env or self.env)

    def run_ok(self, *args, env=None) -> str:
        done = self.cli(*args, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.decode()

    def refused(self, url: str, reason: str, env=None):
        done = self.cli("org", "webhook", "acme", "--url", url, env=env)
        self.assertEqual(done.returncode, 1)
        self.assertIn(reason, done.stderr.decode())
        self.assertEqual(done.stderr.decode().count("\n"), 1, "one line")

    def test_plain_http_and_internal_targets_refused(self):
        self.refused("http://app.example/hooks", "is plain http: use https://")
        self.refused("https://127.0.0.1/hooks", "127.0.0.1 (loopback): refused")
        self.refused("https://localhost/hooks", "resolves to 127.0.0.1 (loopback)")
        self.refused("https://10.0.0.8/hooks", "(private): refused")
        self.refused("https://169.254.169.254/latest", "(link-local): refused")
        self.refused("https://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "(NAT64 of 169.254.169.254, link-local): refused")
        self.refused("https://[2002:7f00:1::1]/hooks", "(6to4 of 127.0.0.1, loopback): refused")
        self.refused("https://[fec0::1]/hooks", "(site-local): refused")
        allowed = dict(self.env, MAILINGEST_WEBHOOK_ALLOW_PRIVATE="yes")
        self.refused("http://127.0.0.1/hooks", "plain http", env=allowed)
        self.assertIn("no webhook", self.run_ok("org", "webhook", "acme", "--remove"))

    def test_webhook_secret_shown_once_and_removal(self):
        allowed = dict(self.env, MAILINGEST_WEBHOOK_ALLOW_PRIVATE="yes", MAILINGEST_WEBHOOK_ALLOW_HTTP="yes")
        output = self.run_ok("org", "webhook", "acme", "--url", "http://127.0.0.1:9/hooks", env=allowed)
        secret = output.split("shown once, give it to the receiver): ")[1].strip()
        Webhook(secret)
        self.assertTrue(secret.startswith("whsec_"))
        secret_file = os.path.join(self.directory, "secret")
        with open(secret_file, "w") as f:
            f.write("not-a-secret\n")
        done = self.cli("org", "webhook", "acme", "--url", "http://127.0.0.1:9/hooks", "--secret-file", secret_file, env=allowed)
        self.assertIn("starts with whsec_", done.stderr.decode())
        self.assertIn("removed the webhook of acme", self.run_ok("org", "webhook", "acme", "--remove"))

    def test_token_create_and_revoke(self):
        token = self.run_ok("org", "token", "acme", "--create").splitlines()[-1]
        self.assertTrue(token.startswith("mit_"))
        with sqlite3.connect(os.path.join(self.directory, "mailingest-data", "mailingest.db")) as db:
            stored = [row[0] for row in db.execute("SELECT sha256 FROM api_token")]
        self.assertEqual(stored, [hashlib.sha256(token.encode()).hexdigest()])
        self.assertIn("revoked 1 API token(s) of acme", self.run_ok("org", "token", "acme", "--revoke"))

    def test_events_list_and_redeliver(self):
        self.assertEqual(self.run_ok("events", "list", "--json"), "[]\n")
        done = self.cli("events", "redeliver", "7")
        self.assertEqual((done.returncode, done.stderr.decode()), (1, "mailingest: no event 7\n"))
