"""
The sender checks of messages, in their own child process
(L{mailingest.extraction.checker}), apart from parsing.

A check waits on DNS servers the sender picks, for up to its DNS budget. In
the parser workers, one silent server held a worker per message, and every
organisation's mail queued behind it. Here up to C{size} checks run at once
(threads of one process), at most C{per_org} of them for one organisation:
an organisation whose senders' DNS never answers waits on its own checks,
and another organisation's message is checked in a free thread at once.

A check taking longer than C{timeout} (the DNS budget bounds its lookups, so
this is a stuck process) kills the process; its checks in hand fail as
transient errors (L{ParserDied}) and the next check starts a new process.
"""

import sys
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailingest.errors import BlobNotFound
from mailingest.extraction.asked import AskedChild
from mailingest.extraction.pool import MEMORY_LIMIT_BYTES, ParserError
from mailingest.verification.results import Verdicts

CHECKS_AT_ONCE = 16
CHECKS_PER_ORG = 4
CHECKER_ARGV = [sys.executable, "-m", "mailingest.extraction.checker"]


@dataclass(frozen=True)
class Checked:
    """
    A message's sender verdicts, and whether it is one text body
    (L{mailingest.extraction.text_body}): the check process read its header
    section anyway, so extraction need not read it again.
    """

    verdicts: Verdicts
    text_body: bool


class CheckPool:
    """Sender checks, C{size} at once and C{per_org} at once for one organisation, in one child process."""

    def __init__(
        self,
        size: int = CHECKS_AT_ONCE,
        per_org: int = CHECKS_PER_ORG,
        timeout: float = 300.0,
        reactor=None,
        argv: list[str] = CHECKER_ARGV,
        memory_limit: int = MEMORY_LIMIT_BYTES,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._checker = AskedChild(reactor, [*argv, str(size), str(memory_limit)], timeout, "verify", "sender check")
        self.per_org = per_org
        self._slots = defer.DeferredSemaphore(size)
        self._orgs: dict[Hashable, defer.DeferredSemaphore] = {}

    async def verify(self, org: Hashable, request: dict[str, Any]) -> Checked:
        """
        The sender checks of the message at C{request["raw_path"]} for
        organisation C{org} (the request of
        L{mailingest.verification.settings.CheckSettings.request}).
        """
        turn = self._orgs.setdefault(org, defer.DeferredSemaphore(self.per_org))
        await turn.acquire()
        try:
            async with self._slots:
                reply = await self._checker.ask(request)
        finally:
            turn.release()
            if turn.tokens == turn.limit and self._orgs.get(org) is turn:
                del self._orgs[org]
        if "missing" in reply:
            raise BlobNotFound(f"no file {reply['missing']}")
        if "error" in reply:
            raise ParserError(reply["error"])
        return Checked(Verdicts.from_dict(reply["verdicts"]), reply["text_body"])

    def close(self) -> defer.Deferred:
        """Stop the process (checks in hand are done again later); fires when it has exited."""
        return self._checker.close()
