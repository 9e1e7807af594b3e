"""
What became of a message's extraction, recorded: parsed, retried later,
failed or quarantined, each counted and logged.

Failures that retrying cannot fix are recorded C{failed} at once; anything
else is retried with backoff (1 s, doubling) up to C{max_attempts}. Recording
an attempt releases its claim, so a message is retried after its backoff, not
after its lease; a database that refuses the record is asked again while the
lease lasts.
"""

import time
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from mailingest.extraction.attachments import ExtractionResult
from mailingest.ops import metrics
from mailingest.retry import Backoff, retry
from mailingest.scanning.verdicts import ContentVerdicts
from mailingest.verification.policy import Violation
from mailingest.verification.results import Verdicts, verdict_columns

log = Logger(namespace="mailingest.extraction")

# A failed attempt is tried again after 1 s, doubling per attempt.
ATTEMPT_BACKOFF = Backoff(1.0)
# Asking a refusing database again to record an outcome: 1 s, doubling to 8 s.
RECORD_BACKOFF = Backoff(1.0, maximum=8.0)


class OutcomeNotRecorded(Exception):
    """The database refused a message's documents: a failed attempt like any other."""


class ExtractionOutcomes:
    """
    The store's side of a message's end, apart from how it was reached: the
    same retries and backoff for every outcome.
    """

    def __init__(
        self, store, clock, max_attempts: int, lease_seconds: float, running: Callable[[], bool]
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self._running = running

    async def parsed(
        self,
        message: dict,
        result: ExtractionResult,
        documents: list[dict],
        verdicts: Verdicts | None,
        started: float,
        content: ContentVerdicts | None = None,
        dropped: frozenset[int] = frozenset(),
    ) -> None:
        """
        Record the documents (those in C{dropped}, infected, said in the
        warnings); a database that refuses them makes it a failed attempt.
        """
        skipped = list(result.skipped)
        for ordinal in sorted(dropped):
            skipped.append(f"{result.attachments[ordinal].filename}: rejected, infected ({content.documents[ordinal].detail})")
        try:
            await self.store.mark_parsed(
                message["id"], documents, "\n".join(skipped) or None, verdicts and verdict_columns(verdicts),
                content and content.columns(),
            )
        except Exception as e:
            await self.retry_later(message, OutcomeNotRecorded(f"cannot record the documents: {e}"))
        else:
            self._log_parsed(message, result, started)
            self._log_infected(message, content, "tagged" if not dropped else "documents rejected")

    def _log_infected(self, message: dict, content: ContentVerdicts | None, outcome: str) -> None:
        """The one log event of an infected message."""
        virus = content and content.virus
        if virus is None or virus.result != "infected":
            return
        log.warn(
            "message {message_id} for {org} is infected ({signature}): {outcome}",
            message_id=message["id"],
            org=message["org_slug"],
            signature=virus.detail,
            outcome=outcome,
            event="infected",
        )

    def _log_parsed(self, message: dict, result: ExtractionResult, started: float) -> None:
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

    async def retry_later(self, message: dict, error: Exception) -> None:
        """A failed attempt: tried again after its backoff, or failed after C{max_attempts}."""
        attempts = message["attempts"] + 1
        reason = f"{type(error).__name__}: {error}"
        if attempts >= self.max_attempts:
            await self.failed(message, f"{reason} (after {attempts} attempts)", attempts)
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

    async def failed(self, message: dict, reason: str, attempts: int, verdicts: Verdicts | None = None) -> None:
        """Retrying cannot help, or has not: the message ends C{failed}."""
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

    async def quarantined(
        self,
        message: dict,
        broken: Violation,
        verdicts: Verdicts | None,
        documents: list[dict] | None = None,
        content: ContentVerdicts | None = None,
    ) -> None:
        """
        The organisation's sender policy holds the message back, unparsed; or
        its content policy, with its C{documents} and their verdicts kept
        (shown, never handed over: see L{mailingest.handoff}).
        """
        columns = verdicts and verdict_columns(verdicts)
        contents = content and content.columns()
        if not await self._record(
            message,
            lambda waited: self.store.mark_quarantined(message["id"], broken.reason, columns, documents, contents),
        ):
            return
        metrics.QUARANTINES.labels(broken.kind).inc()
        self._log_infected(message, content, "quarantined")
        log.warn(
            "message {message_id} for {org} quarantined: {reason}",
            message_id=message["id"],
            org=message["org_slug"],
            reason=broken.reason,
            kind=broken.kind,
            event="quarantined",
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
            if not self._running() or waited + pause >= self.lease_seconds:
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
