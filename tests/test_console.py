"""
The web console: its templates rendered with twisted.web.template, its
sessions and rejection ring on a task.Clock, and its pages end to end
against a real daemon with --api on 127.0.0.1.
"""

import email.parser
import hashlib
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from html import unescape
from urllib.parse import urlencode

import treq
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.template import flattenString
from twisted.web.test.requesthelper import DummyChannel

from mailingest.console import pages
from mailingest.console.rejections import RejectionHistory, rejected_totals
from mailingest.console.resource import COOKIE, HEADER_BYTES, SIGN_IN_COOKIE, ConsoleResource, read_headers
from mailingest.console.sessions import MAX_SESSIONS_PER_TOKEN, Sessions
from mailingest.handoff.api import encode_cursor
from mailingest.ops import metrics
from mailingest.storage.stores import search
from mailingest.storage.stores.base import StorableTransaction
from tests.test_api import PDF, ApiCase

HOSTILE = '<script>document.title="pwned"</script>'


def render(tag) -> str:
    return flattenString(None, tag).result.decode("utf-8")


class TemplateTests(unittest.TestCase):
    def setUp(self):
        self.session = Sessions(task.Clock()).open(None, "admin")

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
        """A link to the action's confirmation page: the message page itself has no one-click form for it."""
        html = render(pages.message(self.message_row(), [], False, [], [], self.session))
        self.assertIn('href="/console/messages/7/reprocess"', html)
        self.assertNotIn('action="/console/messages/7/reprocess"', html)
        self.assertNotIn("/release", html)
        html = render(pages.message(self.message_row(status="quarantined"), [], False, [], [], self.session))
        self.assertIn('href="/console/messages/7/release"', html)
        self.assertNotIn('action="/console/messages/7/release"', html)

    def test_confirmation_is_a_form_without_script(self):
        for name, status in (("reprocess", "failed"), ("release", "quarantined")):
            html = render(pages.confirm(self.message_row(status=status), name, self.session))
            form = re.search(rf'<form method="post" action="/console/messages/7/{name}" class="action">(.*?)</form>', html).group(1)
            self.assertIn(f'<input type="hidden" name="csrf" value="{self.session.csrf}" />', form)
            self.assertIn(f'<button type="submit">{name.capitalize()}</button>', form)
            self.assertIn('href="/console/messages/7"', html)
            self.assertIn("&lt;script&gt;", html)  # the subject, escaped
            self.assertNotIn("<script", html)
        html = render(pages.confirm(self.message_row(status="parsed"), "release", self.session))
        self.assertIn("Message 7 is parsed: only a quarantined message can be released.", html)
        self.assertNotIn("/release", html)

    def test_releasing_infected_content_asks_for_a_ticked_box(self):
        infected = self.message_row(status="parsed", virus="infected", virus_detail="Test.Sig", infected_allowed_at=None)
        html = render(pages.message(infected, [], False, [], [], self.session))
        self.assertIn('href="/console/messages/7/allow-infected"', html)
        html = render(pages.confirm(infected, "allow-infected", self.session))
        form = re.search(r'<form method="post" action="/console/messages/7/allow-infected" class="action">(.*?)</form>', html).group(1)
        self.assertIn('<input type="checkbox" name="consent" value="yes" required="" />', form)
        self.assertIn("infected content will be downloadable", form)
        self.assertIn("--allow-infected", html)
        for row in (dict(infected, infected_allowed_at="2025-01-31 10:00:00+00:00"), dict(infected, virus="clean")):
            self.assertNotIn("/allow-infected", render(pages.message(row, [], False, [], [], self.session)))
            html = render(pages.confirm(row, "allow-infected", self.session))
            self.assertIn("Message 7: it has no infected content withheld", html)
            self.assertNotIn('name="consent"', html)
        organisation = Sessions(task.Clock()).open(1, "acme")
        self.assertNotIn("/allow-infected", render(pages.message(infected, [], False, [], [], organisation)))

    def test_organisations_page_counts_arrivals_and_labels_statuses(self):
        org = {"id": 1, "slug": "acme", "name": "Acme", "active": True, "counts": {"received": 1, "parsed": 3}, "last_received_at": None}
        html = render(pages.organisations([org], self.session))
        headings = re.findall(r"<th>([^<]*)</th>", html)
        self.assertEqual(headings[3:8], ["Arrived today", "Status received", "Status parsed", "Status failed", "Status quarantined"])
        self.assertNotIn("Received today", html)
        cells = re.findall(r"<td>([^<]*)</td>", html)
        self.assertEqual(cells[2:7], ["4", "1", "3", "0", "0"])

    def test_organisation_token_sees_no_actions(self):
        org_session = Sessions(task.Clock()).open(1, "acme")
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

    def test_lines_past_the_cap_are_not_parsed(self):
        """A sender's 16,000 one-byte fields: the email package reads 1,000 lines of them, not all."""
        parsed = []
        real = email.parser.BytesHeaderParser.parsebytes
        self.patch(email.parser.BytesHeaderParser, "parsebytes", lambda parser, text: parsed.append(text) or real(parser, text))
        for line_end in (b"\r\n", b"\n", b"\r"):
            section = b"Subject: Hi" + line_end + (b"a:" + line_end) * 16000
            del parsed[:]
            headers, truncated = read_headers(section[:HEADER_BYTES])
            self.assertEqual((headers[0], len(headers), truncated), (("Subject", "Hi"), 200, True))
            self.assertEqual(parsed[0].count(line_end), 999, line_end)


class SessionTests(unittest.TestCase):
    def test_expires_after_idle(self):
        clock = task.Clock()
        sessions = Sessions(clock, lifetime=60)
        session = sessions.open(4, "acme")
        clock.advance(59)
        self.assertIs(sessions.get(session.id), session)
        clock.advance(59)
        self.assertIs(sessions.get(session.id), session)  # each use extends it
        clock.advance(61)
        self.assertIsNone(sessions.get(session.id))
        self.assertEqual(len(sessions), 0)

    def test_bounded(self):
        sessions = Sessions(task.Clock(), limit=2)
        first = sessions.open(None, "admin")
        sessions.open(None, "admin")
        sessions.open(None, "admin")
        self.assertEqual(len(sessions), 2)
        self.assertIsNone(sessions.get(first.id))

    def test_one_tokens_sign_ins_never_evict_anothers_session(self):
        """Issue 22.5: 10,050 sign-ins with an organisation's token leave the admin's session alone."""
        sessions = Sessions(task.Clock())
        admin = sessions.open(None, "admin-sha256")
        acme = [sessions.open(1, "acme-sha256") for _ in range(10_050)]
        self.assertIs(sessions.get(admin.id), admin)
        self.assertEqual(len(sessions), 1 + MAX_SESSIONS_PER_TOKEN)
        self.assertIs(sessions.get(acme[-1].id), acme[-1])
        self.assertIsNone(sessions.get(acme[-1 - MAX_SESSIONS_PER_TOKEN].id))  # that token's oldest went

    def test_the_overall_bound_evicts_from_the_token_with_the_most(self):
        sessions = Sessions(task.Clock(), limit=8, per_token=6)
        admin = sessions.open(None, "admin")
        beta = [sessions.open(2, "beta") for _ in range(3)]
        acme = [sessions.open(1, "acme") for _ in range(8)]  # under its own bound; from the fifth on, past the overall one
        self.assertEqual(len(sessions), 8)
        self.assertIs(sessions.get(admin.id), admin)
        self.assertTrue(all(sessions.get(s.id) is s for s in beta))
        self.assertEqual([sessions.get(s.id) is s for s in acme], [False] * 4 + [True] * 4)

    def test_ids_and_csrf_tokens_are_random(self):
        sessions = Sessions(task.Clock())
        a, b = sessions.open(None, "admin"), sessions.open(None, "admin")
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

    def count_messages(self, status, org_id=None):
        return defer.succeed(4)

    def count_events(self, status, org_id=None):
        return defer.Deferred()


def render_console(console: ConsoleResource, session_id: str, path: bytes) -> tuple[server.Request, DummyChannel]:
    channel = DummyChannel()
    request = server.Request(channel, False)
    request.method, request.path, request.args = b"GET", path, {}
    request.prepath, request.postpath = [b"console"], path.split(b"/")[2:]
    request.received_cookies = {COOKIE: session_id.encode()}
    resource.getChildForRequest(console, request).render(request)
    return request, channel


class _TwoTenantStore:
    """Depths of everyone (org_id None) and of organisation 1."""

    def count_messages(self, status, org_id=None):
        return defer.succeed({None: 700, 1: 2}[org_id])

    def count_events(self, status, org_id=None):
        return defer.succeed({None: 900, 1: 1}[org_id])


class StatusPageScopeTests(unittest.TestCase):
    def setUp(self):
        clock = task.Clock()
        self.sessions = Sessions(clock)
        checks = {"database": lambda: defer.succeed(None), "storage": lambda: defer.fail(OSError("cannot write /srv/mail/blobs/.probe"))}
        rejections = RejectionHistory(clock, read=lambda: {"bad_recipient": 3.0})
        self.console = ConsoleResource(_TwoTenantStore(), None, None, self.sessions, rejections, checks, clock)

    def page(self, scope) -> str:
        request, channel = render_console(self.console, self.sessions.open(scope, str(scope)).id, b"/console/status")
        self.assertTrue(request.finished)
        return channel.transport.written.getvalue().decode()

    def test_the_admin_sees_everything(self):
        page = self.page(None)
        self.assertIn("<dd>700</dd>", page)
        self.assertIn("<dd>900</dd>", page)
        self.assertIn("<td>bad_recipient</td><td>3</td>", page)
        self.assertIn("<td>storage</td><td>error: cannot write /srv/mail/blobs/.probe</td>", page)

    def test_an_organisation_sees_only_its_own_figures(self):
        """Issue 22.9: its own depths, no one's rejections, no check's error text (paths, hosts)."""
        page = self.page(1)
        self.assertIn("<dd>2</dd>", page)
        self.assertIn("<dd>1</dd>", page)
        for everyones in ("700", "900", "bad_recipient", "/srv/mail", "error:"):
            self.assertNotIn(everyones, page)
        self.assertIn("<td>database</td><td>ok</td>", page)
        self.assertIn("<td>storage</td><td>unavailable</td>", page)


class StatusPageDeadlineTests(unittest.TestCase):
    def test_a_check_that_never_answers_times_out(self):
        """The status page answers within the checks' deadline and says which check timed out."""
        clock = task.Clock()
        sessions = Sessions(clock)
        checks = {"database": lambda: defer.succeed(None), "disk": defer.Deferred}
        console = ConsoleResource(_HungStore(), None, None, sessions, RejectionHistory(clock), checks, clock, check_timeout=2)
        request, channel = render_console(console, sessions.open(None, "admin").id, b"/console/status")
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
        response = yield treq.get(self.base + "/console/sign-in", headers={"X-Forwarded-Proto": "https", "Forwarded": "proto=https"}, persistent=False)
        yield treq.content(response)
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertNotIn("Secure", cookie)  # a peer's header is not the operator's word
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
    def test_a_search_stopped_short_says_how_far_it_looked_and_goes_on(self):
        """
        A search the store stopped before a full page (a text slow to look
        for) says since when it searched and links to go on from there, with
        the filters kept; going on finds the older message.
        """
        older = yield self.deliver("acme", 1)
        yield self.deliver("acme", 2)
        acme = yield self.daemon.store.get_org("acme")
        cookie = yield self.sign_in("acme")
        self.patch(StorableTransaction, "read_within", lambda txn, seconds, sql, args=(): defer.succeed(None))
        self.patch(search, "WINDOW_MESSAGES", 1)
        self.patch(search, "INDEX_WINDOW_MESSAGES", 1)
        self.patch(search, "SEARCH_SECONDS", 0)
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?q=acme-1%40", cookie)
        self.assertIn("Searched the messages received since", body)
        self.assertNotIn("No messages match.", body)
        [link] = re.findall(r'href="(/console/orgs/[^"]*cursor=[^"]*)"[^>]*>Search older messages', body)
        self.assertIn("q=acme-1%40", link)
        _, body = yield self.request("GET", unescape(link), cookie)
        self.assertIn(f'href="/console/messages/{older}"', body)

    @defer.inlineCallbacks
    def test_organisation_page_shows_its_domains_and_messages_where_they_came_in(self):
        acme = yield self.daemon.store.get_org("acme")
        cookie = yield self.sign_in("acme")
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages", cookie)
        self.assertNotIn("<h2>Domains</h2>", body)
        yield self.daemon.store.add_domain("acme", "xn--bcher-kva.example", "tok", ["orders"])
        yield self.daemon.store.add_domain("acme", "acme-corp.example", "tok2")
        yield self.daemon.store.record_check(
            "acme-corp.example", "suspended", datetime(2030, 1, 1, tzinfo=timezone.utc), "TXT record missing since 2026-12-01",
            datetime(2026, 12, 1, tzinfo=timezone.utc),
        )
        _, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages", cookie)
        self.assertIn("<h2>Domains</h2>", body)
        self.assertIn('<span title="xn--bcher-kva.example">bücher.example</span>', body)
        self.assertIn('<span class="status domain-pending">pending</span>', body)
        self.assertIn('<span class="status domain-suspended">suspended</span>', body)
        self.assertIn("TXT record missing since 2026-12-01", body)
        message_id = yield self.deliver("acme", 1)
        _, body = yield self.request("GET", f"/console/messages/{message_id}", cookie)
        self.assertIn("<dt>Came in on</dt><dd>example.com</dd>", body)

    @defer.inlineCallbacks
    def test_downloads_are_attachments(self):
        message_id = yield self.deliver("acme", 1, filename='a"b.pdf')
        documents = yield self.daemon.store.list_documents(message_id=message_id)
        cookie = yield self.sign_in("acme")
        response, _ = yield self.request("GET", f"/console/messages/{message_id}/raw", cookie)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/octet-stream"])
        self.assertTrue(response.headers.getRawHeaders("content-disposition")[0].startswith("attachment;"))
        self.assertEqual(response.headers.getRawHeaders("content-security-policy"), ["sandbox; default-src 'none'; frame-ancestors 'none'"])
        response = yield treq.get(
            f"{self.base}/console/documents/{documents[0]['id']}/content",
            headers={"Cookie": f"{COOKIE.decode()}={cookie}"},
            persistent=False,
        )
        body = yield treq.content(response)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(PDF).hexdigest())
        self.assertIn('filename="a_b.pdf"', response.headers.getRawHeaders("content-disposition")[0])
        self.assertEqual(response.headers.getRawHeaders("content-security-policy"), ["sandbox; default-src 'none'; frame-ancestors 'none'"])

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


class PublicHttpsUrlTests(ConsoleCase):
    """Behind a TLS proxy the daemon speaks plain HTTP; the operator's https public URL makes the cookies Secure."""

    extra = {"api_public_url": "https://mail.example.com/"}

    @defer.inlineCallbacks
    def test_cookies_are_secure(self):
        response, _ = yield self.request("GET", "/console/sign-in")
        self.assertIn("Secure", response.headers.getRawHeaders("set-cookie")[0])
        response, _ = yield self.post_sign_in(self.tokens["admin"])
        self.assertEqual(response.code, 303)
        cookies = response.headers.getRawHeaders("set-cookie")
        self.assertTrue(cookies[0].startswith(f"{COOKIE.decode()}="), cookies)
        self.assertTrue(all("Secure" in cookie for cookie in cookies), cookies)
        message_id = yield self.deliver("acme", 1)
        document = (yield self.get_json(f"/v1/messages/{message_id}"))["documents"][0]
        self.assertEqual(document["content_url"], f"https://mail.example.com/v1/documents/{document['id']}/content")


class ConsoleActionTests(ConsoleCase):
    @defer.inlineCallbacks
    def test_reprocess_and_release_are_confirmed_on_their_own_page(self):
        failed = yield self.deliver("acme", 1)
        yield self.daemon.store.mark_failed(failed, "broken", 3)
        quarantined = yield self.deliver("acme", 2)
        yield self.daemon.store.mark_quarantined(quarantined, "sender not allowed")
        admin = yield self.sign_in("admin")
        for message_id, name, status in ((failed, "reprocess", "failed"), (quarantined, "release", "quarantined")):
            path = f"/console/messages/{message_id}"
            _, body = yield self.request("GET", path, admin)
            self.assertIn(f'href="{path}/{name}"', body)
            response, body = yield self.request("GET", f"{path}/{name}", admin)
            self.assertEqual(response.code, 200)
            self.assertIn(f'<form method="post" action="{path}/{name}" class="action">', body)
            self.assertEqual((yield self.daemon.store.get_message(message_id))["status"], status, "asking changes nothing")
            token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
            response, _ = yield self.request("POST", f"{path}/{name}", admin, form={"csrf": token})
            self.assertEqual(response.headers.getRawHeaders("location"), [path])
            row = yield self.daemon.settled(message_id)
            self.assertEqual(row["status"], "parsed")
            response, body = yield self.request("GET", f"{path}/{name}", admin)
            self.assertEqual(response.code, 409)
            self.assertIn(f"is parsed: only a {status} message", body)
            self.assertNotIn(f'action="{path}/{name}"', body)
            _, body = yield self.request("GET", path, admin)  # the notice of the action, shown once
            response, body = yield self.request("POST", f"{path}/{name}", admin, form={"csrf": token})  # the form sent again
            self.assertEqual(response.code, 303)
            _, body = yield self.request("GET", path, admin)
            self.assertIn(f"{message_id} is parsed", re.search(r'<p class="notice" role="status">([^<]*)</p>', body).group(1))
            self.assertEqual((yield self.daemon.store.status_history(message_id))[-1]["status"], "parsed", "nothing done")
        acme = yield self.sign_in("acme")
        response, _ = yield self.request("GET", f"/console/messages/{failed}/reprocess", acme)
        self.assertEqual(response.code, 403)
        response, _ = yield self.request("GET", "/console/messages/999999/release", admin)
        self.assertEqual(response.code, 404)

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
    def test_release_infected_content_only_by_the_admin_with_the_box_ticked(self):
        """The console's `mailingest release ID --allow-infected`: the same history row and the same words, in the log."""
        message_id = yield self.deliver("acme", 1)
        documents = yield self.daemon.store.list_documents(message_id=message_id)
        infected = [{**documents[0], "ordinal": 0, "virus": "infected", "virus_detail": "Test.Sig"}]
        yield self.daemon.store.mark_quarantined(message_id, "virus: Test.Sig in order.pdf", None, infected, {"virus": "infected", "virus_detail": "Test.Sig"})
        logged = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        path = f"/console/messages/{message_id}"
        content = f"/console/documents/{documents[0]['id']}/content"

        def allowed():
            return self.daemon.store.get_message(message_id).addCallback(lambda row: row["infected_allowed_at"])

        # An organisation may not, asking or posting.
        acme = yield self.sign_in("acme")
        response, _ = yield self.request("GET", path + "/allow-infected", acme)
        self.assertEqual(response.code, 403)
        token = yield self.csrf(acme, path)
        response, _ = yield self.request("POST", path + "/allow-infected", acme, form={"csrf": token, "consent": "yes"})
        self.assertEqual(response.code, 403)
        self.assertIsNone((yield allowed()))

        admin = yield self.sign_in("admin")
        _, body = yield self.request("GET", path, admin)
        self.assertIn(f'href="{path}/allow-infected"', body)
        response, _ = yield self.request("GET", content, admin)
        self.assertEqual(response.code, 403)
        response, body = yield self.request("GET", path + "/allow-infected", admin)
        self.assertEqual(response.code, 200)
        self.assertIn('name="consent" value="yes" required=""', body)
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        response, _ = yield self.request("POST", path + "/allow-infected", admin, form={"csrf": "forged", "consent": "yes"})
        self.assertEqual(response.code, 403)  # another site's form
        # The box not ticked (a client that ignores `required`): nothing done, asked again.
        response, body = yield self.request("POST", path + "/allow-infected", admin, form={"csrf": token})
        self.assertEqual(response.code, 400)
        self.assertIn("tick the box", body)
        self.assertIsNone((yield allowed()))

        response, _ = yield self.request("POST", path + "/allow-infected", admin, form={"csrf": token, "consent": "yes"})
        self.assertEqual(response.headers.getRawHeaders("location"), [path])
        self.assertIsNotNone((yield allowed()))
        history = [change["status"] for change in (yield self.daemon.store.status_history(message_id))]
        self.assertEqual(history[-3:], ["quarantined", "infected-allowed", "received"])
        said = f"message {message_id}: its infected documents may be downloaded (Test.Sig); recorded in its history"
        self.assertIn(f"console: admin: {said}; released message {message_id}: queued for extraction", logged)
        _, body = yield self.request("GET", path, admin)
        self.assertIn(said, body)
        response, _ = yield self.request("GET", content, admin)
        self.assertEqual(response.code, 200)
        response, body = yield self.request("GET", path + "/allow-infected", admin)
        self.assertEqual(response.code, 409)
        self.assertIn(f"Message {message_id}", re.search(r'<p class="error" role="alert">([^<]*)</p>', body).group(1))
        self.assertNotIn('name="consent"', body)

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


class ConsoleQueryTests(ConsoleCase):
    """Every query value a person can type or edit in the URL is a page: 400 with the reason when it is bad, never a 500."""

    @defer.inlineCallbacks
    def test_bad_filters_are_400_pages(self):
        yield self.deliver("acme", 1)
        acme = yield self.daemon.store.get_org("acme")
        cookie = yield self.sign_in("acme")
        path = f"/console/orgs/{acme['id']}/messages?"
        for query, reason in (
            ("cursor=" + encode_cursor(10**30), "cursor"),
            ("cursor=%25%25", "cursor"),
            ("from=2025-02-30", "From"),
            ("to=31.12.2025", "To"),
            ("status=nonsense", "Status"),
        ):
            response, body = yield self.request("GET", path + query, cookie)
            self.assertEqual(response.code, 400, (query, body))
            self.assertIn(reason, re.search(r'<p class="error" role="alert">([^<]*)</p>', body).group(1), query)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_the_calendars_ends_are_days_like_any_other(self):
        """A date picker offers 0001-01-01 to 9999-12-31: the day after the last one is past the calendar, not an error."""
        yield self.deliver("acme", 1)
        acme = yield self.daemon.store.get_org("acme")
        cookie = yield self.sign_in("acme")
        response, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?from=0001-01-01&to=9999-12-31", cookie)
        self.assertEqual(response.code, 200, body)
        self.assertIn("Order 1", body)
        response, body = yield self.request("GET", f"/console/orgs/{acme['id']}/messages?to=2000-01-01", cookie)
        self.assertEqual(response.code, 200, body)
        self.assertNotIn("Order 1", body)

