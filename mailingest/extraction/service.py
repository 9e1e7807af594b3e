"""
The extraction service: turns received messages into documents.

It runs in the daemon's reactor, polls every C{poll_interval} seconds and is
woken at once when a message is accepted. Each message is claimed with a lease
(so with several daemons one works on it at a time, and a message whose daemon
died is claimed again when the lease runs out; on PostgreSQL at once, as the
claim is also held by the daemon's database session), then handled in a reused
work directory (L{mailingest.extraction.handling}: checks, parse, documents)
and its outcome recorded (L{mailingest.extraction.outcomes}: retries, backoff).

Organisations take turns: a claim takes at most L{CHECKS_PER_ORG} messages of
one organisation. There is one work slot more than C{concurrency}, and an
organisation whose messages are in hand in C{concurrency} slots is not claimed
for, so one organisation's backlog (say, mail whose DNS never answers) always
leaves a slot to the others. The messages of a claim are
sender-checked at once (L{mailingest.extraction.checks}), then parsed one at
a time in their slot, in the order their checks end.
"""

import os
import shutil
from collections import Counter

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailingest.claiming import ClaimWorkers
from mailingest.interfaces import IExtractionQueue, IQuarantineStore
from mailingest.extraction.checks import CHECKS_PER_ORG, CheckPool
from mailingest.extraction.handling import MessageExtraction
from mailingest.extraction.outcomes import ExtractionOutcomes
from mailingest.scanning.scans import ScanProcess
from mailingest.verification.settings import CheckSettings

log = Logger(namespace="mailingest.extraction")

# After a stop has killed the parsers: time to release the claims they held.
RELEASE_SECONDS = 1.0


def make_slots(work_dir: str, count: int) -> list[str]:
    """
    One work directory per message extracted at a time, each with the
    C{parts} directory the parser writes to, under C{work_dir/<our pid>}.
    They are reused message after message: creating and deleting files per
    message was the daemon's largest cost under load (ext4 searches past
    recently deleted inodes for every new one). What a daemon that is no
    longer running left behind is removed; another live daemon's is not.
    """
    os.makedirs(work_dir, exist_ok=True)
    for name in os.listdir(work_dir):
        if not name.isdigit() or int(name) == os.getpid() or not _running(int(name)):
            shutil.rmtree(os.path.join(work_dir, name), ignore_errors=True)
    mine = os.path.join(work_dir, str(os.getpid()))
    slots = [os.path.join(mine, f"slot-{n}") for n in range(count)]
    for slot in slots:
        os.makedirs(os.path.join(slot, "parts"))
    return slots


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ExtractionService(service.Service):
    name = "extraction"

    def __init__(
        self,
        store: "IExtractionQueue | IQuarantineStore",
        blobs,
        parser,
        work_dir: str,
        poll_interval: float = 1.0,
        max_attempts: int = 5,
        lease_seconds: float = 120.0,
        concurrency: int = 2,
        batch_size: int = 8,
        stop_timeout: float = 3.0,
        clock=None,
        checks: CheckSettings | None = None,
        checker: CheckPool | None = None,
        scanner: ScanProcess | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.store = store
        self.work_dir = work_dir
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.outcomes = ExtractionOutcomes(store, clock, max_attempts, lease_seconds, lambda: self.running)
        self.messages = MessageExtraction(blobs, parser, self.outcomes, lambda: self.running, checks, checker, scanner)
        self._loop = None
        self._claims: ClaimWorkers | None = None
        self._claiming = defer.DeferredLock()
        # Per organisation: how many slots hold some of its messages.
        self._busy_slots: Counter = Counter()

    @property
    def lease_seconds(self) -> float:
        """The claims' lease, kept by the outcomes: they ask a refusing database again only while it lasts."""
        return self.outcomes.lease_seconds

    @lease_seconds.setter
    def lease_seconds(self, value: float) -> None:
        self.outcomes.lease_seconds = value

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self._claims = ClaimWorkers(
            make_slots(self.work_dir, self.concurrency + 1),
            self._claim,
            self._process_batch,
            lambda e: log.error("cannot claim messages for extraction: {error}", error=str(e)),
            lambda: self.running,
        )
        if self.store.exclusive:
            # Any claim left is from our own previous run.
            yield self.store.release_claims()
        try:
            yield self.store.on_received(self.wake)
        except Exception as e:
            log.warn("no wake-ups from other daemons yet ({error}); polling", error=str(e))
        self._loop = task.LoopingCall(self.wake)
        self._loop.clock = self.clock
        self._loop.start(self.poll_interval, now=True)

    def stopService(self):
        """
        Stop claiming; fires when the messages in hand are finished, or after
        C{stop_timeout} seconds (an unfinished message is claimed again later).
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = self._in_hand(self.stop_timeout)
        # Workers still parsing, checking or scanning are killed; their messages' claims are released.
        d.addCallback(lambda _: defer.DeferredList([self.messages.parser.close(), *self._close_children()]))
        d.addCallback(lambda _: self._in_hand(RELEASE_SECONDS))
        return d

    def _close_children(self) -> list[defer.Deferred]:
        """The sender check and scan processes stopped, those there are."""
        return [child.close() for child in (self.messages.checker, self.messages.scanner) if child is not None]

    def _in_hand(self, timeout: float) -> defer.Deferred:
        """Fires when the messages in hand are done with, or after C{timeout} seconds."""
        if self._claims is None:
            return defer.succeed(None)
        return self._claims.in_hand(timeout, self.clock)

    def wake(self) -> None:
        """Work through due messages now (called on poll and on each accepted message)."""
        if self._claims is not None:
            self._claims.wake()

    async def _claim(self) -> list[dict]:
        """
        The next batch, organisations in turn (see the module's docstring); one
        claim at a time, so each sees the slots the one before filled.
        """
        async with self._claiming:
            crowded = [org for org, slots in self._busy_slots.items() if slots >= self.concurrency]
            batch = await self.store.claim(self.lease_seconds, self.batch_size, CHECKS_PER_ORG, crowded)
            self._busy_slots.update({message["org_id"] for message in batch})
            return batch

    async def _process_batch(self, batch: list[dict], slot: str) -> None:
        """
        One claim transaction for several messages, checked at once and
        parsed one at a time; their leases are renewed together.
        """
        waiting = [message["id"] for message in batch]
        renewal = task.LoopingCall(self._renew, waiting)
        renewal.clock = self.clock
        renewal.start(self.lease_seconds / 3, now=False)
        parsing = defer.DeferredLock()

        async def one(message: dict, ordinal: int) -> None:
            await self.messages.process(message, slot, ordinal, parsing)
            waiting.remove(message["id"])
            await self._unlock([message["id"]])

        try:
            await defer.DeferredList(
                [defer.ensureDeferred(one(message, n)) for n, message in enumerate(batch)], consumeErrors=True
            )
        finally:
            self._busy_slots.subtract({message["org_id"] for message in batch})
            self._busy_slots += Counter()  # drop the organisations at zero
            renewal.stop()
            if waiting:
                try:
                    await self.store.release_claims(waiting)
                except Exception as e:
                    log.warn("cannot release extraction claims, they run out with their lease: {error}", error=str(e))
                await self._unlock(waiting)

    async def _unlock(self, message_ids: list[int]) -> None:
        """Let go of the session hold on finished claims; if that fails, the hold ends with our database session."""
        try:
            await self.store.unlock_claims(message_ids)
        except Exception as e:
            log.warn("cannot let go of extraction claims: {error}", error=str(e))

    def _renew(self, message_ids: list[int]) -> defer.Deferred:
        """Keep the claims while the work goes on; a failure only means a lease may run out."""
        d = self.store.renew_claims(list(message_ids), self.lease_seconds)
        return d.addErrback(lambda f: log.warn("cannot renew extraction claims: {error}", error=f.getErrorMessage()))
