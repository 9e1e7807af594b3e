"""
The console's HTTP side: sign-in with an API token, a session cookie, the
pages, the downloads (streamed by the API's code) and the admin's POST
actions, each checked against the session's CSRF token and logged.

Every answer carries a Content-Security-Policy that allows no inline script,
style or frame, so even a mistake in escaping could not run mail's script.
"""

import email.parser
import email.policy
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.template import flattenString

from mailingest.console import pages
from mailingest.console.rejections import RejectionHistory
from mailingest.console.sessions import Session, Sessions
from mailingest.errors import BlobNotFound, NoSuchEvent, NoSuchMessage, NotQuarantined
from mailingest.interfaces import IExtractionQueue, IOrgStore, IOutboxStore, IQuarantineStore, IReadStore, ISchemaStore
from mailingest.ops.http import CHECK_TIMEOUT, Check, OpsSite, bounded, describe_failure, run_checks
from mailingest.handoff.api import ApiError, ApiResource, UnknownToken, decode_cursor, encode_cursor, token_hash, token_scope
from mailingest.handoff.throttle import AuthThrottle, TooManyFailures, client_key

log = Logger(namespace="mailingest.console")

COOKIE = b"mailingest_console"
# Login CSRF (double submit): the sign-in form's token is also in this cookie,
# which another site can neither read nor set, so it cannot sign a visitor's
# browser in with the other site's token.
SIGN_IN_COOKIE = b"mailingest_console_sign_in"
SIGN_IN_PATH = b"/console/sign-in"
_SIGN_IN_TOKEN = re.compile(rb"^[A-Za-z0-9_-]{43}$")
PAGE_SIZE = 50
HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200
MAX_HEADER_VALUE = 2000
MAX_FIELD = 200  # characters kept of a form field or header name
STATIC = os.path.join(os.path.dirname(__file__), "static")
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NotFound(Exception):
    """Answered 404 whether the thing is missing or another organisation's."""


class Forbidden(Exception):
    """An organisation's token asked for an admin action."""


class Inapplicable(Exception):
    """An action asked of a message in another status than the one it applies to."""


def read_headers(raw: bytes) -> tuple[list[tuple[str, str]], bool]:
    """The header section of the first L{HEADER_BYTES} of a message: (name, value) pairs, and whether it was cut."""
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=-1)
    truncated = end < 0 and len(raw) >= HEADER_BYTES
    section = raw if end < 0 else raw[:end]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section)
    pairs = [(str(name)[:MAX_FIELD], str(value).replace("\r", "")[:MAX_HEADER_VALUE]) for name, value in parsed.items()]
    return pairs[:MAX_HEADERS], truncated or len(pairs) > MAX_HEADERS


class _CappedSink:
    """Keeps the first C{cap} bytes a blob store writes."""

    def __init__(self, cap: int):
        self.cap = cap
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        if len(self.data) < self.cap:
            self.data += data[: self.cap - len(self.data)]


async def head_of(blobs, key: str) -> bytes:
    """The first L{HEADER_BYTES} of a stored message, for L{read_headers}; empty when the blob is gone."""
    path = blobs.local_path(key)
    try:
        if path is not None:
            with open(path, "rb") as f:
                return f.read(HEADER_BYTES)
        sink = _CappedSink(HEADER_BYTES)
        await blobs.read_to(key, sink)
        return bytes(sink.data)
    except (FileNotFoundError, BlobNotFound):
        return b""


class BadFilter(Exception):
    """A query value the messages page cannot use: answered 400 with this reason beside the form."""


def _day(text: str, label: str) -> datetime | None:
    """The UTC midnight starting a C{YYYY-MM-DD} filter day; None when the field is empty."""
    if not text:
        return None
    try:
        if _DATE.match(text):
            return datetime.combine(datetime.strptime(text, "%Y-%m-%d").date(), time(), timezone.utc)
    except ValueError:
        pass
    raise BadFilter(f"{label} must be a day as YYYY-MM-DD, e.g. 2025-01-31.")


def _day_after(day: datetime | None) -> datetime | None:
    """The end of a C{to} day; None (no bound) after 9999-12-31, the calendar's last, which a date picker offers."""
    return None if day is None or day.date() == date.max else day + timedelta(days=1)


def _search_arguments(filters: dict[str, str]) -> dict:
    """The store's search arguments from the page's filters; L{BadFilter} for a value they cannot be made from."""
    if filters["status"] and filters["status"] not in pages.STATUSES:
        raise BadFilter("Status must be one of " + ", ".join(pages.STATUSES) + ".")
    try:
        before = decode_cursor(filters["cursor"]) if filters["cursor"] else None
    except ApiError:
        raise BadFilter("That cursor is not one this console gave; start again from the first page.") from None
    return {
        "status": filters["status"] or None,
        "since": _day(filters["from"], "From"),
        "until": _day_after(_day(filters["to"], "To")),
        "sender": filters["sender"] or None,
        "text": filters["q"] or None,
        "before_id": before,
    }


class ConsoleResource(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        store: "IReadStore | IExtractionQueue | IQuarantineStore | IOutboxStore | IOrgStore",
        blobs,
        api: ApiResource,
        sessions: Sessions,
        rejections: RejectionHistory,
        checks: Mapping[str, Check],
        clock: IReactorTime,
        check_timeout: float = CHECK_TIMEOUT,
        https: bool = False,
    ):
        """C{https}: the operator's C{--api-public-url} is https, so cookies are Secure even when a proxy speaks plain HTTP to us."""
        super().__init__()
        self.https = https
        self.checks = dict(checks)
        self.clock = clock
        self.check_timeout = check_timeout
        self.store = store
        self.blobs = blobs
        self.api = api
        self.sessions = sessions
        self.rejections = rejections
        self.routes = [
            ("GET", r"/console/?", self.home, False),
            ("GET", r"/console/sign-in", self.sign_in_page, False),
            ("POST", r"/console/sign-in", self.sign_in, False),
            ("POST", r"/console/sign-out", self.sign_out, True),
            ("GET", r"/console/static/console\.css", self.stylesheet, False),
            ("GET", r"/console/orgs", self.organisations, True),
            ("GET", r"/console/orgs/(?P<id>\d{1,18})/messages", self.messages, True),
            ("GET", r"/console/messages/(?P<id>\d{1,18})", self.message, True),
            ("GET", r"/console/messages/(?P<id>\d{1,18})/raw", self.raw, True),
            ("GET", r"/console/documents/(?P<id>\d{1,18})/content", self.document, True),
            ("GET", r"/console/messages/(?P<id>\d{1,18})/reprocess", self.confirm_reprocess, True),
            ("POST", r"/console/messages/(?P<id>\d{1,18})/reprocess", self.reprocess, True),
            ("GET", r"/console/messages/(?P<id>\d{1,18})/release", self.confirm_release, True),
            ("POST", r"/console/messages/(?P<id>\d{1,18})/release", self.release, True),
            ("POST", r"/console/events/(?P<id>\d{1,18})/redeliver", self.redeliver, True),
            ("GET", r"/console/status", self.status, True),
        ]
        self._patterns = [(method, re.compile("^" + path + "$"), handler, signed) for method, path, handler, signed in self.routes]

    def render(self, request: server.Request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"x-frame-options", b"DENY")
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._unexpected, request)
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        path = request.path.decode("utf-8", "replace")
        method = "GET" if request.method == b"HEAD" else request.method.decode("ascii", "replace")
        session = self.sessions.get(request.getCookie(COOKIE).decode("ascii", "replace") if request.getCookie(COOKIE) else None)
        allowed = []
        for route_method, pattern, handler, signed in self._patterns:
            match = pattern.match(path)
            if not match:
                continue
            allowed.append(route_method)
            if route_method != method:
                continue
            if signed and session is None:
                return self._redirect(request, "/console/sign-in")
            if route_method == "POST" and signed and not hmac.compare_digest(self._arg(request, "csrf").encode(), session.csrf.encode()):
                return await self._page(request, pages.layout("Expired form", [pages.tags.p("The form expired; go back, reload and try again.")], session), 403)
            try:
                args = {k: int(v) for k, v in match.groupdict().items()}
                await handler(request, session, **args) if signed else await handler(request)
            except NotFound:
                await self._page(request, pages.not_found(session), 404)
            except Forbidden:
                await self._page(request, pages.forbidden(session), 403)
            return
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return await self._page(request, pages.layout("Method not allowed", [], session), 405)
        await self._page(request, pages.not_found(session), 404)

    def _unexpected(self, failure, request: server.Request) -> None:
        log.failure("console request {path} failed", failure, path=request.path.decode("utf-8", "replace"))
        if not request.startedWriting and not request.finished:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"internal error; see the daemon's log\n")
            request.finish()

    @staticmethod
    def _arg(request: server.Request, name: str) -> str:
        values = request.args.get(name.encode())
        return values[-1].decode("utf-8", "replace")[:MAX_FIELD] if values else ""

    async def _page(self, request: server.Request, page, status: int = 200) -> None:
        body = await flattenString(request, page)
        if request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", str(len(body) + 15).encode())
        if request.method != b"HEAD":
            request.write(b"<!DOCTYPE html>" + body)
        request.finish()

    def _redirect(self, request: server.Request, url: str) -> None:
        request.setResponseCode(303)
        request.setHeader(b"location", url.encode("ascii"))
        request.setHeader(b"content-length", b"0")
        request.finish()

    def _scoped(self, row: dict | None, session: Session, key: str = "org_id") -> dict:
        if row is None or (session.scope is not None and row[key] != session.scope):
            raise NotFound()
        return row

    # signing in and out

    async def home(self, request: server.Request) -> None:
        self._redirect(request, "/console/orgs")

    async def sign_in_page(self, request: server.Request) -> None:
        await self._page(request, pages.sign_in(self._sign_in_token(request)))

    def _secure(self, request: server.Request) -> bool:
        """Whether cookies get C{Secure}: from the operator's setting or our own TLS, never from a request header."""
        return self.https or request.isSecure()

    def _sign_in_token(self, request: server.Request) -> str:
        """The pre-session token of the sign-in form: its cookie's, or a new one set now."""
        token = request.getCookie(SIGN_IN_COOKIE) or b""
        if not _SIGN_IN_TOKEN.match(token):
            token = secrets.token_urlsafe(32).encode()
            request.addCookie(SIGN_IN_COOKIE, token, path=SIGN_IN_PATH, httpOnly=True, secure=self._secure(request), sameSite="strict")
        return token.decode()

    async def sign_in(self, request: server.Request) -> None:
        client = client_key(request)
        try:
            self.api.throttle.sign_in(client)
        except TooManyFailures as e:
            request.setHeader(b"retry-after", str(e.retry_after).encode())
            return await self._page(request, pages.sign_in(self._sign_in_token(request), str(e).capitalize() + "."), 429)
        expected = request.getCookie(SIGN_IN_COOKIE) or b""
        if not expected or not hmac.compare_digest(self._arg(request, "csrf").encode(), expected):
            self.api.throttle.log("console: sign-in without its form's token from {client}", client=client)
            page = pages.sign_in(self._sign_in_token(request), "The form expired; sign in again.")
            return await self._page(request, page, 403)
        token = self._arg(request, "token").strip()
        try:
            if not token:
                raise UnknownToken()
            scope = await token_scope(self.store, self.api.admin_hash, token)
        except UnknownToken:
            self.api.throttle.failed(client, "console")
            return await self._page(request, pages.sign_in(self._sign_in_token(request), "That token is not known, or it was revoked."), 401)
        session = self.sessions.open(scope, token_hash(token))
        request.addCookie(
            COOKIE, session.id.encode(), path=b"/console", httpOnly=True, secure=self._secure(request), sameSite="strict"
        )
        request.addCookie(
            SIGN_IN_COOKIE, b"", path=SIGN_IN_PATH, httpOnly=True, secure=self._secure(request), sameSite="strict", max_age=b"0"
        )
        log.info("console sign-in: {who}", who=session.who)
        self._redirect(request, "/console/orgs")

    async def sign_out(self, request: server.Request, session: Session) -> None:
        self.sessions.close(session.id)
        request.addCookie(COOKIE, b"", path=b"/console", httpOnly=True, secure=self._secure(request), sameSite="strict", max_age=b"0")
        self._redirect(request, "/console/sign-in")

    async def stylesheet(self, request: server.Request) -> None:
        with open(os.path.join(STATIC, "console.css"), "rb") as f:
            body = f.read()
        request.setHeader(b"content-type", b"text/css; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    # the pages

    async def organisations(self, request: server.Request, session: Session) -> None:
        today = datetime.combine(datetime.now(timezone.utc).date(), time(), timezone.utc)
        orgs = await self.store.org_summaries(today, session.scope)
        await self._page(request, pages.organisations(orgs, session))

    async def messages(self, request: server.Request, session: Session, id: int) -> None:
        orgs = await self.store.org_summaries(datetime.now(timezone.utc), id)
        if not orgs or (session.scope is not None and session.scope != id):
            raise NotFound()
        filters = {name: self._arg(request, name) for name in ("q", "status", "sender", "from", "to", "cursor")}
        try:
            search = _search_arguments(filters)
        except BadFilter as e:
            return await self._page(request, pages.messages(orgs[0], [], filters, None, session, str(e)), 400)
        rows = await self.store.search_messages(id, limit=PAGE_SIZE + 1, **search)
        cursor = encode_cursor(rows[PAGE_SIZE - 1]["id"]) if len(rows) > PAGE_SIZE else None
        await self._page(request, pages.messages(orgs[0], rows[:PAGE_SIZE], filters, cursor, session))

    async def message(self, request: server.Request, session: Session, id: int) -> None:
        row = self._scoped(await self.store.get_message(id), session)
        documents = await self.store.list_documents(message_id=id)
        events = await self.store.message_events(id)
        history = await self.store.status_history(id)
        headers, truncated = read_headers(await head_of(self.blobs, row["raw_key"]))
        await self._page(request, pages.message(row, headers, truncated, documents, events, session, history))
        session.notice = None

    async def raw(self, request: server.Request, session: Session, id: int) -> None:
        row = self._scoped(await self.store.get_message(id), session)
        await self._stream(request, row["raw_key"], row["raw_size"], "application/octet-stream", f"message-{id}.eml")

    async def document(self, request: server.Request, session: Session, id: int) -> None:
        row = self._scoped(await self.store.get_document(id), session)
        await self._stream(request, row["storage_key"], row["size"], "application/octet-stream", row["filename"])

    async def _stream(self, request: server.Request, key: str, size: int, content_type: str, filename: str) -> None:
        try:
            await self.api.stream(request, key, size, content_type, filename)
        except ApiError:
            raise NotFound() from None

    async def status(self, request: server.Request, session: Session) -> None:
        """Every backend question bounded like C{/readyz}'s, so a hung database cannot hang the page; an organisation's figures only its own."""
        readiness = run_checks(self.checks, self.check_timeout, self.clock)
        queue = self._bounded_count(lambda: self.store.count_messages("received", org_id=session.scope))
        outbox = self._bounded_count(lambda: self.store.count_events("pending", org_id=session.scope))
        depths = await defer.gatherResults([queue, outbox])
        await self._page(request, pages.status(*depths, self.rejections.last_hour(), await readiness, session))

    def _bounded_count(self, count: Check) -> defer.Deferred:
        return bounded(count, self.check_timeout, self.clock).addErrback(lambda failure: "unknown: " + describe_failure(failure))

    # the admin's actions

    async def _act(self, request: server.Request, session: Session, row: dict | None, change, notice: str, page: int) -> None:
        """An admin's action on a row the session may see: done, logged, confirmed on the message's page."""
        if not session.admin:
            raise Forbidden()
        self._scoped(row, session)
        try:
            await change()
        except (NoSuchMessage, NoSuchEvent):
            raise NotFound() from None
        except (NotQuarantined, Inapplicable) as e:
            session.notice = str(e)
        else:
            session.notice = notice
            log.info("console: {who}: {notice}", who=session.who, notice=notice)
        self._redirect(request, f"/console/messages/{page}")

    async def _confirm(self, request: server.Request, session: Session, id: int, action: str) -> None:
        """The page that asks before an action (GET, so a link reaches it; the action itself is its form's POST)."""
        if not session.admin:
            raise Forbidden()
        row = self._scoped(await self.store.get_message(id), session)
        await self._page(request, pages.confirm(row, action, session), 409 if pages.inapplicable(row, action) else 200)

    async def confirm_reprocess(self, request: server.Request, session: Session, id: int) -> None:
        await self._confirm(request, session, id, "reprocess")

    async def confirm_release(self, request: server.Request, session: Session, id: int) -> None:
        await self._confirm(request, session, id, "release")

    async def reprocess(self, request: server.Request, session: Session, id: int) -> None:
        row = await self.store.get_message(id)

        async def change() -> None:
            reason = pages.inapplicable(row, "reprocess")
            if reason:
                raise Inapplicable(reason)
            await self.store.reprocess(id)

        await self._act(request, session, row, change, f"Message {id} is queued for reprocessing.", id)

    async def release(self, request: server.Request, session: Session, id: int) -> None:
        row = await self.store.get_message(id)
        notice = f"Message {id} is released from quarantine and queued for extraction."
        await self._act(request, session, row, lambda: self.store.release(id), notice, id)

    async def redeliver(self, request: server.Request, session: Session, id: int) -> None:
        event = self._scoped(await self.store.get_event(id), session)
        notice = f"Webhook event {event['event_id']} will be delivered again now."
        await self._act(request, session, event, lambda: self.store.redeliver(id), notice, event["inbound_message_id"])


class _Root(resource.Resource):
    """The API's site: C{/console/...} to the console, everything else to the API."""

    def __init__(self, api: ApiResource, console: ConsoleResource):
        super().__init__()
        self.api = api
        self.console = console

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return self.console if path == b"console" else self.api


def make_site(
    store: "IReadStore | IExtractionQueue | IQuarantineStore | IOutboxStore | IOrgStore | ISchemaStore",
    blobs,
    clock,
    rejections: RejectionHistory,
    admin_token: str | None = None,
    api_url: str | None = None,
    checks: Mapping[str, Check] | None = None,
) -> server.Site:
    """The site of C{--api}: the JSON API and the console (whose status page runs C{checks}, by default the database's and storage's)."""
    api = ApiResource(store, blobs, admin_token, api_url, AuthThrottle(clock))
    checks = {"database": store.check, "storage": blobs.check} if checks is None else checks
    https = api_url is not None and api_url.startswith("https://")
    console = ConsoleResource(store, blobs, api, Sessions(clock), rejections, checks, clock, https=https)
    return OpsSite(_Root(api, console))
