"""
One claimed message, from its raw copy to its outcome: sender-checked
(L{mailingest.extraction.checks}) and held to its organisation's sender
policy, parsed in a worker process (L{mailingest.extraction.pool}) from its
raw copy (in place on local disk, else fetched into its work slot), each
attachment stored under a key made of ids only, then its outcome recorded
(L{mailingest.extraction.outcomes}). Every step is idempotent, so a message
interrupted anywhere is simply extracted again.
"""

import os
import time
from collections.abc import Callable

from twisted.internet import defer, threads

from mailingest.errors import BlobNotFound
from mailingest.extraction.attachments import ExtractionResult, UnparseableMessage
from mailingest.extraction.checks import CheckPool
from mailingest.extraction.outcomes import ExtractionOutcomes
from mailingest.extraction.pool import ParserDied, ParsePool
from mailingest.ops import metrics
from mailingest.verification.policy import SenderPolicy, Violation, violation
from mailingest.verification.results import Verdicts
from mailingest.verification.settings import CheckSettings


def document_key(message: dict, ordinal: int) -> str:
    """Deterministic, so extracting a message again overwrites, never duplicates."""
    return f"documents/{message['org_id']}/{message['id']}/{ordinal}"


class PermanentFailure(Exception):
    """Retrying cannot help; the message goes to C{failed} at once."""


class MessageExtraction:
    """
    What is done with each claimed message, whoever claimed it: kept apart
    from the claiming, so the steps of one message read in one place.
    """

    def __init__(
        self,
        blobs,
        parser: ParsePool,
        outcomes: ExtractionOutcomes,
        running: Callable[[], bool],
        checks: CheckSettings | None = None,
        checker: CheckPool | None = None,
    ) -> None:
        self.blobs = blobs
        self.parser = parser
        self.outcomes = outcomes
        self.checks = checks
        self.checker = checker
        self._running = running

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
            await self.outcomes.failed(message, str(e), message["attempts"] + 1, verdicts)
        except Exception as e:
            if isinstance(e, ParserDied) and not self._running():
                raise  # stopped, not failed: the claimer releases the claim
            await self.outcomes.retry_later(message, e)
        else:
            if broken is not None:
                await self.outcomes.quarantined(message, broken, verdicts)
            else:
                await self.outcomes.parsed(message, result, documents, verdicts, started)
        finally:
            metrics.EXTRACTION_SECONDS.observe(time.monotonic() - started)

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

    async def _extract(self, message: dict, raw_path: str, slot: str) -> tuple[ExtractionResult, list[dict]]:
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
