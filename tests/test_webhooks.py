"""
Webhooks end to end: mail in over SMTP, signed events out to a real HTTP
receiver on 127.0.0.1, from the durable outbox.
"""

import hashlib
import os
import random
import sqlite3
import time

import treq
from standardwebhooks import Webhook
from twisted.internet import defer
from twisted.trial import unittest

from mailingest.handoff.api import new_token, token_hash
from mailingest.handoff.events import as_datetime, new_secret
from mailingest.handoff.targets import TargetPolicy, TargetRefused
from mailingest.handoff.webhooks import jittered
from mailingest.retry import Backoff
from tests.daemon import DaemonTestCase, RunningDaemon, free_port, message, sleep, temp_dir
from tests.test_api import order
from tests.webhook_receiver import Receiver

FAST = Backoff(0.05, maximum=0.2)


def send_order(daemon, n: int):
    return daemon.send(message(subject=f"Order {n}", message_id=f"<order-{n}@customer.test>"), ["orders+acme@example.com"])


@defer.inlineCallbacks
def event_rows(store, until, timeout: float = 20.0):
    """Poll the outbox until C{until(rows)} holds; fire with the rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = yield store.list_events()
        if until(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the outbox never reached the expected state: {rows}")
        yield sleep(0.05)


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
        self.assertEqual(first["message"]["envelope"], {"from": "sender@customer.test", "to": ["orders+acme@example.com"]})
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
