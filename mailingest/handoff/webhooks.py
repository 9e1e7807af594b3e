"""
The webhook delivery service: POSTs the outbox's events to each
organisation's URL, from the daemon's reactor.

Events are claimed with a lease, as extraction claims messages (row locks
skipped on PostgreSQL), so with several daemons one sends an event at a
time, and the event of a daemon that died is claimed again when its lease
runs out: at least once. An event waits while an earlier event of its
message is pending, so they arrive in order per message. Success is any 2xx
within C{timeout}; redirects are not followed. Anything else is retried
with exponential backoff and jitter until C{horizon} seconds after the event
was written (or redelivered), then the event is C{dead}, its last HTTP
status and error kept.

Organisations must not wait for each other's receivers: one claimer keeps
up to C{concurrency} attempts in flight, each on its own, with at most
C{per_org} of one organisation's at a time (the store's claim counts them
and takes organisations in turns), every attempt is over within C{timeout},
and a receiver that failed C{PAUSE_AFTER} times in a row is paused as a
whole instead of being tried event by event.
"""

import random
from datetime import datetime, timedelta, timezone
from io import BytesIO

import treq
from hyperlink import EncodedURL
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived
from twisted.web.http_headers import Headers

from mailingest.claiming import ClaimWorkers
from mailingest.handoff.events import as_datetime, event_body, signature_headers
from mailingest.handoff.targets import CheckedEndpointFactory, TargetPolicy, TargetRefused
from mailingest.interfaces import IOutboxStore
from mailingest.ops import metrics
from mailingest.retry import Backoff
from mailingest.twisted_private import QuietHTTPConnectionPool

log = Logger(namespace="mailingest.webhooks")

# 5 s, doubling, at most an hour between attempts; each wait is cut by up to
# half at random, so the events of a receiver that was down do not all come
# back at the same second.
ATTEMPT_BACKOFF = Backoff(5.0, maximum=3600.0)
JITTER = 0.5
DEFAULT_HORIZON_SECONDS = 3 * 24 * 3600.0
# One attempt, from resolving the host to the status line.
TIMEOUT_SECONDS = 10.0
CONCURRENCY = 64
PER_ORG = 4
# A receiver whose attempts failed this many times in a row is paused: 5 s,
# doubling with each failure after a pause, at most 10 minutes; a delivery
# ends it.
PAUSE_AFTER = 5
RECEIVER_PAUSE = Backoff(5.0, maximum=600.0)
# What we read of a receiver's answer: its status says it all.
MAX_RESPONSE_BYTES = 64 * 1024


def jittered(delay: float, rng: random.Random) -> float:
    """Between C{(1 - JITTER) * delay} and C{delay}."""
    return delay * (1.0 - JITTER * rng.random())


def request_url(url: str) -> bytes:
    """
    The URL as sent: IDNA host, percent-encoded path and query. An IPv6
    literal is kept as it is (hyperlink's C{to_uri}, which treq uses, would
    IDNA-encode C{::1} and fail on the colon).
    """
    parsed = EncodedURL.from_text(url)
    if ":" not in parsed.host:
        return parsed.to_uri().to_text().encode("ascii")
    return parsed.replace(host="ipv6.invalid").to_uri().replace(host=parsed.host).to_text().encode("ascii")


class _ResponseTooLong(Exception):
    pass


class _Discard:
    """Reads an answer's body away (so the connection can be reused), dropping the connection past a bound."""

    def __init__(self):
        self.size = 0
        self.stopped = False

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.stopped or self.size > MAX_RESPONSE_BYTES:
            raise _ResponseTooLong()


class WebhookService(service.Service):
    name = "webhooks"

    def __init__(
        self,
        store: IOutboxStore,
        policy: TargetPolicy,
        reactor,
        horizon: float = DEFAULT_HORIZON_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        backoff: Backoff = ATTEMPT_BACKOFF,
        receiver_pause: Backoff = RECEIVER_PAUSE,
        lease_seconds: float = 60.0,
        poll_interval: float = 1.0,
        concurrency: int = CONCURRENCY,
        per_org: int = PER_ORG,
        api_url: str | None = None,
        rng: random.Random | None = None,
    ):
        self.store = store
        self.policy = policy
        self.reactor = reactor
        self.horizon = horizon
        self.timeout = timeout
        self.backoff = backoff
        self.receiver_pause = receiver_pause
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.per_org = per_org
        self.api_url = api_url
        self.rng = rng or random.Random()
        self.pool = None
        self._agent = None
        self._loop = None
        self._attempts: set[defer.Deferred] = set()
        # One claimer: it starts every event it claims and claims again while there is room.
        self._claims = ClaimWorkers(
            [None],
            self._claim,
            self._start,
            lambda e: log.warn("cannot claim webhook events: {error}", error=str(e)),
            lambda: self.running,
        )

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self.pool = QuietHTTPConnectionPool(self.reactor, persistent=True)
        self._agent = Agent.usingEndpointFactory(self.reactor, CheckedEndpointFactory(self.reactor, self.policy), pool=self.pool)
        if self.store.exclusive:
            # Any claim left is from our own previous run.
            yield self.store.release_event_claims(None)
        try:
            yield self.store.on_event(self.wake)
        except Exception as e:
            log.warn("no webhook wake-ups from other daemons yet ({error}); polling", error=str(e))
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop claiming; wait for the events in hand (bounded by the timeout), then close the connections."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        yield self._claims.in_hand(self.timeout + 1, self.reactor)
        attempts = defer.DeferredList(list(self._attempts))
        attempts.addTimeout(self.timeout + 1, self.reactor, onTimeoutCancel=lambda *_: None)
        yield attempts
        if self.pool is not None:
            yield self.pool.closeCachedConnections()

    def _tick(self) -> None:
        self.wake()
        self.store.count_events("pending").addCallbacks(
            metrics.WEBHOOK_OUTBOX_DEPTH.set,
            lambda f: log.debug("outbox depth unavailable: {error}", error=f.getErrorMessage()),
        )
        self.store.count_paused_receivers().addCallbacks(
            metrics.WEBHOOK_RECEIVERS_PAUSED.set,
            lambda f: log.debug("paused receivers unavailable: {error}", error=f.getErrorMessage()),
        )

    def wake(self) -> None:
        """Send due events now (on poll, and when an event is written)."""
        self._claims.wake()

    def _claim(self) -> defer.Deferred:
        room = self.concurrency - len(self._attempts)
        if room <= 0:
            return defer.succeed([])  # an attempt that ends wakes the claimer
        return self.store.claim_events(self.lease_seconds, room, self.per_org)

    async def _start(self, events: list[dict], slot=None) -> None:
        """Each claimed event its own attempt, so a slow receiver holds up no other event."""
        if not self.running:
            await self._release(events)
            return
        for event in events:
            attempt = defer.ensureDeferred(self.deliver(event))
            self._attempts.add(attempt)
            attempt.addBoth(self._ended, attempt)

    def _ended(self, result, attempt: defer.Deferred) -> None:
        self._attempts.discard(attempt)
        self.wake()

    async def _release(self, events: list[dict]) -> None:
        try:
            await self.store.release_event_claims([event["id"] for event in events])
        except Exception as e:
            log.warn("cannot release webhook claims, they run out with their lease: {error}", error=str(e))

    async def deliver(self, event: dict) -> None:
        """One attempt; its outcome recorded (a database that refuses leaves the event to its lease)."""
        status, error = None, None
        if event["url"] is None:
            error = "the organisation has no webhook any more"
        else:
            try:
                status = await self._post(event)
            except TargetRefused as e:
                error = str(e)
            except (defer.TimeoutError, defer.CancelledError):
                error = f"no answer within {self.timeout:g} s"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
        try:
            if error is None:
                await self.store.event_delivered(event["id"], status)
                metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                log.debug("event {event_id} delivered: HTTP {status}", event_id=event["event_id"], status=status)
            else:
                await self._failed(event, status, error)
        except Exception as e:
            log.error(
                "event {event_id}: cannot record the outcome of its delivery ({error}); sent again when its lease runs out",
                event_id=event["event_id"],
                error=str(e),
            )

    async def _post(self, event: dict) -> int:
        """The receiver's status, or an error: all within C{timeout}, never a second POST after a timeout."""
        deadline = self.reactor.seconds() + self.timeout
        answered = defer.ensureDeferred(self._request(event))
        answered.addTimeout(self.timeout, self.reactor)
        response = await answered
        discard = _Discard()
        reading = treq.collect(response, discard)
        reading.addTimeout(max(deadline - self.reactor.seconds(), 0.0), self.reactor)
        try:
            await reading
        except Exception:
            discard.stopped = True  # the status is all we need
        return response.code

    async def _request(self, event: dict):
        body = event_body(event, self.api_url)
        headers = {"Content-Type": "application/json", "User-Agent": "mailingest"}
        headers.update(signature_headers(event["secret"], event["event_id"], body, datetime.now(timezone.utc)))
        url = request_url(event["url"])

        def post() -> defer.Deferred:
            return self._agent.request(
                b"POST", url, Headers({k: [v] for k, v in headers.items()}), FileBodyProducer(BytesIO(body))
            )

        try:
            return await post()
        except ResponseNeverReceived as e:
            if any(reason.check(defer.CancelledError) for reason in e.reasons):
                raise defer.CancelledError() from None  # out of time: never a second POST
            # Most often a kept-alive connection the receiver had closed: once more, on a new one.
            return await post()

    async def _failed(self, event: dict, status: int | None, error: str) -> None:
        attempts = event["attempts"] + 1
        delay = jittered(self.backoff.delay(attempts), self.rng)
        deadline = as_datetime(event["retry_from"]) + timedelta(seconds=self.horizon)
        dead = datetime.now(timezone.utc) + timedelta(seconds=delay) > deadline
        failures = await self.store.event_failed(event["id"], status, error, None if dead else delay)
        if failures is not None and failures >= PAUSE_AFTER:
            pause = self.receiver_pause.delay(failures - PAUSE_AFTER + 1)
            await self.store.pause_receiver(event["org_id"], pause)
            log.warn(
                "webhook receiver of {org} failed {failures} times in a row: none of its events is tried for {pause:g} s",
                org=event["org_slug"],
                failures=failures,
                pause=pause,
            )
        fields = dict(
            event_id=event["event_id"],
            org=event["org_slug"],
            message_id=event["message_id"],
            attempts=attempts,
            status=status if status is not None else "-",
            error=error,
            delay=delay,
        )
        if dead:
            metrics.WEBHOOK_DELIVERIES.labels("dead").inc()
            log.error(
                "webhook event {event_id} for {org} (message {message_id}) is dead after {attempts} attempt(s):"
                " HTTP status {status}, {error}",
                **fields,
            )
        else:
            metrics.WEBHOOK_DELIVERIES.labels("retry").inc()
            log.warn(
                "webhook event {event_id} for {org} (message {message_id}) attempt {attempts} failed:"
                " HTTP status {status}, {error}; retrying in {delay:.1f} s",
                **fields,
            )
