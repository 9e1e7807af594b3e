"""
One claimed message, from its raw copy to its outcome: sender-checked
(L{mailingest.extraction.checks}) and held to its organisation's sender
policy, parsed in a worker process (L{mailingest.extraction.pool}) from its
raw copy (in place on local disk, else fetched into its work slot), scanned
(L{mailingest.scanning}) and held to its organisation's content policy,
each attachment kept stored under a key made of ids only, then its outcome
recorded (L{mailingest.extraction.outcomes}). Every step is idempotent, so a message
interrupted anywhere is simply extracted again.
"""

import os
import time
from collections.abc import Callable

from twisted.internet import defer, threads

from mailingest.errors import BlobNotFound
from mailingest.extraction import text_body
from mailingest.extraction.attachments import ExtractionResult, UnparseableMessage
from mailingest.extraction.checks import CheckPool, Checked
from mailingest.extraction.outcomes import ExtractionOutcomes
from mailingest.extraction.pool import ParserDied, ParsePool
from mailingest.ops import metrics
from mailingest.scanning.scanner import ContentScanner
from mailingest.scanning.content_policy import ContentPolicy
from mailingest.scanning.verdicts import ContentVerdicts, Decision, decide
from mailingest.verification.policy import SenderPolicy, Violation, violation
from mailingest.verification.results import Verdicts, verdict_columns
from mailingest.verification.settings import CheckSettings


def document_key(message: dict, ordinal: int) -> str:
    """Deterministic, so extracting a message again overwrites, never duplicates."""
    return f"documents/{message['org_id']}/{message['id']}/{ordinal}"


class PermanentFailure(Exception):
    """Retrying cannot help; the message goes to C{failed} at once."""


class ScannerUnavailable(Exception):
    """A scanner did not answer and the organisation holds unscanned mail: tried again with backoff."""


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
        scanner: ContentScanner | None = None,
    ) -> None:
        self.blobs = blobs
        self.parser = parser
        self.outcomes = outcomes
        self.checks = checks
        self.checker = checker
        self.scanner = scanner
        self._running = running

    async def process(self, message: dict, slot: str, ordinal: int, parsing: defer.DeferredLock) -> None:
        """
        Check, then parse and store C{message} in C{slot}; C{ordinal}, its
        place in its batch, names its raw copy there, and C{parsing} is the
        slot's turn to parse (its C{parts} directory is one).
        """
        started = time.monotonic()
        verdicts = content = None
        decision = Decision()
        try:
            raw_path = await self._raw_path(message, slot, ordinal)
            checked = await self._check_sender(message, raw_path)
            verdicts = checked and checked.verdicts
            broken = self._policy_broken(message, verdicts)
            if broken is None:
                async with parsing:
                    result = await self._parse(message, raw_path, slot, checked and checked.text_body)
                    content, decision = await self._scan(message, raw_path, result, verdicts)
                    documents = await self._store(message, result, content, decision.drop)
        except (UnparseableMessage, PermanentFailure) as e:
            await self.outcomes.failed(message, str(e), message["attempts"] + 1, verdicts)
        except Exception as e:
            if isinstance(e, ParserDied) and not self._running():
                raise  # stopped, not failed: the claimer releases the claim
            await self.outcomes.retry_later(message, e)
        else:
            if broken is not None:
                await self.outcomes.quarantined(message, broken, verdicts)
            elif decision.quarantine is not None:
                broken = Violation(decision.kind, decision.quarantine)
                await self.outcomes.quarantined(message, broken, verdicts, documents, content)
            else:
                await self.outcomes.parsed(message, result, documents, verdicts, started, content, decision.drop)
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

    async def _parse(self, message: dict, raw_path: str, slot: str, one_text_body: bool | None) -> ExtractionResult:
        """
        What the parser makes of the message; a text body's result without
        asking a worker (L{text_body}: C{one_text_body} when the check process
        has said, else the header section read here).
        """
        if one_text_body is None:
            one_text_body = await threads.deferToThread(text_body.needs_no_parser, raw_path)
        if one_text_body:
            return ExtractionResult([], list(text_body.WARNINGS))
        try:
            return await self.parser.parse(raw_path, os.path.join(slot, "parts"))
        except BlobNotFound:
            raise PermanentFailure(f"raw message {message['raw_key']} is missing from object storage")

    async def _scan(
        self, message: dict, raw_path: str, result: ExtractionResult, sender: Verdicts | None
    ) -> tuple[ContentVerdicts | None, Decision]:
        """
        The content verdicts (None without scanners) and what the
        organisation's content policy makes of them; a hold is raised as
        L{ScannerUnavailable} (retried with backoff, up to C{--max-attempts}).
        A released message is scanned again but not held to the policy.
        """
        if self.scanner is None:
            return None, Decision()
        columns = {name: message.get(name) for name in ("spf", "spf_domain", "dkim", "dkim_domain", "dmarc", "dmarc_domain", "dmarc_policy")}
        if sender is not None:
            columns.update(verdict_columns(sender))
        paths = [attachment.path for attachment in result.attachments]
        content = await self.scanner.scan(message, raw_path, paths, columns)
        if message.get("released_at") is not None:
            return content, Decision()
        decision = decide(ContentPolicy.from_row(message), content, [a.filename for a in result.attachments])
        if decision.hold is not None:
            raise ScannerUnavailable(decision.hold)
        return content, decision

    async def _store(
        self, message: dict, result: ExtractionResult, content: ContentVerdicts | None, drop: frozenset[int]
    ) -> list[dict]:
        """Each attachment kept (those in C{drop} are not) stored, with its malware verdict: the document rows."""
        documents = []
        for ordinal, attachment in enumerate(result.attachments):
            if ordinal in drop:
                continue
            virus = content.documents[ordinal] if content is not None and content.documents else None
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
                    "virus": virus and virus.result,
                    "virus_detail": virus and virus.detail,
                }
            )
        return documents

    async def _check_sender(self, message: dict, raw_path: str) -> Checked | None:
        """
        The sender checks, on the first extraction of a message: a message
        reprocessed or released keeps the verdicts of its arrival (DNS
        records change; what counted is what was published then).
        """
        if self.checks is None or message.get("authentication_results") is not None:
            return None
        checked = await self.checker.verify(message["org_id"], self.checks.request(message, raw_path))
        for name in ("spf", "dkim", "dmarc", "arc"):
            metrics.SENDER_VERDICTS.labels(name, getattr(checked.verdicts, name).result).inc()
        return checked

    def _policy_broken(self, message: dict, verdicts: Verdicts | None) -> Violation | None:
        """What the organisation's sender policy says of fresh verdicts (a released message passes)."""
        if verdicts is None or message.get("released_at") is not None:
            return None
        policy = SenderPolicy.from_columns(message.get("sender_allow_domains"), message.get("sender_require"))
        return None if policy.is_default else violation(policy, verdicts)
