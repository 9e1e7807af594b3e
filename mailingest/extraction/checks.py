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

import json
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailingest.errors import BlobNotFound
from mailingest.extraction.pool import MEMORY_LIMIT_BYTES, ChildProcess, ParserDied, ParserError, worker_environment
from mailingest.verification.results import Verdicts

log = Logger(namespace="mailingest.extraction")

CHECKS_AT_ONCE = 16
CHECKS_PER_ORG = 4
CHECKER_ARGV = [sys.executable, "-m", "mailingest.extraction.checker"]


class _Checker(ChildProcess):
    """The child process; its replies come back by request id, in any order."""

    label = "sender check process"

    def __init__(self, reactor, timeout: float):
        self._reactor = reactor
        self._timeout = timeout
        self._asked: dict[int, tuple[defer.Deferred, Any]] = {}
        self._next_id = 0
        self._buffer = b""
        self.alive = True
        self.overtime = False
        self.ended = defer.Deferred()

    def ask(self, request: dict[str, Any]) -> defer.Deferred:
        self._next_id += 1
        reply = defer.Deferred()
        self._asked[self._next_id] = (reply, self._reactor.callLater(self._timeout, self._overtime))
        self.transport.write(json.dumps({"id": self._next_id, "verify": request}).encode("ascii") + b"\n")
        return reply

    def _overtime(self) -> None:
        self.overtime = True
        self.kill()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            reply = json.loads(line)
            asked = self._asked.pop(reply.pop("id"), None)
            if asked is not None:
                asked[1].cancel()
                asked[0].callback(reply)

    def processEnded(self, reason) -> None:
        self.alive = False
        if self.overtime:
            why = f"a sender check was stopped after {self._timeout:g} s"
        else:
            why = f"the sender check process ended ({reason.getErrorMessage()})"
        if self._asked:
            log.warn("{why}; {count} check(s) in hand are retried", why=why, count=len(self._asked))
        asked, self._asked = self._asked, {}
        for reply, deadline in asked.values():
            if deadline.active():
                deadline.cancel()
            reply.errback(ParserDied(why))
        self.ended.callback(None)


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
        self._reactor = reactor
        self._argv = [*argv, str(size), str(memory_limit)]
        self._timeout = timeout
        self.per_org = per_org
        self._slots = defer.DeferredSemaphore(size)
        self._orgs: dict[Hashable, defer.DeferredSemaphore] = {}
        self._checker: _Checker | None = None
        self._closed = False

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
                reply = await self._process().ask(request)
        finally:
            turn.release()
            if turn.tokens == turn.limit and self._orgs.get(org) is turn:
                del self._orgs[org]
        if "missing" in reply:
            raise BlobNotFound(f"no file {reply['missing']}")
        if "error" in reply:
            raise ParserError(reply["error"])
        return Checked(Verdicts.from_dict(reply["verdicts"]), reply["text_body"])

    def _process(self) -> _Checker:
        if self._closed:
            raise ParserDied("the sender check pool is closed")
        if self._checker is None or not self._checker.alive:
            self._checker = _Checker(self._reactor, self._timeout)
            environment = dict(worker_environment(os.environ), MALLOC_ARENA_MAX="2")
            self._reactor.spawnProcess(self._checker, self._argv[0], self._argv, env=environment)
        return self._checker

    def close(self) -> defer.Deferred:
        """Stop the process (checks in hand are done again later); fires when it has exited."""
        self._closed = True
        if self._checker is None or not self._checker.alive:
            return defer.succeed(None)
        self._checker.kill()
        return self._checker.ended
