"""
The console's HTTP side: sign-in with an API token, a session cookie, the
pages, the downloads (streamed by the API's code) and the admin's POST
actions, each checked against the session's CSRF token and logged. Each page
is a small resource of a twisted.web tree (L{mailingest.ops.web}) rooted at
L{ConsoleResource}, which L{make_site} puts at C{/console} below the API's root.

Every answer carries a Content-Security-Policy that allows no inline script,
style or frame, so even a mistake in escaping could not run mail's script.
"""

import email.parser
import email.policy
import hmac
import itertools
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, datetime, time, timedelta, timezone

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.template import flattenString

from mailingest.console import pages
from mailingest.console.rejections import RejectionHistory
from mailingest.console.sessions import ConsoleSession, Sessions
from mailingest.errors import BlobNotFound, ContentGone, MessageHeld, NoSuchEvent, NoSuchMessage, NotErasable, NotQuarantined
from mailingest.interfaces import IExtractionQueue, IOrgStore, IOutboxStore, IQuarantineStore, IReadStore, ISchemaStore, ISearchStore
from mailingest.ops.http import CHECK_TIMEOUT, Check, OpsSite, bounded, describe_failure, run_checks
from mailingest.handoff.api import ApiError, ApiResource, UnknownToken, decode_cursor, encode_cursor, token_hash, token_scope
from mailingest.handoff.events import withheld
from mailingest.handoff.throttle import AuthThrottle, TooManyFailures, client_key
from mailingest.ops.web import Node, numbered
from mailingest.scanning.release import allow_infected, allowed_lines
from mailingest.storage.retention import erase_message, gone

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
# Lines of a header section read: the MAX_HEADERS fields, folded a few times each.
MAX_HEADER_LINES = 1000
_LINE_END = re.compile(rb"\r\n?|\n")  # as the email package ends lines
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
    """
    The header section of the first L{HEADER_BYTES} of a message: (name,
    value) pairs, and whether it was cut. The email package reads at most
    L{MAX_HEADER_LINES} lines of it, on the reactor: more show nothing the
    caps below would keep, and 64 KiB of one-byte fields took it 28 ms.
    """
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=-1)
    truncated = end < 0 and len(raw) >= HEADER_BYTES
    section = raw if end < 0 else raw[:end]
    line_ends = _LINE_END.finditer(section)
    cut = next(itertools.islice(line_ends, MAX_HEADER_LINES - 1, None), None)
    if cut is not None:
        section, truncated = section[: cut.start()], True
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


def _arg(request: server.Request, name: str) -> str:
    values = request.args.get(name.encode())
    return values[-1].decode("utf-8", "replace")[:MAX_FIELD] if values else ""


class _Page(Node):
    """
    A path of the console. Every answer carries L{SECURITY_HEADERS}. A path
    answers the methods it has a handler for (C{get}, which HEAD uses too, and
    C{post}), 405 with C{Allow} to others; a path with neither, or anything
    below a path that is no route, is the 404 page. A C{signed} path needs a
    session (else the sign-in page), and its POST the session's CSRF token.
    """

    signed = False
    get: Callable[[server.Request, ConsoleSession | None], Awaitable[None]] | None = None
    post: Callable[[server.Request, ConsoleSession | None], Awaitable[None]] | None = None

    def missing(self) -> resource.IResource:
        return _Page(self.site)

    def render(self, request: server.Request) -> int:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"x-frame-options", b"DENY")
        return super().render(request)

    async def answer(self, request: server.Request) -> None:
        site = self.site
        cookie = request.getCookie(COOKIE)
        session = site.sessions.get(cookie.decode("ascii", "replace") if cookie else None)
        handlers = {"GET": self.get, "POST": self.post}
        method = "GET" if request.method == b"HEAD" else request.method.decode("ascii", "replace")
        handler = handlers.get(method)
        if handler is None:
            allowed = [name for name, known in handlers.items() if known is not None]
            if not allowed:
                return await site.page(request, pages.not_found(session), 404)
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return await site.page(request, pages.layout("Method not allowed", [], session), 405)
        if self.signed and session is None:
            return site.redirect(request, "/console/sign-in")
        if method == "POST" and self.signed and not hmac.compare_digest(_arg(request, "csrf").encode(), session.csrf.encode()):
            return await site.page(request, pages.layout("Expired form", [pages.tags.p("The form expired; go back, reload and try again.")], session), 403)
        try:
            await handler(request, session)
        except NotFound:
            await site.page(request, pages.not_found(session), 404)
        except Forbidden:
            await site.page(request, pages.forbidden(session), 403)
        except Withheld as e:
            await site.page(request, pages.withheld_page(session, str(e)), 403)

    def failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("console request {path} failed", failure, path=request.path.decode("utf-8", "replace"))
        if not request.startedWriting and not request.finished:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"internal error; see the daemon's log\n")
            request.finish()


class Withheld(Exception):
    """Infected content no admin released: a page says so instead of the download."""


def _withhold(content: dict, message: dict) -> None:
    if withheld(content, message):
        raise Withheld(content.get("virus_detail") or "infected")


# signing in and out


class _Home(_Page):
    async def get(self, request: server.Request, session: ConsoleSession | None) -> None:
        self.site.redirect(request, "/console/orgs")


class _SignIn(_Page):
    async def get(self, request: server.Request, session: ConsoleSession | None) -> None:
        await self.site.page(request, pages.sign_in(self.site.sign_in_token(request)))

    async def post(self, request: server.Request, session: ConsoleSession | None) -> None:
        site = self.site
        client = client_key(request)
        try:
            site.api.throttle.sign_in(client)
        except TooManyFailures as e:
            request.setHeader(b"retry-after", str(e.retry_after).encode())
            return await site.page(request, pages.sign_in(site.sign_in_token(request), str(e).capitalize() + "."), 429)
        expected = request.getCookie(SIGN_IN_COOKIE) or b""
        if not expected or not hmac.compare_digest(_arg(request, "csrf").encode(), expected):
            site.api.throttle.log("console: sign-in without its form's token from {client}", client=client)
            page = pages.sign_in(site.sign_in_token(request), "The form expired; sign in again.")
            return await site.page(request, page, 403)
        token = _arg(request, "token").strip()
        try:
            if not token:
                raise UnknownToken()
            scope = await token_scope(site.store, site.api.admin_hash, token)
        except UnknownToken:
            site.api.throttle.failed(client, "console")
            return await site.page(request, pages.sign_in(site.sign_in_token(request), "That token is not known, or it was revoked."), 401)
        session = site.sessions.open(scope, token_hash(token))
        request.addCookie(
            COOKIE, session.id.encode(), path=b"/console", httpOnly=True, secure=site.secure(request), sameSite="strict"
        )
        request.addCookie(
            SIGN_IN_COOKIE, b"", path=SIGN_IN_PATH, httpOnly=True, secure=site.secure(request), sameSite="strict", max_age=b"0"
        )
        log.info("console sign-in: {who}", who=session.who)
        site.redirect(request, "/console/orgs")


class _SignOut(_Page):
    signed = True

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        self.site.sessions.close(session.id)
        request.addCookie(COOKIE, b"", path=b"/console", httpOnly=True, secure=self.site.secure(request), sameSite="strict", max_age=b"0")
        self.site.redirect(request, "/console/sign-in")


class _Stylesheet(_Page):
    async def get(self, request: server.Request, session: ConsoleSession | None) -> None:
        with open(os.path.join(STATIC, "console.css"), "rb") as f:
            body = f.read()
        request.setHeader(b"content-type", b"text/css; charset=utf-8")
        request.setHeader(b"cache-control", b"max-age=3600")
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


class _Static(_Page):
    below = {b"console.css": _Stylesheet}


# the pages


class _OrgMessages(_Page):
    signed = True

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        site, id = self.site, self.id
        orgs = await site.store.org_summaries(datetime.now(timezone.utc), id)
        if not orgs or (session.scope is not None and session.scope != id):
            raise NotFound()
        filters = {name: _arg(request, name) for name in ("q", "status", "sender", "from", "to", "cursor")}
        try:
            search = _search_arguments(filters)
        except BadFilter as e:
            return await site.page(request, pages.messages(orgs[0], [], filters, None, session, str(e)), 400)
        rows = await site.store.search_messages(id, limit=PAGE_SIZE + 1, **search)
        cursor = encode_cursor(rows[PAGE_SIZE - 1]["id"]) if len(rows) > PAGE_SIZE else None
        if rows.searched_to is not None:
            cursor = encode_cursor(rows.searched_to["id"])
        domains = await site.store.list_domains(org_id=id)
        page = pages.messages(orgs[0], rows[:PAGE_SIZE], filters, cursor, session, domains=domains, searched_to=rows.searched_to)
        await site.page(request, page)


class _Org(_Page):
    below = {b"messages": _OrgMessages}


class _Orgs(_Page):
    signed = True
    item = _Org

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        today = datetime.combine(datetime.now(timezone.utc).date(), time(), timezone.utc)
        orgs = await self.site.store.org_summaries(today, session.scope)
        await self.site.page(request, pages.organisations(orgs, session))


class _Raw(_Page):
    signed = True

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        row = self.site.scoped(await self.site.store.get_message(self.id), session)
        if await self.site.refuse_deleted(request, row, session):
            return
        _withhold(row, row)
        await self.site.stream(request, row["raw_key"], row["raw_size"], "application/octet-stream", f"message-{self.id}.eml")


class _Action(_Page):
    """An admin's action on a message: its GET is the page that asks (a link reaches it), its form's POST does it."""

    signed = True
    action = ""

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        await self.site.confirm(request, session, self.id, self.action)

    async def applicable(self, row: dict, do) -> None:
        """C{do()}, unless the page's test of this action refuses C{row} (then L{Inapplicable}, with its reason)."""
        reason = pages.inapplicable(row, self.action)
        if reason:
            raise Inapplicable(reason)
        await do()


class _Reprocess(_Action):
    action = "reprocess"

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        id = self.id
        row = await self.site.store.get_message(id)

        change = lambda: self.applicable(row, lambda: self.site.store.reprocess(id))
        await self.site.act(request, session, row, change, f"Message {id} is queued for reprocessing.", id)


class _Release(_Action):
    action = "release"

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        id = self.id
        row = await self.site.store.get_message(id)
        notice = f"Message {id} is released from quarantine and queued for extraction."
        await self.site.act(request, session, row, lambda: self.site.store.release(id), notice, id)


class _AllowInfected(_Action):
    """The admin's word that an infected message's content may be downloaded: the console's C{release --allow-infected}."""

    action = "allow-infected"

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        site, id = self.site, self.id
        if not session.admin:
            raise Forbidden()
        row = site.scoped(await site.store.get_message(id), session)
        if _arg(request, "consent") != "yes" and not pages.inapplicable(row, self.action):
            refusal = "Nothing was released: tick the box to confirm that infected content will be downloadable."
            return await site.page(request, pages.confirm(row, self.action, session, refusal), 400)

        change = lambda: self.applicable(row, lambda: allow_infected(site.store, row))
        await site.act(request, session, row, change, "; ".join(allowed_lines(row)), id)


class _Erase(_Action):
    action = "erase"

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        id = self.id
        row = await self.site.store.get_message(id)
        notice = f"Message {id} is erased: its raw copy and documents are deleted, its tombstone kept."

        async def change() -> None:
            await erase_message(self.site.store, self.site.blobs, id, "console: " + session.who)

        await self.site.act(request, session, row, change, notice, id)


class _MessagePage(_Page):
    signed = True
    below = {
        b"raw": _Raw,
        b"reprocess": _Reprocess,
        b"release": _Release,
        b"allow-infected": _AllowInfected,
        b"erase": _Erase,
    }

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        site, id = self.site, self.id
        row = site.scoped(await site.store.get_message(id), session)
        documents = await site.store.list_documents(message_id=id)
        events = await site.store.message_events(id)
        history = await site.store.status_history(id)
        # An incinerated message's raw copy is gone: its page shows the tombstone, never a 500.
        headers, truncated = ([], False) if gone(row) else read_headers(await head_of(site.blobs, row["raw_key"]))
        await site.page(request, pages.message(row, headers, truncated, documents, events, session, history))
        session.notice = None


class _MessagesPage(_Page):
    item = _MessagePage


class _DocumentDownload(_Page):
    signed = True

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        row = self.site.scoped(await self.site.store.get_document(self.id), session)
        if await self.site.refuse_deleted(request, row, session):
            return
        if row.get("virus") == "infected":
            _withhold(row, await self.site.store.get_message(row["inbound_message_id"]))
        await self.site.stream(request, row["storage_key"], row["size"], "application/octet-stream", row["filename"])


class _Redeliver(_Page):
    signed = True

    async def post(self, request: server.Request, session: ConsoleSession) -> None:
        site, id = self.site, self.id
        event = site.scoped(await site.store.get_event(id), session)
        notice = f"Webhook event {event['event_id']} will be delivered again now."
        await site.act(request, session, event, lambda: site.store.redeliver(id), notice, event["inbound_message_id"])


class _Status(_Page):
    signed = True

    async def get(self, request: server.Request, session: ConsoleSession) -> None:
        """Every backend question bounded like C{/readyz}'s, so a hung database cannot hang the page; an organisation's figures only its own."""
        site = self.site
        readiness = run_checks(site.checks, site.check_timeout, site.clock)
        queue = site.bounded_count(lambda: site.store.count_messages("received", org_id=session.scope))
        outbox = site.bounded_count(lambda: site.store.count_events("pending", org_id=session.scope))
        depths = await defer.gatherResults([queue, outbox])
        await site.page(request, pages.status(*depths, site.rejections.last_hour(), await readiness, session))


class ConsoleResource(_Home):
    """The console's root (C{/console}), holding what its pages share."""

    below = {
        b"": _Home,
        b"sign-in": _SignIn,
        b"sign-out": _SignOut,
        b"static": _Static,
        b"orgs": _Orgs,
        b"messages": _MessagesPage,
        b"documents": numbered(_Page, {b"content": _DocumentDownload}),
        b"events": numbered(_Page, {b"redeliver": _Redeliver}),
        b"status": _Status,
    }

    def __init__(
        self,
        store: "IReadStore | ISearchStore | IExtractionQueue | IQuarantineStore | IOutboxStore | IOrgStore",
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
        super().__init__(self)
        self.https = https
        self.checks = dict(checks)
        self.clock = clock
        self.check_timeout = check_timeout
        self.store = store
        self.blobs = blobs
        self.api = api
        self.sessions = sessions
        self.rejections = rejections

    async def page(self, request: server.Request, page, status: int = 200) -> None:
        body = await flattenString(request, page)
        if request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", str(len(body) + 15).encode())
        if request.method != b"HEAD":
            request.write(b"<!DOCTYPE html>" + body)
        request.finish()

    def redirect(self, request: server.Request, url: str) -> None:
        request.setResponseCode(303)
        request.setHeader(b"location", url.encode("ascii"))
        request.setHeader(b"content-length", b"0")
        request.finish()

    async def refuse_deleted(self, request: server.Request, row: dict, session: ConsoleSession) -> bool:
        """A 410 page for a raw copy or document that retention or erasure deleted; False when it is kept."""
        reason = gone(row)
        if reason is None:
            return False
        await self.page(request, pages.layout("Content deleted", [pages.tags.p(reason.capitalize() + ".")], session), 410)
        return True

    def scoped(self, row: dict | None, session: ConsoleSession, key: str = "org_id") -> dict:
        if row is None or (session.scope is not None and row[key] != session.scope):
            raise NotFound()
        return row

    def secure(self, request: server.Request) -> bool:
        """Whether cookies get C{Secure}: from the operator's setting or our own TLS, never from a request header."""
        return self.https or request.isSecure()

    def sign_in_token(self, request: server.Request) -> str:
        """The pre-session token of the sign-in form: its cookie's, or a new one set now."""
        token = request.getCookie(SIGN_IN_COOKIE) or b""
        if not _SIGN_IN_TOKEN.match(token):
            token = secrets.token_urlsafe(32).encode()
            request.addCookie(SIGN_IN_COOKIE, token, path=SIGN_IN_PATH, httpOnly=True, secure=self.secure(request), sameSite="strict")
        return token.decode()

    async def stream(self, request: server.Request, key: str, size: int, content_type: str, filename: str) -> None:
        try:
            await self.api.stream(request, key, size, content_type, filename)
        except ApiError:
            raise NotFound() from None

    def bounded_count(self, count: Check) -> defer.Deferred:
        return bounded(count, self.check_timeout, self.clock).addErrback(lambda failure: "unknown: " + describe_failure(failure))

    async def act(self, request: server.Request, session: ConsoleSession, row: dict | None, change, notice: str, page: int) -> None:
        """An admin's action on a row the session may see: done, logged, confirmed on the message's page."""
        if not session.admin:
            raise Forbidden()
        self.scoped(row, session)
        try:
            await change()
        except (NoSuchMessage, NoSuchEvent):
            raise NotFound() from None
        except (NotQuarantined, Inapplicable, MessageHeld, NotErasable, ContentGone) as e:
            session.notice = str(e)
        else:
            session.notice = notice
            log.info("console: {who}: {notice}", who=session.who, notice=notice)
        self.redirect(request, f"/console/messages/{page}")

    async def confirm(self, request: server.Request, session: ConsoleSession, id: int, action: str) -> None:
        """The page that asks before an admin's action on a message."""
        if not session.admin:
            raise Forbidden()
        row = self.scoped(await self.store.get_message(id), session)
        await self.page(request, pages.confirm(row, action, session), 409 if pages.inapplicable(row, action) else 200)


def make_site(
    store: "IReadStore | ISearchStore | IExtractionQueue | IQuarantineStore | IOutboxStore | IOrgStore | ISchemaStore",
    blobs,
    clock,
    rejections: RejectionHistory,
    admin_token: str | None = None,
    api_url: str | None = None,
    checks: Mapping[str, Check] | None = None,
    mail_host: str | None = None,
) -> server.Site:
    """The site of C{--api}: the JSON API and the console (whose status page runs C{checks}, by default the database's and storage's)."""
    api = ApiResource(store, blobs, admin_token, api_url, AuthThrottle(clock), mail_host)
    checks = {"database": store.check, "storage": blobs.check} if checks is None else checks
    https = api_url is not None and api_url.startswith("https://")
    console = ConsoleResource(store, blobs, api, Sessions(clock), rejections, checks, clock, https=https)
    api.putChild(b"console", console)
    return OpsSite(api)
