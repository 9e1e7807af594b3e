"""
Scanning one message's content within its time budget (C{--scan-budget},
like the DNS budget of the sender checks): its documents and its raw copy
with clamd, a few at a time, while rspamd reads the raw copy. It runs in
the scan process (L{mailingest.scanning.child}); the daemon records the
metrics of what it answers (L{mailingest.scanning.scans}).
"""

import os
import time

from twisted.internet import defer

from mailingest.scanning.clamd import ClamdClient, FileVerdict
from mailingest.scanning.rspamd import RspamdClient, SpamVerdict
from mailingest.scanning.verdicts import ContentVerdicts

# Streams to clamd at once for one message (clamd scans in its own threads).
STREAMS_AT_ONCE = 4
DEFAULT_BUDGET_SECONDS = 30.0


class ContentScanner:
    """
    The configured scanners (either may be None: that scan is off). It has
    L{mailingest.interfaces.IContentScanner}'s C{scan} without declaring it:
    importing the interfaces would cost the scan process's start-up more than
    the rest of what it imports.
    """

    def __init__(
        self, clamd: ClamdClient | None, rspamd: RspamdClient | None, budget: float = DEFAULT_BUDGET_SECONDS, clock=None
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clamd = clamd
        self.rspamd = rspamd
        self.budget = budget
        self.clock = clock

    async def scan(self, message: dict, raw_path: str, documents: list[str], sender: dict | None) -> ContentVerdicts:
        """The verdicts on C{message} stored at C{raw_path} with its extracted C{documents} (paths, in order)."""
        deadline = self.clock.seconds() + self.budget
        verdicts = ContentVerdicts(clamd=self.clamd is not None)
        work = []
        if self.clamd is not None:
            work.append(defer.ensureDeferred(self._viruses(verdicts, raw_path, documents, deadline)))
        if self.rspamd is not None:
            work.append(defer.ensureDeferred(self._spam(verdicts, message, raw_path, sender, deadline)))
        await defer.gatherResults(work, consumeErrors=True)
        return verdicts

    async def _viruses(self, verdicts: ContentVerdicts, raw_path: str, documents: list[str], deadline: float) -> None:
        started = time.monotonic()
        # The raw copy too (a body clamd finds something in); past clamd's limit its documents were scanned one by one.
        whole = os.stat(raw_path).st_size <= self.clamd.max_stream
        paths = documents + [raw_path] if whole else documents
        found: list[FileVerdict | None] = [None] * len(paths)
        queue = iter(enumerate(paths))

        async def stream() -> None:
            # A loop, not a semaphore's waiters: once the budget is spent every scan ends at once, and a
            # thousand waiters released one by the other would recurse past Python's stack.
            for n, path in queue:
                found[n] = await self.clamd.scan(path, deadline - self.clock.seconds())

        await defer.gatherResults([defer.ensureDeferred(stream()) for _ in range(min(STREAMS_AT_ONCE, len(paths)))], consumeErrors=True)
        if whole:
            verdicts.raw = found.pop()
        verdicts.documents = found
        verdicts.seconds["clamd"] = time.monotonic() - started

    async def _spam(self, verdicts: ContentVerdicts, message: dict, raw_path: str, sender: dict | None, deadline: float) -> None:
        started = time.monotonic()
        spam: SpamVerdict = await self.rspamd.check(raw_path, message, sender, deadline - self.clock.seconds())
        verdicts.spam = spam
        verdicts.seconds["rspamd"] = time.monotonic() - started
