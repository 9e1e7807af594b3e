"""
The delivery policy behind the SMTP dialogue: who we accept mail for, and how an
accepted message is kept.

At end of DATA the spool is made durable, the raw copy is stored in object
storage, then the rows are committed in one transaction; only then does the
protocol answer 250. Any failure on that path becomes a 451 and leaves no row;
a blob written before the failure is removed unless a committed row might
refer to it (an ambiguous commit), where an invisible orphan is the safe side.
"""

import email.header
import functools
import hashlib
import ipaddress
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailingest.ops import metrics
from mailingest.timestamps import PerSecond
from mailingest.encoded_words import decode_header
from mailingest.interfaces import Collision, Duplicate, IDeliveryOutcome, IIntakeStore
from mailingest.delivery.directory import OrgDirectory
from mailingest.delivery.received import printable
from mailingest.delivery.domains import recipient_domain_key
from mailingest.delivery.routing import POSTMASTER_SLUG, normalise_domain, parse_recipient, unquote_local, valid_slug
from mailingest.delivery.spool import Spool

SOURCE = "smtp"
MAX_MESSAGE_ID = 900
MAX_SUBJECT = 998
STORE_TIMEOUT_SECONDS = 30.0
# Room for a 998-character subject in encoded words (base64 UTF-8 CJK).
MAX_ENCODED_SUBJECT = 4096
# What the author wrote, as opposed to the trace headers relays add.
ORIGINATOR_HEADERS = ("From", "To", "Cc", "Date", "Subject")

log = Logger(namespace="mailingest.delivery")


@dataclass(frozen=True)
class Recipient:
    """Who a recipient address is for, and the domain it came in on (ours or the organisation's own)."""

    org_id: int
    slug: str
    address: str
    domain: str = ""


@dataclass
class Envelope:
    """One SMTP transaction as the session saw it; C{proxy} is the load balancer that relayed it, if any."""

    id: str
    peer: str
    helo: str
    mail_from: str
    proxy: str | None = None
    tls: str | None = None
    recipients: list[Recipient] = field(default_factory=list)
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@implementer(IDeliveryOutcome)
@dataclass(frozen=True)
class Outcome:
    """
    The row of each organisation's copy, in recipient order: new ones, and
    for a L{Duplicate} the row that already held it.
    """

    rows: list[tuple[Recipient, int]]

    @property
    def ids(self) -> list[int]:
        return [row_id for _, row_id in self.rows]


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    """Asked for every message; a session's client sends many, and parsing the address is not free."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def new_transaction_id() -> str:
    return uuid.uuid4().hex


def message_id_of(value: str | None) -> str | None:
    """The Message-ID header value, unfolded and trimmed, or None when missing or empty."""
    if value is None:
        return None
    value = " ".join(value.split())
    if not value:
        return None
    if len(value) > MAX_MESSAGE_ID:
        return None
    return value


def synthetic_message_id(sent_sha256: str) -> str:
    """Deterministic: the same bytes sent again get the same id."""
    return f"<sha256-{sent_sha256}@mailingest.invalid>"


def content_sha256(originators: dict[str, str | None], body_sha256: str) -> str:
    """
    What tells a retry from another message reusing its Message-ID: the
    originator headers, unfolded and whitespace-collapsed, and the body.
    Trace headers (Received, Return-Path, DKIM and ARC signatures, X-*) are
    left out, so a copy that came by another relay is the same message.
    """
    digest = hashlib.sha256()
    for name in ORIGINATOR_HEADERS:
        value = originators[name]
        if value is not None:
            digest.update(f"{name.lower()}: {' '.join(value.split())}\n".encode("utf-8", "replace"))
    digest.update(b"\n" + body_sha256.encode("ascii"))
    return digest.hexdigest()


def subject_of(text: str | None) -> str | None:
    """
    The decoded Subject, on the reactor thread: the raw value is cut to
    C{MAX_ENCODED_SUBJECT} characters and decoded in linear time, so a hostile
    one costs at most about 2 ms.
    """
    if text is None:
        return None
    text = text[:MAX_ENCODED_SUBJECT]
    if "=?" in text:
        try:
            text = str(email.header.make_header(decode_header(text)))
        except Exception:
            pass
    return " ".join(text.split())[:MAX_SUBJECT]


_RAW_DAY = PerSecond(lambda moment: moment.strftime("raw/%Y/%m/%d/"))


def raw_key(envelope: Envelope) -> str:
    """Object storage key of a raw message: our date and transaction id only."""
    return f"{_RAW_DAY(envelope.received_at.timestamp())}{envelope.id}.eml"


def within(work: defer.Deferred, seconds: float, clock, what: str) -> defer.Deferred:
    """
    C{work}'s result, or a TimeoutError after C{seconds} while C{work} goes
    on: a database insert cannot be called back, it may still commit (the
    sender's retry is then a duplicate), and C{work} itself still decides
    whether its raw blob is referenced before it removes it.
    """
    answer = defer.Deferred()
    timer = clock.callLater(
        seconds, lambda: answer.errback(TimeoutError(f"storage took longer than {seconds:g} s"))
    )

    def finished(result):
        if timer.active():
            timer.cancel()
            answer.callback(result)
        elif isinstance(result, Failure):
            log.warn("{what} failed after its store timeout: {error}", what=what, error=result.getErrorMessage())
        else:
            log.warn("{what} stored after its store timeout (answered 451): its retry will be a duplicate", what=what)

    work.addBoth(finished)
    return answer


class Ingest:
    """
    Shared by every session: which recipients we accept (C{route}) and how an
    accepted message is kept (C{deliver}). Twisted's delivery seam
    (L{mailingest.delivery.transaction}) puts one transaction at a time in
    front of it.
    """

    def __init__(
        self, store: IIntakeStore, blobs, directory: OrgDirectory, domains, hostname: str, spool_dir: str,
        store_timeout: float = STORE_TIMEOUT_SECONDS, clock=None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.store_timeout = store_timeout
        self.clock = clock
        self.store = store
        self.blobs = blobs
        self.directory = directory
        self.domains = {normalise_domain(d) for d in domains}
        self.hostname = hostname
        self.spool_dir = spool_dir
        self.on_stored = []

    def route(self, user: smtp.User) -> defer.Deferred:
        """
        Fire with the L{Recipient} C{user} is delivered to, or fail with
        L{smtp.SMTPBadRcpt} carrying the reply (550 refused, 451 when the
        organisation cannot be looked up).
        """
        local = user.dest.local.decode("utf-8", "replace")
        domain = user.dest.domain.decode("utf-8", "replace")
        route = parse_recipient(local, domain)
        address = f"{local}@{domain}"
        # RFC 5321 4.5.1: postmaster at each of our domains, and <postmaster>
        # without a domain, which the protocol gives our host name.
        if route.domain in self.domains or (route.postmaster and route.domain == normalise_domain(self.hostname)):
            return self._route_plus(user, route, address)
        key = recipient_domain_key(domain)
        custom = self.directory.domain(key) if key else None
        if custom is None:
            metrics.REJECTED.labels("relay").inc()
            return defer.fail(smtp.SMTPBadRcpt(user, 550, "5.7.1 Relaying denied: we do not accept mail for " + printable(route.domain)))
        return self._route_custom(user, route, local, address, key, custom)

    def _route_plus(self, user: smtp.User, route, address: str) -> defer.Deferred:
        """C{LOCAL+SLUG} at one of our C{--domain}s (or postmaster there)."""
        if route.slug is None:
            metrics.REJECTED.labels("unknown_org").inc()
            return defer.fail(smtp.SMTPBadRcpt(user, 550, "5.1.1 No such recipient: address must be LOCAL+ORGANISATION@" + route.domain))
        # A tag that is no valid slug names no organisation (nor the reserved one).
        d = self.directory.lookup(route.slug) if route.postmaster or valid_slug(route.slug) else defer.succeed(None)
        return self._decided(d, user, route.slug, address, route.domain)

    def _route_custom(self, user: smtp.User, route, local: str, address: str, key: str, custom: dict) -> defer.Deferred:
        """
        Any local part (or one of its listed ones) at an organisation's verified
        domain: the domain alone decides the organisation, so a C{+tag} there is
        only a subaddress (C{orders+globex@acme.example} is still acme's), and
        postmaster there is the reserved postmaster organisation's.
        """
        if route.postmaster:
            return self._decided(self.directory.lookup(POSTMASTER_SLUG), user, POSTMASTER_SLUG, address, key)
        base = unquote_local(local).partition("+")[0].lower()
        if custom["local_parts"] and base not in custom["local_parts"]:
            metrics.REJECTED.labels("unknown_org").inc()
            return defer.fail(smtp.SMTPBadRcpt(user, 550, "5.1.1 No such recipient"))
        return self._decided(self.directory.lookup(custom["slug"]), user, custom["slug"], address, key)

    def _decided(self, d: defer.Deferred, user: smtp.User, slug: str, address: str, domain: str) -> defer.Deferred:
        def decide(org_id):
            if org_id is None:
                metrics.REJECTED.labels("unknown_org").inc()
                raise smtp.SMTPBadRcpt(user, 550, "5.1.1 No such recipient: unknown organisation")
            return Recipient(org_id, slug, address, domain)

        def unavailable(failure):
            failure.trap(Exception)
            if failure.check(smtp.SMTPBadRcpt):
                return failure
            log.error("organisation lookup failed: {error}", error=failure.getErrorMessage())
            metrics.REJECTED.labels("temporary_failure").inc()
            raise smtp.SMTPBadRcpt(user, 451, "4.3.0 Temporary failure looking up the recipient, try again later")

        return d.addCallback(decide).addErrback(unavailable)

    # keeping the message

    def deliver(self, envelope: "Envelope", spool: Spool) -> defer.Deferred:
        """
        Keep a received message durably: fire with an L{Outcome}, or fail
        with L{smtp.SMTPServerError} carrying the 451 to send.
        """
        started = time.monotonic()
        headers = spool.headers("Message-ID", *ORIGINATOR_HEADERS)
        message_id = message_id_of(headers["Message-ID"])
        work = defer.ensureDeferred(self._deliver(envelope, spool, headers, message_id))

        def done(result):
            spool.discard()
            return result

        work.addBoth(done)
        d = within(work, self.store_timeout, self.clock, f"transaction {envelope.id}")

        def failed(failure: Failure):
            log.error(
                "message from {peer} for {recipients} not stored ({size} bytes, transaction {txid},"
                " message-id={message_id_header}): {error}",
                peer=envelope.peer,
                proxy=envelope.proxy,
                org=", ".join(sorted({r.slug for r in envelope.recipients})),
                recipients=", ".join(r.address for r in envelope.recipients),
                message_id_header=message_id or "",
                size=spool.raw_size,
                txid=envelope.id,
                error=failure.getErrorMessage(),
                event="temporary_failure",
            )
            metrics.REJECTED.labels("temporary_failure").inc()
            raise smtp.SMTPServerError(451, "4.3.0 Temporary storage failure, message not accepted, try again later")

        d.addErrback(failed)
        d.addCallback(self._log_outcome, envelope, spool, started, message_id or "")
        return d

    async def _deliver(self, envelope, spool, headers, message_id) -> Outcome:
        await spool.finish(sent=message_id is None)
        if message_id is None:
            message_id = synthetic_message_id(spool.sent_sha256)
        by_org: dict[int, list[Recipient]] = {}
        for recipient in envelope.recipients:
            by_org.setdefault(recipient.org_id, []).append(recipient)
        # Duplicates are found by the insert itself (one round trip to the
        # database, not two): a duplicate's raw copy is then removed again.
        key = raw_key(envelope)
        digest = spool.raw_sha256
        if spool.in_memory:
            await self.blobs.put_bytes(key, spool.data(), digest)
        else:
            await self.blobs.put_file(key, spool.path, digest, spool.raw_size)
        orgs = list(by_org)
        shared = {
            "source": SOURCE,
            "source_message_id": message_id,
            "mail_from": envelope.mail_from,
            "subject": subject_of(headers["Subject"]),
            "raw_key": key,
            "raw_size": spool.raw_size,
            "raw_sha256": digest,
            "content_sha256": content_sha256(headers, spool.body_sha256),
            "received_at": envelope.received_at,
            "client_ip": envelope.peer if _is_ip(envelope.peer) else None,
            "helo": envelope.helo or None,
            "tls": envelope.tls,
        }
        rows = [
            dict(
                shared, org_id=org_id, rcpt_to=", ".join(r.address for r in by_org[org_id]),
                rcpt_domain=", ".join(dict.fromkeys(r.domain for r in by_org[org_id] if r.domain)) or None,
            )
            for org_id in orgs
        ]
        try:
            ids = await self.store.insert_messages(rows)
        except Exception:
            await self._remove_unreferenced(key)
            raise
        outcome = Outcome([(by_org[org_id][0], row_id) for org_id, row_id in zip(orgs, ids)])
        if all(isinstance(row_id, Duplicate) for row_id in ids):
            await self._remove_unreferenced(key)
            return outcome
        metrics.BYTES_RECEIVED.inc(spool.raw_size)
        for hook in self.on_stored:
            hook()
        return outcome

    async def _remove_unreferenced(self, key: str) -> None:
        try:
            if not await self.store.raw_key_in_use(key):
                await self.blobs.delete(key)
                return
        except Exception as e:
            log.warn("raw blob {key} left in storage, unreferenced: {error}", key=key, error=str(e))

    def _log_outcome(self, outcome: Outcome, envelope, spool, started, message_id_header: str):
        for recipient, message_id in outcome.rows:
            fields = dict(
                message_id=message_id,
                org=recipient.slug,
                peer=envelope.peer,
                proxy=envelope.proxy,
                mail_from=envelope.mail_from,
                size=spool.raw_size,
                ms=(time.monotonic() - started) * 1000,
                message_id_header=message_id_header,
            )
            for counter, level, event, text in _outcome_lines(message_id):
                counter.inc()
                log.emit(level, text, event=event, **fields)
        return outcome


_ACCEPTED = (
    metrics.MESSAGES_ACCEPTED,
    LogLevel.info,
    "accepted",
    "accepted message {message_id} for {org} from {peer} <{mail_from}> ({size} bytes, {ms:.0f} ms,"
    " message-id={message_id_header})",
)
_COLLISION = (
    metrics.MESSAGE_ID_COLLISIONS,
    LogLevel.warn,
    "message_id_collision",
    "message {message_id} for {org} from {peer} <{mail_from}> reuses the Message-ID of a different"
    " message (message-id={message_id_header}): stored under a suffixed id",
)
_DUPLICATE = (
    metrics.DUPLICATES,
    LogLevel.warn,
    "duplicate",
    "duplicate message for {org} from {peer} <{mail_from}> ({size} bytes, message-id={message_id_header}):"
    " already stored as message {message_id}, not stored again",
)


def _outcome_lines(row_id: int) -> tuple:
    """The counters to increment and lines to log for one organisation's copy."""
    if isinstance(row_id, Duplicate):
        return (_DUPLICATE,)
    if isinstance(row_id, Collision):
        return (_ACCEPTED, _COLLISION)
    return (_ACCEPTED,)
