"""
The extraction service: turns received messages into documents.

It runs in the daemon's reactor, polls every C{poll_interval} seconds and is
woken at once when a message is accepted. Each message is claimed with a lease
(so with several daemons one works on it at a time, and a message whose daemon
died is claimed again when the lease runs out; on PostgreSQL at once, as the
claim is also held by the daemon's database session), parsed in a worker process
(L{mailingest.extraction.pool}) from its raw copy (in place on local disk, else
fetched into a reused work directory), each attachment
stored under a key made of ids only, and its document recorded. Every step is
idempotent, so a message interrupted anywhere is simply extracted again.

Organisations take turns: a claim takes at most L{CHECKS_PER_ORG} messages of
one organisation. There is one work slot more than C{concurrency}, and an
organisation whose messages are in hand in C{concurrency} slots is not claimed
for, so one organisation's backlog (say, mail whose DNS never answers) always
leaves a slot to the others. The messages of a claim are
sender-checked at once (L{mailingest.extraction.checks}), then parsed one at
a time in their slot, in the order their checks end.

Failures that retrying cannot fix (the message cannot be parsed, its raw copy
is gone) mark it C{failed} at once; anything else (storage, database, even
recording the documents) is retried with backoff (1 s, doubling) up to
C{max_attempts}. An attempt that fails releases its claim when it is recorded,
so a message is retried after its backoff, not after its lease.
"""

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from mailingest.claiming import ClaimWorkers
from mailingest.interfaces import IExtractionQueue, IQuarantineStore
from mailingest.ops import metrics
from mailingest.extraction.attachments import UnparseableMessage
from mailingest.errors import BlobNotFound
from mailingest.extraction.checks import CHECKS_PER_ORG, CheckPool
from mailingest.extraction.pool import ParserDied
from mailingest.retry import Backoff, retry
from mailingest.verification.policy import SenderPolicy, Violation, violation
from mailingest.verification.results import Verdicts, verdict_columns
from mailingest.verification.settings import CheckSettings

log = Logger(namespace="mailingest.extraction")

# A failed attempt is tried again after 1 s, doubling per attempt.
ATTEMPT_BACKOFF = Backoff(1.0)
# Asking a refusing database again to record an outcome: 1 s, doubling to 8 s.
RECORD_BACKOFF = Backoff(1.0, maximum=8.0)
# After a stop has killed the parsers: time to release the claims they held.
RELEASE_SECONDS = 1.0


def document_key(message: dict, ordinal: int) -> str:
    """Deterministic, so extracting a message again overwrites, never duplicates."""
    return f"documents/{message['org_id']}/{message['id']}/{ordinal}"


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


class PermanentFailure(Exception):
    """Retrying cannot help; the message goes to C{failed} at once."""


class OutcomeNotRecorded(Exception):
    """The database refused a message's documents: a failed attempt like any other."""


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
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.store = store
        self.blobs = blobs
        self.parser = parser
        self.work_dir = work_dir
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.checks = checks
        self.checker = checker
        self._loop = None
        self._claims: ClaimWorkers | None = None
        self._claiming = defer.DeferredLock()
        # Per organisation: how many slots hold some of its messages.
        self._busy_slots: Counter = Counter()

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
        # Workers still parsing or checking are killed; their messages' claims are released.
        d.addCallback(lambda _: defer.DeferredList([self.parser.close(), *self._close_checker()]))
        d.addCallback(lambda _: self._in_hand(RELEASE_SECONDS))
        return d

    def _close_checker(self) -> list[defer.Deferred]:
        return [] if self.checker is None else [self.checker.close()]

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
            await self.process(message, slot, ordinal, parsing)
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

    async def process(self, message: dict, slot: str, ordinal: int, parsing: defer.DeferredLock) -> None:
        """
        Check, then parse and store C{message} in C{slot}; C{ordinal}, its
        place in its batch, names its raw copy there, and C{parsing} is the
        slot's turn to parse (its C{parts} directory is one).
        """
        started = time.monotonic()
        verdicts = None
        try:
            raw_path = await self._raw_path(message, slot, ordinal)
            verdicts = await self._check_sender(message, raw_path)
            broken = self._policy_broken(message, verdicts)
            if broken is None:
                async with parsing:
                    result, documents = await self._extract(message, raw_path, slot)
        except (UnparseableMessage, PermanentFailure) as e:
            await self._fail(message, str(e), message["attempts"] + 1, verdicts)
        except Exception as e:
            if isinstance(e, ParserDied) and not self.running:
                raise  # stopped, not failed: _process_batch releases the claim
            await self._transient(message, e)
        else:
            if broken is not None:
                await self._quarantine(message, broken, verdicts)
                return
            try:
                await self.store.mark_parsed(
                    message["id"], documents, "\n".join(result.skipped) or None, verdicts and verdict_columns(verdicts)
                )
            except Exception as e:
                await self._transient(message, OutcomeNotRecorded(f"cannot record the documents: {e}"))
            else:
                self._log_parsed(message, result, started)
        finally:
            metrics.EXTRACTION_SECONDS.observe(time.monotonic() - started)

    def _renew(self, message_ids: list[int]) -> defer.Deferred:
        """Keep the claims while the work goes on; a failure only means a lease may run out."""
        d = self.store.renew_claims(list(message_ids), self.lease_seconds)
        return d.addErrback(lambda f: log.warn("cannot renew extraction claims: {error}", error=f.getErrorMessage()))

    async def _raw_path(self, message: dict, slot: str, ordinal: int) -> str:
        """The raw copy on local disk: in place, or fetched into the slot (the batch's C{ordinal}th file)."""
        raw_key = message["raw_key"]
        try:
            raw_path = self.blobs.local_path(raw_key)
            if raw_path is None:
                raw_path = os.path.join(slot, f"raw-{ordinal}.eml")
                # The slot's file, truncated: no new inode per message.
                with await threads.deferToThread(open, raw_path, "wb", 0) as raw:
                    await self.blobs.read_to(raw_key, raw)
        except BlobNotFound:
            raise PermanentFailure(f"raw message {raw_key} is missing from object storage")
        return raw_path

    async def _extract(self, message: dict, raw_path: str, slot: str):
        try:
            result = await self.parser.parse(raw_path, os.path.join(slot, "parts"))
        except BlobNotFound:
            raise PermanentFailure(f"raw message {message['raw_key']} is missing from object storage")
        documents = []
        for ordinal, attachment in enumerate(result.attachments):
            key = document_key(message, ordinal)
            await self.blobs.put_file(key, attachment.path, attachment.sha256, attachment.size)
            documents.append(
                {
                    "org_id": message["org_id"],
                    "ordinal": ordinal,
                    "filename": attachment.filename,
                    "content_type": attachment.content_type,
                    "size": attachment.size,
                    "sha256": attachment.sha256,
                    "storage_key": key,
                    "original_filename": attachment.original_filename,
                    "content_type_raw": attachment.content_type_raw,
                    "disposition": attachment.disposition,
                    "content_id": attachment.content_id,
                }
            )
        return result, documents

    def _log_parsed(self, message: dict, result, started: float) -> None:
        metrics.EXTRACTIONS.labels("parsed").inc()
        metrics.DOCUMENTS_CREATED.inc(len(result.attachments))
        metrics.PARTS_SKIPPED.inc(len(result.skipped))
        # "no attachments" is the parser's note of a normal outcome, not a warning.
        warnings = [w for w in result.warnings if w != "no attachments"]
        fields = dict(
            message_id=message["id"],
            org=message["org_slug"],
            count=len(result.attachments),
            ms=(time.monotonic() - started) * 1000,
            warnings="; ".join(warnings),
            event="parsed",
        )
        if not result.attachments and warnings:
            log.warn("message {message_id} for {org} parsed: no attachments ({warnings})", **fields)
        elif not result.attachments:
            log.info("message {message_id} for {org} parsed: no attachments", **fields)
        elif warnings:
            log.warn("message {message_id} for {org} parsed: {count} document(s), {ms:.0f} ms ({warnings})", **fields)
        else:
            log.info("message {message_id} for {org} parsed: {count} document(s), {ms:.0f} ms", **fields)

    async def _transient(self, message: dict, error: Exception) -> None:
        attempts = message["attempts"] + 1
        reason = f"{type(error).__name__}: {error}"
        if attempts >= self.max_attempts:
            await self._fail(message, f"{reason} (after {attempts} attempts)", attempts)
            return
        delay = ATTEMPT_BACKOFF.delay(attempts)

        def retry(waited: float) -> defer.Deferred:
            return self.store.schedule_retry(message["id"], reason, attempts, max(0.0, delay - waited))

        if not await self._record(message, retry):
            return
        metrics.EXTRACTIONS.labels("retry").inc()
        log.warn(
            "message {message_id} for {org}: attempt {attempts} of {max} failed ({error}); retrying in {delay:.0f} s",
            message_id=message["id"],
            org=message["org_slug"],
            attempts=attempts,
            max=self.max_attempts,
            error=reason,
            delay=delay,
        )

    async def _fail(self, message: dict, reason: str, attempts: int, verdicts: Verdicts | None = None) -> None:
        columns = verdicts and verdict_columns(verdicts)
        if not await self._record(message, lambda waited: self.store.mark_failed(message["id"], reason, attempts, columns)):
            return
        metrics.EXTRACTIONS.labels("failed").inc()
        log.error(
            "message {message_id} for {org} failed: {error}",
            message_id=message["id"],
            org=message["org_slug"],
            error=reason,
            event="failed",
        )

    async def _record(self, message: dict, write: Callable[[float], defer.Deferred]) -> bool:
        """
        Record an attempt's outcome with C{write(seconds waited so far)}. A
        database that refuses (down, disk full, locked) is asked again with
        backoff while the lease lasts, so the message is released as soon as
        the database is back, not when its lease runs out. After that it is
        left to its lease, and said so.
        """
        first = self.clock.seconds()
        started = [first]

        def attempt() -> defer.Deferred:
            started.append(self.clock.seconds())
            return write(started[-1] - first)

        def should_retry(error: Exception, retry_number: int, pause: float) -> bool:
            waited = started[-1] - first
            if not self.running or waited + pause >= self.lease_seconds:
                log.error(
                    "message {message_id} for {org}: cannot record the outcome of its extraction ({error});"
                    " it is claimed again when its lease runs out",
                    message_id=message["id"],
                    org=message["org_slug"],
                    error=str(error),
                )
                return False
            log.warn(
                "message {message_id} for {org}: cannot record the outcome of its extraction ({error}); trying again in {pause:.0f} s",
                message_id=message["id"],
                org=message["org_slug"],
                error=str(error),
                pause=pause,
            )
            return True

        try:
            await retry(attempt, RECORD_BACKOFF, should_retry, self.clock)
        except Exception:
            return False
        return True

    async def _check_sender(self, message: dict, raw_path: str) -> Verdicts | None:
        """
        The sender checks, on the first extraction of a message: a message
        reprocessed or released keeps the verdicts of its arrival (DNS
        records change; what counted is what was published then).
        """
        if self.checks is None or message.get("authentication_results") is not None:
            return None
        verdicts = await self.checker.verify(message["org_id"], self.checks.request(message, raw_path))
        for name in ("spf", "dkim", "dmarc", "arc"):
            metrics.SENDER_VERDICTS.labels(name, getattr(verdicts, name).result).inc()
        return verdicts

    def _policy_broken(self, message: dict, verdicts: Verdicts | None) -> Violation | None:
        """What the organisation's sender policy says of fresh verdicts (a released message passes)."""
        if verdicts is None or message.get("released_at") is not None:
            return None
        policy = SenderPolicy.from_columns(message.get("sender_allow_domains"), message.get("sender_require"))
        return None if policy.is_default else violation(policy, verdicts)

    async def _quarantine(self, message: dict, broken: Violation, verdicts: Verdicts) -> None:
        columns = verdict_columns(verdicts)
        if not await self._record(
            message, lambda waited: self.store.mark_quarantined(message["id"], broken.reason, columns)
        ):
            return
        metrics.QUARANTINES.labels(broken.kind).inc()
        log.warn(
            "message {message_id} for {org} quarantined: {reason}",
            message_id=message["id"],
            org=message["org_slug"],
            reason=broken.reason,
            kind=broken.kind,
            event="quarantined",
        )
