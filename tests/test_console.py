"""
The web console: its templates rendered with twisted.web.template, its
sessions and rejection ring on a task.Clock, and its pages end to end
against a real daemon with --api on 127.0.0.1.
"""

import hashlib
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from urllib.parse import urlencode

import treq
from twisted.internet import defer, task
from twisted.trial import unittest
from twisted.web import server
from twisted.web.template import flattenString
from twisted.web.test.requesthelper import DummyChannel

from mailingest.console import pages
from mailingest.console.rejections import RejectionHistory, rejected_totals
from mailingest.console.resource import COOKIE, HEADER_BYTES, SIGN_IN_COOKIE, ConsoleResource, read_headers
from mailingest.console.sessions import Sessions
from mailingest.ops import metrics
from tests.test_api import PDF, ApiCase

HOSTILE = '<script>document.title="pwned"</script>'


def render(tag) -> str:
    return flattenString(None, tag).result.decode("utf-8")


class TemplateTests(unittest.TestCase):
    def setUp(self):
        self.session = Sessions(task.Clock()).open(None)

    def message_row(self, **changes) -> dict:
        row = {
            "id": 7, "org_id": 1, "org_slug": "acme", "status": "failed", "mail_from": "a@b.test",
            "rcpt_to": "orders+acme@example.com", "source_message_id": "<x@b.test>", "subject": HOSTILE,
            "client_ip": "127.0.0.1", "helo": "b.test", "tls": None, "received_at": "2025-01-31 10:00:00+00:00",
            "parsed_at": None, "released_at": None, "raw_size": 10, "raw_sha256": "0" * 64, "attempts": 3,
            "last_error": "<b>bad</b>", "quarantine_reason": None, "spf": "pass", "spf_domain": "b.test",
            "dkim": None, "dkim_domain": None, "dmarc": None, "dmarc_domain": None, "arc": None, "arc_domain": None,
        }
        row.update(changes)
        return row

    def test_message_page_escapes_mail_text(self):
        """Subject, filename, error and headers from mail are text in the page, never markup."""
        document = {"id": 3, "filename": HOSTILE + ".pdf", "content_type": "application/pdf", "size": 5, "sha256": "1" * 64}
        html = render(pages.message(self.message_row(), [("Subject", HOSTILE)], False, [document], [], self.session))
        self.assertNotIn("<script", html)
        self.assertNotIn("<b>bad", html)
        self.assertIn("&lt;script&gt;document.title=\"pwned\"&lt;/script&gt;", html)
        self.assertIn('href="/console/documents/3/content"', html)

    def test_message_page_shows_the_status_history_escaped(self):
        history = [
            {"status": "received", "error": None, "at": "2025-01-31 10:00:00+00:00"},
            {"status": "retrying", "error": HOSTILE, "at": "2025-01-31 10:00:05+00:00"},
            {"status": "failed", "error": "not a PDF", "at": "2025-01-31 10:01:00+00:00"},
        ]
        html = render(pages.message(self.message_row(), [], False, [], [], self.session, history))
        self.assertIn("<h3>History</h3>", html)
        self.assertIn("<tr><td>2025-01-31 10:00:05 UTC</td><td>retrying</td><td>&lt;script&gt;", html)
        self.assertNotIn("<script", html)
        self.assertLess(html.index("<td>received</td>"), html.index("<td>failed</td>"))

    def test_admin_sees_the_action_for_the_status(self):
        html = render(pages.message(self.message_row(), [], False, [], [], self.session))
        self.assertIn('action="/console/messages/7/reprocess"', html)
        self.assertIn(f'name="csrf" value="{self.session.csrf}"', html)
        self.assertNotIn("/release", html)
        html = render(pages.message(self.message_row(status="quarantined"), [], False, [], [], self.session))
        self.assertIn('action="/console/messages/7/release"', html)

    def test_organisation_token_sees_no_actions(self):
        org_session = Sessions(task.Clock()).open(1)
        html = render(pages.message(self.message_row(), [], False, [], [], org_session))
        self.assertNotIn("/reprocess", html)

    def test_no_page_carries_a_script_or_inline_style(self):
        html = render(pages.sign_in("t" * 43, "no")) + render(pages.status(1, 2, {"bad_rcpt": 3}, {"database": "ok"}, self.session))
        self.assertIn("bad_rcpt", html)
        self.assertNotIn("<script", html)
        self.assertNotIn("style=", html)

    def test_messages_page_links_the_next_page_with_the_filters(self):
        row = {"id": 9, "status": "parsed", "mail_from": "a@b.test", "subject": "Order", "received_at": None, "documents": 2}
        html = render(pages.messages({"id": 1, "slug": "acme"}, [row], {"q": "Order", "status": "parsed"}, "bTk", self.session))
        self.assertIn('href="/console/orgs/1/messages?q=Order&amp;status=parsed&amp;cursor=bTk"', html)
        self.assertIn('<option value="parsed" selected="">parsed</option>', html)


class HeaderTests(unittest.TestCase):
    def test_header_section_only(self):
        headers, truncated = read_headers(b"Subject: Hi\r\nFrom: a@b.test\r\n\r\nSubject: body\r\n")
        self.assertEqual(headers, [("Subject", "Hi"), ("From", "a@b.test")])
        self.assertFalse(truncated)

    def test_cut_at_the_cap(self):
        """A header section longer than the bytes read is shown cut, and says so."""
        headers, truncated = read_headers((b"X-Filler: " + b"y" * 70 + b"\r\n") * (HEADER_BYTES // 82 + 1))
        self.assertTrue(truncated)
        self.assertLessEqual(len(headers), 200)


class SessionTests(unittest.TestCase):
    def test_expires_after_idle(self):
        clock = task.Clock()
        sessions = Sessions(clock, lifetime=60)
        session = sessions.open(4)
        clock.advance(59)
        self.assertIs(sessions.get(session.id), session)
        clock.advance(59)
        self.assertIs(sessions.get(session.id), session)  # each use extends it
        clock.advance(61)
        self.assertIsNone(sessions.get(session.id))
        self.assertEqual(len(sessions), 0)

    def test_bounded(self):
        sessions = Sessions(task.Clock(), limit=2)
        first = sessions.open(None)
        sessions.open(None)
        sessions.open(None)
        self.assertEqual(len(sessions), 2)
        self.assertIsNone(sessions.get(first.id))

    def test_ids_and_csrf_tokens_are_random(self):
        sessions = Sessions(task.Clock())
        a, b = sessions.open(None), sessions.open(None)
        self.assertNotEqual(a.id, b.id)
        self.assertNotEqual(a.csrf, b.csrf)
        self.assertGreaterEqual(len(a.csrf), 40)


class RejectionTests(unittest.TestCase):
    def test_last_hour_is_the_difference_to_an_hour_ago(self):
        clock = task.Clock()
        totals = {"bad_rcpt": 5.0}
        history = RejectionHistory(clock, read=lambda: dict(totals))
        history.sample()
        self.assertEqual(history.last_hour(), {})
        for _ in range(120):
            clock.advance(60)
            totals["bad_rcpt"] += 1
            history.sample()
        self.assertEqual(history.last_hour(), {"bad_rcpt": 60})


    def test_the_intake_processes_rejections_count(self):
        # With --processes the rejections happen in the intake processes,
        # which keep their counters in prometheus_client's multiprocess files.
        directory = self.mktemp()
        os.mkdir(directory)
        child = subprocess.run(
            [sys.executable, "-c", "from mailingest.ops import metrics; metrics.REJECTED.labels('refused_recipients').inc(3)"],
            env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory), capture_output=True,
        )
        self.assertEqual(child.returncode, 0, child.stderr)
        before = rejected_totals().get("refused_recipients", 0)
        self.patch(metrics, "_children_dir", None)
        metrics.aggregate_children(directory)
        self.assertEqual(rejected_totals()["refused_recipients"], before + 3)


class _HungStore:
    """A store whose queue depth answers and whose outbox depth never does."""

    def count_messages(self, status):
        return defer.succeed(4)

    def count_events(self, status):
        return defer.Deferred()


class StatusPageDeadlineTests(unittest.TestCase):
    def test_a_check_that_never_answers_times_out(self):
        """The status page answers within the checks' deadline and says which check timed out."""
        clock = task.Clock()
        sessions = Sessions(clock)
        checks = {"database": lambda: defer.succeed(None), "disk": defer.Deferred}
        console = ConsoleResource(_HungStore(), None, None, sessions, RejectionHistory(clock), checks, clock, check_timeout=2)
        channel = DummyChannel()
        request = server.Request(channel, False)
        request.method, request.path, request.args = b"GET", b"/console/status", {}
        request.received_cookies = {COOKIE: sessions.open(None).id.encode()}
        console.render(request)
        clock.advance(1.9)
        self.assertFalse(request.finished)
        clock.advance(0.1)
        self.assertTrue(request.finished)
        page = channel.transport.written.getvalue().decode()
        self.assertIn("200 OK", page.splitlines()[0])
        self.assertIn("<td>database</td><td>ok</td>", page)
        self.assertIn("<td>disk</td><td>error: timed out after 2.0 s</td>", page)
        self.assertIn("<dd>4</dd>", page)
        self.assertIn("<dd>unknown: timed out after 2.0 s</dd>", page)


class ConsoleCase(ApiCase):
    """A daemon with the API (and so the console) on; helpers for a browser-less client with a cookie."""

    @defer.inlineCallbacks
    def request(self, method: str, path: str, cookie: str | None = None, form: dict | None = None, sign_in: str | None = None):
        cookies = [f"{name.decode()}={value}" for name, value in ((COOKIE, cookie), (SIGN_IN_COOKIE, sign_in)) if value]
        headers = {"Cookie": "; ".join(cookies)} if cookies else {}
        data = None
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            data = urlencode(form).encode()
        response = yield treq.request(method, self.base + path, headers=headers, data=data, persistent=False, allow_redirects=False)
        body = yield treq.content(response)
        return response, body.decode("utf-8", "replace")

    @defer.inlineCallbacks
    def sign_in_form(self):
        """The sign-in page's pre-session token: in its cookie and, the same, in its form."""
        response, body = yield self.request("GET", "/console/sign-in")
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertIn("SameSite=strict", cookie)
        token = re.match(rf"{SIGN_IN_COOKIE.decode()}=([^;]+)", cookie).group(1)
        self.assertIn(f'name="csrf" value="{token}"', body)
        return token

    @defer.inlineCallbacks
    def post_sign_in(self, token: str):
        form_token = yield self.sign_in_form()
        response, body = yield self.request("POST", "/console/sign-in", form={"token": token, "csrf": form_token}, sign_in=form_token)
        return response, body

    @defer.inlineCallbacks
    def sign_in(self, who: str):
        response, _ = yield self.post_sign_in(self.tokens[who])
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        return re.match(rf"{COOKIE.decode()}=([^;]+)", cookie).group(1)

    @defer.inlineCallbacks
    def csrf(self, cookie: str, path: str) -> str:
        _, body = yield self.request("GET", path, cookie)
        return re.search(r'name="csrf" value="([^"]+)"', body).group(1)


class ConsoleHttpTests(ConsoleCase):
    @defer.inlineCallbacks
    def test_sign_in_sets_a_strict_http_only_cookie(self):
        response, _ = yield self.post_sign_in(self.tokens["acme"])
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=strict", cookie)
        self.assertNotIn("Secure", cookie)  # plain HTTP here
        csp = response.headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("script-src 'self'", csp)

    @defer.inlineCallbacks
    def test_bad_token_and_no_session(self):
        response, body = yield self.post_sign_in("mit_nope")
        self.assertEqual(response.code, 401)
        self.assertIn("not known", body)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))
        response, _ = yield self.request("GET", "/console/orgs", cookie="forged")
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/console/sign-in"])

    @defer.inlineCallbacks
    def test_sign_in_needs_its_forms_token(self):
        """Login CSRF: a sign-in POST without the form's token in both cookie and field is refused, whatever the token."""
        form_token = yield self.sign_in_form()
        other_token = yield self.sign_in_form()
        self.assertNotEqual(form_token, other_token)
        for field, cookie in ((None, None), (form_token, None), (None, form_token), (other_token, form_token), ("", "")):
            form = {"token": self.tokens["admin"]} if field is None else {"token": self.tokens["admin"], "csrf": field}
            response, body = yield self.request("POST", "/console/sign-in", form=form, sign_in=cookie)
            self.assertEqual(response.code, 403, (field, cookie))
            self.assertIn("The form expired", body)
            cookies = response.headers.getRawHeaders("set-cookie", [])
            self.assertFalse([c for c in cookies if c.startswith(f"{COOKIE.decode()}=")], "no session")
        response, _ = yield self.request(
            "POST", "/console/sign-in", form={"token": self.tokens["admin"], "csrf": form_token}, sign_in=form_token
        )
        self.assertEqual(response.code, 303)
        expired = response.headers.getRawHeaders("set-cookie")[1]
        self.assertTrue(expired.startswith(f"{SIGN_IN_COOKIE.decode()}=;"), expired)
        self.assertIn("Max-Age=0", expired)

    @defer.inlineCallbacks
    def test_organisation_sees_only_its_own(self):
        acme_message = yield self.deliver("acme", 1)
        documents = yield self.daemon.store.list_documents(message_id=acme_message)
        beta = yield self.sign_in("beta")
        response, body = yield self.request("GET", "/console/orgs", beta)
        self.assertEqual(response.code, 200)
        self.assertIn(">beta<", body)
        self.assertNotIn(">acme<", body)
        acme = yield self.daemon.store.get_org("acme")
        for path in (
            f"/console/messages/{acme_message}",
            f"/console/messages/{acme_message}/raw",
            f"/console/documents/{documents[0]['id']}/content",
            f"/console/orgs/{acme['id']}/messages",
        ):
            response, _ = yield self.request("GET", path, beta)
            self.assertEqual(response.code, 404, path)
        mine = yield self.sign_in("acme")
        response, _ = yield self.request("GET", f"/console/messages/{acme_message}", mine)
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_messages_page_lists_filters_and_searches(self):
        first = yield self.deliver("acme", 1)
        yield self.deliver("acme", 2)
        acme = yield self.daemon.store.get_org("acme")
        cookie = yield self.sign_in("acme")
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages", cookie)
        self.assertLess(body.index("Order 2"), body.index("Order 1"))  # newest first
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?q=acme-1%40", cookie)
        self.assertIn(f'href="/console/messages/{first}"', body)
        self.assertNotIn("Order 2", body)
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?status=failed", cookie)
        self.assertIn("No messages match.", body)
        today = datetime.now(timezone.utc).date().isoformat()
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?from={today}&to={today}&sender=sender%40customer.test", cookie)
        self.assertIn("Order 1", body)
        self.assertIn("Order 2", body)

    @defer.inlineCallbacks
    def test_downloads_are_attachments(self):
        message_id = yield self.deliver("acme", 1, filename='a"b.pdf')
        documents = yield self.daemon.store.list_documents(message_id=message_id)
        cookie = yield self.sign_in("acme")
        response, _ = yield self.request("GET", f"/console/messages/{message_id}/raw", cookie)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/octet-stream"])
        self.assertTrue(response.headers.getRawHeaders("content-disposition")[0].startswith("attachment;"))
        response = yield treq.get(
            f"{self.base}/console/documents/{documents[0]['id']}/content",
            headers={"Cookie": f"{COOKIE.decode()}={cookie}"},
            persistent=False,
        )
        body = yield treq.content(response)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(PDF).hexdigest())
        self.assertIn('filename="a_b.pdf"', response.headers.getRawHeaders("content-disposition")[0])

    @defer.inlineCallbacks
    def test_message_page_shows_headers_and_events(self):
        message_id = yield self.deliver("acme", 1)
        cookie = yield self.sign_in("admin")
        _, body = yield self.request("GET", f"/console/messages/{message_id}", cookie)
        self.assertIn("Message-ID: &lt;acme-1@customer.test&gt;", body)
        self.assertIn("orders+acme@example.com", body)
        self.assertRegex(body, r"<td>[-0-9: ]+UTC</td><td>received</td><td></td>.*<td>[-0-9: ]+UTC</td><td>parsed</td>")

    @defer.inlineCallbacks
    def test_actions_need_admin_and_the_csrf_token(self):
        message_id = yield self.deliver("acme", 1)
        yield self.daemon.store.mark_failed(message_id, "broken", 3)
        path = f"/console/messages/{message_id}"
        admin = yield self.sign_in("admin")
        response, _ = yield self.request("POST", path + "/reprocess", admin, form={"csrf": "wrong"})
        self.assertEqual(response.code, 403)
        row = yield self.daemon.store.get_message(message_id)
        self.assertEqual(row["status"], "failed")
        org = yield self.sign_in("acme")
        token = yield self.csrf(org, path)
        response, _ = yield self.request("POST", path + "/reprocess", org, form={"csrf": token})
        self.assertEqual(response.code, 403)
        token = yield self.csrf(admin, path)
        response, _ = yield self.request("POST", path + "/reprocess", admin, form={"csrf": token})
        self.assertEqual(response.code, 303)
        row = yield self.daemon.settled(message_id)
        self.assertEqual(row["status"], "parsed")
        _, body = yield self.request("GET", path, admin)
        self.assertIn("is queued for reprocessing", body)
        _, body = yield self.request("GET", path, admin)
        self.assertNotIn("is queued for reprocessing", body)  # shown once

    @defer.inlineCallbacks
    def test_sign_out_ends_the_session(self):
        cookie = yield self.sign_in("acme")
        token = yield self.csrf(cookie, "/console/orgs")
        response, _ = yield self.request("POST", "/console/sign-out", cookie, form={"csrf": token})
        self.assertEqual(response.code, 303)
        response, _ = yield self.request("GET", "/console/orgs", cookie)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/console/sign-in"])

    @defer.inlineCallbacks
    def test_status_page(self):
        cookie = yield self.sign_in("admin")
        response, body = yield self.request("GET", "/console/status", cookie)
        self.assertEqual(response.code, 200)
        self.assertIn("Queue depth", body)
        self.assertIn("<td>database</td><td>ok</td>", body)
        self.assertIn("<td>disk</td><td>ok</td>", body)

    @defer.inlineCallbacks
    def test_api_still_answers_beside_the_console(self):
        status, _, _ = yield self.get("/v1/messages")
        self.assertEqual(status, 200)


class ConsoleActionTests(ConsoleCase):
    @defer.inlineCallbacks
    def test_release_a_quarantined_message(self):
        message_id = yield self.deliver("acme", 1)
        yield self.daemon.store.mark_quarantined(message_id, "sender not allowed")
        admin = yield self.sign_in("admin")
        path = f"/console/messages/{message_id}"
        token = yield self.csrf(admin, path)
        response, _ = yield self.request("POST", path + "/release", admin, form={"csrf": token})
        self.assertEqual(response.code, 303)
        _, body = yield self.request("GET", path, admin)
        self.assertIn("released from quarantine", body)
        row = yield self.daemon.settled(message_id)
        self.assertEqual(row["status"], "parsed")
        self.assertIsNotNone(row["released_at"])

    @defer.inlineCallbacks
    def test_redeliver_an_event(self):
        yield self.daemon.store.set_webhook("acme", "https://hooks.invalid/mail", "whsec_" + "a" * 32)
        message_id = yield self.deliver("acme", 1)
        yield self.daemon.store.mark_failed(message_id, "broken", 3)
        events = yield self.daemon.store.message_events(message_id)
        self.assertEqual([e["message_status"] for e in events], ["parsed", "failed"])  # oldest first
        event = events[-1]
        admin = yield self.sign_in("admin")
        path = f"/console/messages/{message_id}"
        _, body = yield self.request("GET", path, admin)
        self.assertIn(f'action="/console/events/{event["id"]}/redeliver"', body)
        token = yield self.csrf(admin, path)
        response, _ = yield self.request("POST", f"/console/events/{event['id']}/redeliver", admin, form={"csrf": token})
        self.assertEqual(response.headers.getRawHeaders("location"), [path])
        _, body = yield self.request("GET", path, admin)
        self.assertIn(f"Webhook event {event['event_id']} will be delivered again now.", body)
        again = yield self.daemon.store.get_event(event["id"])
        self.assertGreater(str(again["retry_from"]), str(event["retry_from"]))
