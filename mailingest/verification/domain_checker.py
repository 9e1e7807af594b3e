"""
The daemon's re-checks of custom domains (issue 27): pending and suspended
domains every few minutes, verified ones daily, each by the proof of
L{mailingest.verification.domain_proof}, with its blocking DNS lookups in a
thread. C{org domain verify} runs the same L{DomainChecker.check} at once.
"""

from collections.abc import Callable
from datetime import datetime, timezone

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailingest.interfaces import IDomainStore
from mailingest.periodic import PeriodicService
from mailingest.verification.domain_proof import DEFAULT_GRACE_SECONDS, Evidence, look_up, next_state

log = Logger(namespace="mailingest.domains")

# Domains taken per round, and checked at once (each has its own DNS budget).
BATCH = 100
AT_ONCE = 4


def as_datetime(value) -> datetime | None:
    """A timestamp as the engines return it (PostgreSQL a datetime, SQLite ISO text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


class DomainChecker(PeriodicService):
    """
    Checks the domains whose check is due every C{interval} seconds. C{look}
    is (domain, token) to a Deferred L{Evidence}: by default L{look_up} in a
    thread with C{targets}, C{resolver} and C{budget}. At stop, the checks
    in hand end (each within its DNS budget) and no other starts.
    """

    at_start = True

    def __init__(
        self,
        store: IDomainStore,
        targets: frozenset[str],
        resolver: tuple[str, int] | None,
        budget: float,
        clock: IReactorTime,
        grace: float = DEFAULT_GRACE_SECONDS,
        interval: float = 60.0,
        look: Callable[[str, str], defer.Deferred] | None = None,
    ):
        super().__init__(interval, clock)
        self.store = store
        self.grace = grace
        self._look = look or (lambda domain, token: threads.deferToThread(look_up, domain, token, targets, resolver, budget))

    async def run(self) -> None:
        try:
            await self.check_due(lambda: self.running)
        except Exception as e:
            log.warn("custom domain checks failed: {error}", error=str(e))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    async def check_due(self, going_on: Callable[[], bool] = lambda: True) -> int:
        """Check every domain due now (at most L{BATCH}), each started only while C{going_on()}; returns how many were due."""
        due = await self.store.due_domains(self.now(), BATCH)
        limit = defer.DeferredSemaphore(AT_ONCE)

        def one(row: dict) -> defer.Deferred:
            return defer.Deferred.fromCoroutine(self.check(row)) if going_on() else defer.succeed(None)

        await defer.gatherResults([limit.run(one, row) for row in due], consumeErrors=True)
        return len(due)

    async def check(self, row: dict) -> dict:
        """Look the domain up now and record what that makes of it; fires with its new row."""
        evidence: Evidence = await self._look(row["domain"], row["token"])
        state = next_state(row["status"], as_datetime(row["txt_missing_since"]), evidence, self.now(), self.grace)
        updated = await self.store.record_check(row["domain"], state.status, state.next_check_at, state.error, state.txt_missing_since)
        if state.status != row["status"]:
            level = log.warn if state.status == "suspended" else log.info
            level(
                "custom domain {domain} of {org}: {before} -> {after}{why}",
                domain=row["domain"], org=row["org_slug"], before=row["status"], after=state.status,
                why=f" ({state.error})" if state.error else "", event=f"domain_{state.status}",
            )
        elif state.txt_missing_since is not None and row["txt_missing_since"] is None:
            log.warn(
                "custom domain {domain} of {org}: TXT record missing; suspended after {grace:g} s unless it returns",
                domain=row["domain"], org=row["org_slug"], grace=self.grace, event="domain_txt_missing",
            )
        return updated
