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
"""

import random
from datetime import datetime, timedelta, timezone

import treq
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseNeverReceived

from mailingest.claiming import ClaimWorkers
from mailingest.handoff.events import as_datetime, event_body, signature_headers
from mailingest.handoff.targets import CheckedEndpointFactory, TargetPolicy, TargetRefused
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
TIMEOUT_SECONDS = 10.0
# What we read of a receiver's answer: its status says it all.
MAX_RESPONSE_BYTES = 64 * 1024


def jittered(delay: float, rng: random.Random) -> float:
    """Between C{(1 - JITTER) * delay} and C{delay}."""
    return delay * (1.0 - JITTER * rng.random())


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
        store,
        policy: TargetPolicy,
        reactor,
        horizon: float = DEFAULT_HORIZON_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        backoff: Backoff = ATTEMPT_BACKOFF,
        lease_seconds: float = 60.0,
        poll_interval: float = 1.0,
        concurrency: int = 4,
        batch_size: int = 16,
        api_url: str | None = None,
        rng: random.Random | None = None,
    ):
        self.store = store
        self.policy = policy
        self.reactor = reactor
        self.horizon = horizon
        self.timeout = timeout
        self.backoff = backoff
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.api_url = api_url
        self.rng = rng or random.Random()
        self.pool = None
        self._client = None
        self._loop = None
        self._claims = ClaimWorkers(
            [None] * concurrency,
            lambda: self.store.claim_events(self.lease_seconds, self.batch_size),
            self._send,
            lambda e: log.warn("cannot claim webhook events: {error}", error=str(e)),
            lambda: self.running,
        )

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self.pool = QuietHTTPConnectionPool(self.reactor, persistent=True)
        agent = Agent.usingEndpointFactory(self.reactor, CheckedEndpointFactory(self.reactor, self.policy), pool=self.pool)
        self._client = HTTPClient(agent)
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
        if self.pool is not None:
            yield self.pool.closeCachedConnections()

    def _tick(self) -> None:
        self.wake()
        self.store.count_events("pending").addCallbacks(
            metrics.WEBHOOK_OUTBOX_DEPTH.set,
            lambda f: log.debug("outbox depth unavailable: {error}", error=f.getErrorMessage()),
        )

    def wake(self) -> None:
        """Send due events now (on poll, and when an event is written)."""
        self._claims.wake()

    async def _send(self, events: list[dict], slot=None) -> None:
        for index, event in enumerate(events):
            if not self.running:
                await self._release(events[index:])
                return
            await self.deliver(event)

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
            except defer.CancelledError:
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
        body = event_body(event, self.api_url)
        headers = {"Content-Type": "application/json", "User-Agent": "mailingest"}
        headers.update(signature_headers(event["secret"], event["event_id"], body, datetime.now(timezone.utc)))

        def post() -> defer.Deferred:
            return self._client.post(event["url"], data=body, headers=headers, timeout=self.timeout, allow_redirects=False)

        try:
            response = await post()
        except ResponseNeverReceived:
            # Most often a kept-alive connection the receiver had closed: once more, on a new one.
            response = await post()
        discard = _Discard()
        reading = treq.collect(response, discard)
        reading.addTimeout(self.timeout, self.reactor)
        try:
            await reading
        except Exception:
            discard.stopped = True  # the status is all we need
        return response.code

    async def _failed(self, event: dict, status: int | None, error: str) -> None:
        attempts = event["attempts"] + 1
        delay = jittered(self.backoff.delay(attempts), self.rng)
        deadline = as_datetime(event["retry_from"]) + timedelta(seconds=self.horizon)
        dead = datetime.now(timezone.utc) + timedelta(seconds=delay) > deadline
        await self.store.event_failed(event["id"], status, error, None if dead else delay)
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
