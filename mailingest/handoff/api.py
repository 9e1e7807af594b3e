"""
The JSON API (C{--api}), served by twisted.web in the daemon's reactor: read-only but
for the admin token's erasure of a message (C{DELETE /v1/messages/{id}}).

Each request carries a bearer token: an organisation's token sees only its
own rows (another organisation's id answers 404, as a missing one does, so
ids cannot be probed); the admin token (from a file) sees all. Tokens are
kept as SHA-256 hashes. Errors are JSON with a stable C{error} code.
Message and document contents are streamed from the blob store: from local
disk by a producer that reads a chunk when the client has taken the last
one, so a 50 MB document never sits in memory. Each endpoint is a small
resource of a twisted.web tree (L{mailingest.ops.web}) rooted at L{ApiResource}.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from datetime import datetime, timezone
from urllib.parse import quote

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server, static

from mailingest.errors import BlobNotFound, ConfigError, DomainTaken, MessageHeld, NoSuchDomain, NoSuchOrg, NotErasable
from mailingest.handoff import openapi
from mailingest.delivery.domains import new_token as new_domain_token
from mailingest.handoff.api_domains import ApiError, MAX_REQUEST_BODY, admin_only, domain_json, domain_request
from mailingest.handoff.events import document_object, message_object, withheld
from mailingest.handoff.throttle import AuthThrottle, TooManyFailures, client_key
from mailingest.interfaces import IDomainStore, IOrgStore, IReadStore
from mailingest.ops.web import Node
from mailingest.storage.retention import erase_message, gone
from mailingest.storage.store import MESSAGE_STATUSES
from mailingest.verification.domain_proof import dns_records
from mailingest.timestamps import iso

log = Logger(namespace="mailingest.api")

TOKEN_PREFIX = "mit_"
DEFAULT_PAGE = 50
MAX_PAGE = 200
MAX_ID = 2**63 - 1  # the largest id a database integer holds
_LIMIT = re.compile(r"^[0-9]{1,3}$")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses
_CURSOR = re.compile(r"^m[0-9]{1,19}$")
_SAFE_CONTENT_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]")
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*$")
# The admin token's minimum, 128 bits in form: base64 carries 6 bits a character, hex 4.
MIN_TOKEN_BASE64 = 22
MIN_TOKEN_HEX = 32
MIN_TOKEN_DISTINCT = 8
# A download is the sender's bytes: should a browser ever display one (an HTML
# or SVG document) instead of saving it, it runs in an opaque origin, no script.
DOWNLOAD_CSP = b"sandbox; default-src 'none'; frame-ancestors 'none'"


def new_token() -> str:
    """A new API token: shown once, kept only as its L{token_hash}."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UnknownToken(Exception):
    """A token that is neither the admin token nor a live organisation token."""


async def token_scope(store: IOrgStore, admin_hash: str | None, token: str) -> int | None:
    """The organisation id a token sees, None for the admin token (the API's and the console's one check)."""
    digest = token_hash(token.strip())
    if admin_hash is not None and hmac.compare_digest(digest, admin_hash):
        return None
    org = await store.token_org(digest)
    if org is None:
        raise UnknownToken()
    return org["id"]


def refuse_infected(content: dict, message: dict) -> None:
    """Infected content is not handed over until an admin releases it with --allow-infected."""
    if withheld(content, message):
        raise ApiError(403, "infected", f"infected ({content.get('virus_detail')}): not released by an admin")


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def safe_content_type(value: str) -> str:
    """A document's type as its sender declared it, if it is a plain type/subtype; else octet-stream."""
    value = (value or "").strip().lower()
    return value if _SAFE_CONTENT_TYPE.match(value) else "application/octet-stream"


def content_disposition(filename: str) -> str:
    """An attachment header no filename can break out of: an ASCII fallback and the RFC 5987 UTF-8 name."""
    fallback = _UNSAFE_FILENAME.sub("_", filename)[:200] or "document"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def encode_cursor(message_id: int) -> str:
    """An opaque page cursor (the API and the console page the same way): newest first, below this id."""
    return base64.urlsafe_b64encode(f"m{message_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The message id of a cursor; only ids a database integer holds, so a forged one is a 400, not the database's error."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if _CURSOR.match(text) and int(text[1:]) <= MAX_ID:
            return int(text[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ApiError(400, "bad_cursor", "cursor is not one this API gave")


def _parse_since(text: str) -> datetime:
    """A time as UTC: one whose UTC form is outside the calendar (year 1 at +14:00) is refused here, not by the database."""
    try:
        value = datetime.fromisoformat(text)
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    except ValueError:
        raise ApiError(400, "bad_parameter", "since must be an ISO 8601 time, e.g. 2025-01-31T00:00:00Z") from None
    except OverflowError:
        raise ApiError(400, "bad_parameter", "since is out of range: its UTC time must be within years 1 to 9999") from None


def _parse_limit(text: str) -> int:
    if not _LIMIT.match(text) or not 1 <= int(text) <= MAX_PAGE:
        raise ApiError(400, "bad_parameter", f"limit must be 1 to {MAX_PAGE}")
    return int(text)


def _parse_status(text: str) -> str:
    if text not in MESSAGE_STATUSES:
        raise ApiError(400, "bad_parameter", "status must be one of " + ", ".join(MESSAGE_STATUSES))
    return text


class _RequestSink:
    """A file object over a request, for blob stores that write what they read (S3)."""

    def __init__(self, request: server.Request):
        self.request = request

    def write(self, data: bytes) -> None:
        self.request.write(data)


class _Path(Node):
    """
    A path of the API: GET and HEAD only (405 otherwise, on any path, before
    routing) but for the admin's custom domain paths, which list their
    C{methods}; errors as JSON with their code; a path that is no endpoint, or
    anything below one, is C{no_route}.
    """

    methods = (b"GET", b"HEAD")

    def missing(self) -> resource.IResource:
        return _Path(self.site)

    async def answer(self, request: server.Request) -> None:
        try:
            if request.method not in self.methods:
                request.setHeader(b"allow", b", ".join(self.methods))
                if self.methods == _Path.methods:
                    raise ApiError(405, "method_not_allowed", "this API is read-only: GET and HEAD only")
                raise ApiError(405, "method_not_allowed", "allowed here: " + b", ".join(self.methods).decode())
            if request.method in (b"GET", b"HEAD"):
                await self.get(request)
            else:
                await self.change(request, await self.site.authorize(request))
        except ApiError as e:
            self.site.send_json(request, {"error": e.code, "message": str(e)}, e.status)
        except TooManyFailures as e:
            request.setHeader(b"retry-after", str(e.retry_after).encode())
            self.site.send_json(request, {"error": e.code, "message": str(e)}, 429)

    async def get(self, request: server.Request) -> None:
        raise ApiError(404, "no_route", "no such endpoint; see /v1/openapi.json")

    async def change(self, request: server.Request, scope: int | None) -> None:
        raise NotImplementedError

    def failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("API request {path} failed", failure, path=request.path.decode("utf-8", "replace"))
        if not request.startedWriting and not request.finished:
            self.site.send_json(request, {"error": "internal", "message": "internal error; see the daemon's log"}, 500)


class _Endpoint(_Path):
    """An endpoint: it answers for the organisation the request's token sees (L{read}), unless it is C{public}."""

    public = False

    async def get(self, request: server.Request) -> None:
        await self.read(request, None if self.public else await self.site.authorize(request))

    async def read(self, request: server.Request, scope: int | None) -> None:
        raise NotImplementedError


def _gone(row: dict) -> ApiError:
    """A message incinerated, or a document deleted: the tombstone is there, its content is not (410, never a 500)."""
    return ApiError(410, "incinerated" if "status" in row else "deleted", gone(row))


class _MessageRaw(_Endpoint):
    async def read(self, request: server.Request, scope: int | None) -> None:
        row = await self.site.row(self.site.store.get_message, self.id, scope, "message")
        if gone(row):
            raise _gone(row)
        refuse_infected(row, row)
        await self.site.stream(request, row["raw_key"], row["raw_size"], "message/rfc822", f"message-{self.id}.eml")


class _Message(_Endpoint):
    below = {b"raw": _MessageRaw}
    methods = (b"GET", b"HEAD", b"DELETE")

    async def read(self, request: server.Request, scope: int | None) -> None:
        row = await self.site.row(self.site.store.get_message, self.id, scope, "message")
        await self.send_message(request, row)

    async def send_message(self, request: server.Request, row: dict) -> None:
        documents = await self.site.store.list_documents(message_id=self.id)
        self.site.send_json(request, dict(self.site.message_json(row), documents=[self.site.document_json(d) for d in documents]))

    async def change(self, request: server.Request, scope: int | None) -> None:
        """Erase the message (DELETE, admin token only): 200 with its tombstone, 409 when held or not erasable now."""
        if scope is not None:
            raise ApiError(403, "forbidden", "only the admin token may erase messages")
        await self.site.row(self.site.store.get_message, self.id, None, "message")
        try:
            await erase_message(self.site.store, self.site.blobs, self.id, "api:admin")
        except MessageHeld as e:
            raise ApiError(409, "held", str(e)) from None
        except NotErasable as e:
            raise ApiError(409, "not_erasable", str(e)) from None
        await self.send_message(request, await self.site.store.get_message(self.id))


class _Messages(_Endpoint):
    item = _Message

    async def read(self, request: server.Request, scope: int | None) -> None:
        args = {k.decode(): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
        limit = _parse_limit(args["limit"]) if "limit" in args else DEFAULT_PAGE
        rows = await self.site.store.page_messages(
            org_id=scope,
            status=_parse_status(args["status"]) if args.get("status") else None,
            since=_parse_since(args["since"]) if args.get("since") else None,
            before_id=decode_cursor(args["cursor"]) if args.get("cursor") else None,
            limit=limit + 1,
        )
        page = rows[:limit]
        cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
        self.site.send_json(request, {"messages": [self.site.message_json(row) for row in page], "next_cursor": cursor})


class _DocumentContent(_Endpoint):
    async def read(self, request: server.Request, scope: int | None) -> None:
        row = await self.site.row(self.site.store.get_document, self.id, scope, "document")
        if gone(row):
            raise _gone(row)
        if row.get("virus") == "infected":
            refuse_infected(row, await self.site.store.get_message(row["inbound_message_id"]))
        await self.site.stream(request, row["storage_key"], row["size"], safe_content_type(row["content_type"]), row["filename"])


class _Document(_Endpoint):
    below = {b"content": _DocumentContent}

    async def read(self, request: server.Request, scope: int | None) -> None:
        row = await self.site.row(self.site.store.get_document, self.id, scope, "document")
        self.site.send_json(request, self.site.document_json(row))


class _Documents(_Path):
    item = _Document


class _Domain(_Endpoint):
    """One custom domain: an organisation's token sees its own; the admin's removes it (DELETE)."""

    methods = (b"GET", b"HEAD", b"DELETE")

    async def read(self, request: server.Request, scope: int | None) -> None:
        row = await self.site.row(self.site.store.get_domain_by_id, self.id, scope, "domain")
        self.site.send_json(request, domain_json(row))

    async def change(self, request: server.Request, scope: int | None) -> None:
        admin_only(scope)
        row = await self.site.row(self.site.store.get_domain_by_id, self.id, None, "domain")
        try:
            await self.site.store.remove_domain(row["domain"])
        except NoSuchDomain:
            raise _not_found("domain") from None
        self.site.send_json(request, dict(domain_json(row), status="removed"))


class _Domains(_Endpoint):
    """The custom domains an organisation's token sees (its own) or the admin's (all); the admin's adds one (POST)."""

    methods = (b"GET", b"HEAD", b"POST")
    item = _Domain

    async def read(self, request: server.Request, scope: int | None) -> None:
        rows = await self.site.store.list_domains(org_id=scope)
        self.site.send_json(request, {"domains": [domain_json(row) for row in rows]})

    async def change(self, request: server.Request, scope: int | None) -> None:
        admin_only(scope)
        slug, key, parts = domain_request(request.content.read(MAX_REQUEST_BODY + 1))
        try:
            row = await self.site.store.add_domain(slug, key, new_domain_token(), parts)
        except NoSuchOrg as e:
            raise ApiError(422, "no_such_organization", str(e)) from None
        except DomainTaken as e:
            raise ApiError(409, "domain_taken", str(e)) from None
        records = dns_records(key, row["token"], self.site.mail_host) if self.site.mail_host else []
        self.site.send_json(request, dict(domain_json(row), token=row["token"], dns_records=records), 201)


class _OpenApi(_Endpoint):
    public = True

    async def read(self, request: server.Request, scope: None) -> None:
        self.site.send_json(request, openapi.DOCUMENT)


class _Audit(_Endpoint):
    async def read(self, request: server.Request, scope: int | None) -> None:
        """The audit trail, newest first: an organisation's token sees its own organisation's rows."""
        args = {k.decode(): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
        limit = _parse_limit(args["limit"]) if "limit" in args else DEFAULT_PAGE
        before = decode_cursor(args["cursor"]) if args.get("cursor") else None
        rows = await self.site.store.list_audit(org_id=scope, before_id=before, limit=limit + 1)
        page = rows[:limit]
        cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
        self.site.send_json(request, {"entries": [audit_json(row) for row in page], "next_cursor": cursor})


def audit_json(row: dict) -> dict:
    return {
        "id": row["id"],
        "at": iso(row["at"]),
        "actor": row["actor"],
        "action": row["action"],
        "organization": row["org_slug"],
        "message_id": row["inbound_message_id"],
        "document_id": row["document_id"],
        "hold_id": row["hold_id"],
        "reason": row["reason"],
        "sha256": row["sha256"],
    }


class _V1(_Path):
    below = {b"messages": _Messages, b"documents": _Documents, b"domains": _Domains, b"audit": _Audit, b"openapi.json": _OpenApi}


class ApiResource(_Path):
    """The API's site root (C{/}), holding what its endpoints share; the console is put below it by L{make_site}."""

    below = {b"v1": _V1}

    def __init__(
        self, store: "IReadStore | IOrgStore | IDomainStore", blobs, admin_token: str | None = None, api_url: str | None = None,
        throttle: AuthThrottle | None = None, mail_host: str | None = None,
    ):
        super().__init__(self)
        self.mail_host = mail_host
        if throttle is None:
            from twisted.internet import reactor

            throttle = AuthThrottle(reactor)
        self.throttle = throttle
        self.store = store
        self.blobs = blobs
        self.admin_hash = token_hash(admin_token) if admin_token else None
        self.api_url = api_url

    # The API's endpoints as (template, class), e.g. ("/v1/messages/{id}", _Message): what the OpenAPI document lists.
    routes = [(template, node) for template, node in _V1.paths("/v1") if issubclass(node, _Endpoint)]

    def send_json(self, request: server.Request, body, status: int = 200) -> None:
        if request.finished or request._disconnected:
            return
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(data)).encode())
        if request.method != b"HEAD":
            request.write(data)
        request.finish()

    async def authorize(self, request: server.Request) -> int | None:
        """The organisation id the token sees, None for the admin token; 401 otherwise."""
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            request.setHeader(b"www-authenticate", b'Bearer realm="mailingest"')
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        client = client_key(request)
        self.throttle.check(client, "api")
        try:
            return await token_scope(self.store, self.admin_hash, token)
        except UnknownToken:
            self.throttle.failed(client, "api")
            request.setHeader(b"www-authenticate", b'Bearer realm="mailingest", error="invalid_token"')
            raise ApiError(401, "unauthorized", "unknown or revoked token") from None

    async def row(self, fetch, row_id: int, scope: int | None, what: str) -> dict:
        row = await fetch(row_id)
        if row is None or (scope is not None and row["org_id"] != scope):
            raise _not_found(what)
        return row

    def message_json(self, row: dict) -> dict:
        return {
            **message_object(row["id"], row, row["status"], row["last_error"], self.api_url),
            "organization": row["org_slug"],
            "parsed_at": iso(row["parsed_at"]),
            "raw_size": row["raw_size"],
            "raw_sha256": row["raw_sha256"],
            "incinerated_at": iso(row["incinerated_at"]),
            "incinerated_reason": row["incinerated_reason"],
        }

    def document_json(self, row: dict) -> dict:
        return {
            **document_object(row, self.api_url),
            "message_id": row["inbound_message_id"],
            "created_at": iso(row["created_at"]),
            "deleted_at": iso(row["deleted_at"]),
        }

    async def stream(self, request: server.Request, key: str, size: int, content_type: str, filename: str) -> None:
        """Send a blob as a download, streamed (the console's downloads use it too)."""
        path = self.blobs.local_path(key)
        blob = None
        if path is not None:
            try:
                blob = open(path, "rb")
            except FileNotFoundError:
                raise ApiError(404, "content_missing", "the stored content is missing; see the daemon's log") from None
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"content-disposition", content_disposition(filename).encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", DOWNLOAD_CSP)
        if request.method == b"HEAD":
            if blob is not None:
                blob.close()
            request.finish()
            return
        if blob is not None:
            static.NoRangeStaticProducer(request, blob).start()
            return
        try:
            await self.blobs.read_to(key, _RequestSink(request))
        except BlobNotFound:
            raise ApiError(404, "content_missing", "the stored content is missing; see the daemon's log") from None
        except Exception:
            if request.startedWriting:
                request.loseConnection()  # a short body must not pass for a whole one
                return
            raise
        if not request.finished and not request._disconnected:
            request.finish()


def read_admin_token(path: str | None) -> str | None:
    """The admin token of C{--api-admin-token-file}: its first line."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"cannot read --api-admin-token-file {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"--api-admin-token-file {path} is empty")
    if not strong_enough(token):
        raise ConfigError(
            f"--api-admin-token-file {path}: the admin token is too weak ({len(token)} characters); it needs 128 bits of "
            f"randomness: at least {MIN_TOKEN_BASE64} base64 characters (A-Z a-z 0-9 + / - _) or {MIN_TOKEN_HEX} hex digits, with at least "
            f"{MIN_TOKEN_DISTINCT} different characters. Make one with: mailingest admin-token --write {path}"
        )
    return token


def strong_enough(token: str) -> bool:
    """
    Whether a token can hold 128 random bits by its form: 32 hex digits, or 22
    characters of base64 (standard or URL-safe: 6 bits each), not a few
    characters repeated. The form cannot prove randomness, only refuse what
    cannot be (a word, a short password, "xxxx...").
    """
    text = token.rstrip("=")
    if not _BASE64.match(text):
        return False
    needed = MIN_TOKEN_HEX if _HEX.match(text) else MIN_TOKEN_BASE64
    return len(text) >= needed and len(set(text)) >= MIN_TOKEN_DISTINCT
