"""
The ops HTTP endpoint: liveness (C{/healthz}), readiness (C{/readyz}) and
Prometheus metrics (C{/metrics}).

Every backend question is bounded by a deadline, so a hung database makes
C{/readyz} answer 503 in bounded time instead of hanging the prober with it.
Probes and scrapes arrive every few seconds: they are logged at debug level
only, so they never flood the daemon's log.
"""

import json
from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, resource, server

from mailingest.ops import metrics
from mailingest.ops.web import Node

log = Logger(namespace="mailingest.ops_http")

MAX_REASON_LENGTH = 300

Check = Callable[[], defer.Deferred]
Response = tuple[int, bytes, bytes]


CHECK_TIMEOUT = 2.0  # seconds a readiness check may take before it counts as failed


class CheckTimedOut(Exception):
    """A readiness check or queue-depth query did not answer within its deadline."""


def bounded(call: Check, timeout: float, clock: IReactorTime) -> defer.Deferred:
    """Call C{call} and give up on its result after C{timeout} seconds."""

    def timed_out(result: Any, timeout: float) -> None:
        raise CheckTimedOut(f"timed out after {float(timeout)} s")

    return defer.maybeDeferred(call).addTimeout(timeout, clock, onTimeoutCancel=timed_out)


def describe_failure(failure: Failure) -> str:
    """One line, at most L{MAX_REASON_LENGTH} characters, for a readiness report."""
    reason = failure.getErrorMessage() or failure.type.__name__
    return " ".join(reason.split())[:MAX_REASON_LENGTH]


def run_checks(checks: Mapping[str, Check], timeout: float, clock: IReactorTime) -> defer.Deferred:
    """
    Fire with each check's outcome by name, C{"ok"} or C{"error: ..."}, each
    bounded by C{timeout}: what C{/readyz} and the console's status page show.
    """
    names = list(checks)
    outcomes = [
        bounded(checks[name], timeout, clock).addCallbacks(lambda _: "ok", lambda failure: "error: " + describe_failure(failure))
        for name in names
    ]
    return defer.gatherResults(outcomes).addCallback(lambda results: dict(zip(names, results)))


class _OpsEndpoint(Node):
    """
    One path answering GET and HEAD; anything below it is 404 and any other
    method 405 (Twisted would answer 501 to some of them).
    """

    allowedMethods = (b"GET", b"HEAD")

    def missing(self) -> resource.IResource:
        return pages.notFound()

    async def response(self) -> Response:
        """Compute (status code, content type, body)."""
        raise NotImplementedError

    async def answer(self, request: server.Request) -> None:
        if request.method not in self.allowedMethods:
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            self._send(request, (405, b"text/plain; charset=utf-8", b"method not allowed\n"))
            return
        # The client may go away before the backends answer: then there is
        # nothing to write to, and writing anyway would be an error.
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        try:
            response = await self.response()
        except Exception:
            log.failure("ops endpoint {path} failed", path=request.path)
            response = 500, b"text/plain; charset=utf-8", b"internal error\n"
        if not gone:
            self._send(request, response)

    @staticmethod
    def _send(request: server.Request, response: Response) -> None:
        code, content_type, body = response
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("cannot answer {path}", failure, path=request.path)


class _Health(_OpsEndpoint):
    async def response(self) -> Response:
        return 200, b"text/plain; charset=utf-8", b"ok\n"


class _Readiness(_OpsEndpoint):
    async def response(self) -> Response:
        checks = await run_checks(self.site.checks, self.site.timeout, self.site.clock)
        ready = all(result == "ok" for result in checks.values())
        body = {"status": "ready" if ready else "unavailable", "checks": checks}
        return 200 if ready else 503, b"application/json", json.dumps(body).encode() + b"\n"


class _Metrics(_OpsEndpoint):
    async def response(self) -> Response:
        if self.site.queue_depth is not None:
            try:
                metrics.QUEUE_DEPTH.set(await bounded(self.site.queue_depth, self.site.timeout, self.site.clock))
            except Exception:
                # A stale gauge is better than a failed scrape; /readyz already
                # tells which backend is down.
                log.debug("queue depth unavailable: {reason}", reason=describe_failure(Failure()))
        return 200, prometheus_client.CONTENT_TYPE_LATEST.encode(), metrics.exposition()


class _OpsRoot(Node):
    """The ops site's root, holding what its endpoints share."""

    below = {b"healthz": _Health, b"readyz": _Readiness, b"metrics": _Metrics}

    def __init__(self, checks: Mapping[str, Check], queue_depth: Check | None, timeout: float, clock: IReactorTime):
        super().__init__(self)
        self.checks = dict(checks)
        self.queue_depth = queue_depth
        self.timeout = timeout
        self.clock = clock

    def missing(self) -> resource.IResource:
        return pages.notFound()


class OpsSite(server.Site):
    """A Site that logs requests at debug level instead of writing an access log."""

    noisy = False
    displayTracebacks = False

    def log(self, request: server.Request) -> None:
        log.debug(
            "{method} {path} {code} from {client}",
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace"),
            code=request.code,
            client=getattr(request.getClientAddress(), "host", "-"),
        )


def make_ops_site(
    checks: Mapping[str, Check],
    queue_depth: Check | None = None,
    check_timeout: float = CHECK_TIMEOUT,
    clock: IReactorTime | None = None,
) -> server.Site:
    """
    Build the ops site.

    @param checks: readiness checks by name (C{"database"}, C{"storage"}),
        each returning a Deferred that fires when the backend answers.
    @param queue_depth: returns a Deferred firing with the number of messages
        waiting for extraction, refreshed into the gauge on every scrape.
    @param check_timeout: seconds each check (and the queue depth) may take.
    @param clock: for the deadlines; the global reactor by default.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    return OpsSite(_OpsRoot(checks, queue_depth, check_timeout, clock))
