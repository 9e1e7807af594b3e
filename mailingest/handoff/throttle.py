"""
Wrong API tokens and console sign-ins, counted per client address (an IPv4
address or an IPv6 /64, as the SMTP limits count them) like the SMTP error
budget counts refused recipients: past L{FAILURE_LIMIT} wrong tokens within
L{WINDOW} seconds, or L{SIGN_IN_LIMIT} sign-in attempts of any outcome, the
address is answered 429 until the window moves on, without its token being
looked at. Each failure counts in C{mailingest_auth_failures_total}; an
address's first failure in the window and the one that stops it are logged,
those lines on a budget of L{LOG_LINES_PER_MINUTE}, so an attacker cannot
flood the log from many addresses either (the metric stays exact).
"""

import math

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from mailingest.ops import metrics
from mailingest.smtp.limits import AddressWindow
from mailingest.smtp.protocol import peer_key

log = Logger(namespace="mailingest.auth")

WINDOW = 600.0
FAILURE_LIMIT = 20
SIGN_IN_LIMIT = 30
MAX_ADDRESSES = 100_000  # addresses remembered per count; the least recently counted go first
LOG_LINES_PER_MINUTE = 10


def client_key(request: server.Request) -> str:
    """The unit the limits count for this request's TCP peer (a UNIX socket's peers are one unit)."""
    return peer_key(getattr(request.getClientAddress(), "host", None) or "local")


class LogBudget:
    """At most C{per_minute} lines a minute; a line let through says how many were held back before it."""

    def __init__(self, clock: IReactorTime, per_minute: int = LOG_LINES_PER_MINUTE):
        self.clock = clock
        self.per_minute = per_minute
        self._minute_started = -math.inf
        self._lines = 0
        self.held_back = 0

    def take(self) -> int | None:
        """None: do not log this line; else the number of lines held back since the last one logged."""
        now = self.clock.seconds()
        if now - self._minute_started >= 60:
            self._minute_started, self._lines = now, 0
        if self._lines >= self.per_minute:
            self.held_back += 1
            return None
        self._lines += 1
        held_back, self.held_back = self.held_back, 0
        return held_back


class TooManyFailures(Exception):
    """The client's address is past a budget: answered 429 with C{Retry-After}."""

    def __init__(self, code: str, message: str, retry_after: int):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class AuthThrottle:
    """The budgets of the API's site (the API and the console share them) and its failure log."""

    def __init__(self, clock: IReactorTime):
        self.failures = AddressWindow(clock, FAILURE_LIMIT, WINDOW, MAX_ADDRESSES)
        self.sign_ins = AddressWindow(clock, SIGN_IN_LIMIT, WINDOW, MAX_ADDRESSES)
        self.log_budget = LogBudget(clock)

    def check(self, key: str, site: str) -> None:
        """Raise L{TooManyFailures} if C{key} is past its wrong-token budget."""
        wait = self.failures.wait(key)
        if wait is not None:
            metrics.AUTH_FAILURES.labels(site, "throttled").inc()
            raise TooManyFailures("too_many_failures", f"too many wrong tokens from your address; try again in {wait} s", wait)

    def sign_in(self, key: str) -> None:
        """Count a console sign-in attempt; raise L{TooManyFailures} if C{key} is past either budget."""
        self.check(key, "console")
        wait = self.sign_ins.wait(key)
        if wait is not None:
            metrics.AUTH_FAILURES.labels("console", "throttled").inc()
            raise TooManyFailures("too_many_sign_ins", f"too many sign-ins from your address; try again in {wait} s", wait)
        self.sign_ins.add(key)

    def failed(self, key: str, site: str) -> None:
        """A wrong token from C{key}: counted; the address's first in the window and the one that stops it are logged."""
        metrics.AUTH_FAILURES.labels(site, "unknown_token").inc()
        count = self.failures.add(key)
        if count not in (1, FAILURE_LIMIT):
            return
        self.log(
            "{site}: wrong token from {client}, {count} in {minutes:g} min from this address{throttled}",
            site=site,
            client=key,
            count=count,
            minutes=WINDOW / 60,
            throttled=f"; it gets 429 for {self.failures.wait(key)} s" if count >= FAILURE_LIMIT else "",
        )

    def log(self, format: str, **fields) -> None:
        """A warning about a client's credentials, if the log's budget allows it."""
        held_back = self.log_budget.take()
        if held_back is not None:
            suffix = f" ({held_back} more such lines not logged)" if held_back else ""
            log.warn(format + "{held_back}", held_back=suffix, event="auth_failure", **fields)
