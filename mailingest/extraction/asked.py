"""
One child process of the daemon asked over JSON lines: each request a line
C{{"id": n, KEY: request}}, each reply a line C{{"id": n, ...}}, in any order
(the child works on several at once).

A request unanswered after C{timeout} seconds means the child is stuck (what
it runs bounds its own waits): the child is killed, every request it held
fails with L{ParserDied}, and the next request starts a new child.
"""

import json
import os
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailingest.extraction.pool import ChildProcess, ParserDied, worker_environment

log = Logger(namespace="mailingest.extraction")


class _Asked(ChildProcess):
    """The running child; its replies come back by request id, in any order."""

    def __init__(self, reactor, timeout: float, key: str, noun: str):
        self._reactor = reactor
        self._timeout = timeout
        self._key = key
        self._noun = noun
        self.label = f"{noun} process"
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
        self.transport.write(json.dumps({"id": self._next_id, self._key: request}).encode("ascii") + b"\n")
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
            why = f"a {self._noun} was stopped after {self._timeout:g} s"
        else:
            why = f"the {self._noun} process ended ({reason.getErrorMessage()})"
        if self._asked:
            log.warn("{why}; {count} {noun}(s) in hand failed", why=why, count=len(self._asked), noun=self._noun)
        asked, self._asked = self._asked, {}
        for reply, deadline in asked.values():
            if deadline.active():
                deadline.cancel()
            reply.errback(ParserDied(why))
        self.ended.callback(None)


class AskedChild:
    """
    The child C{argv}, started at the first request and again at the first
    request after it ended; C{key} names the request in its lines, C{noun}
    the work in log lines and errors ("sender check", "scan").
    """

    def __init__(self, reactor, argv: list[str], timeout: float, key: str, noun: str):
        self._reactor = reactor
        self._argv = argv
        self._timeout = timeout
        self._key = key
        self._noun = noun
        self._child: _Asked | None = None
        self.closed = False

    def ask(self, request: dict[str, Any]) -> defer.Deferred:
        """The child's reply to C{request} (a dict without its id); L{ParserDied} if the child ends first."""
        if self.closed:
            return defer.fail(ParserDied(f"the {self._noun} process is closed"))
        if self._child is None or not self._child.alive:
            self._child = _Asked(self._reactor, self._timeout, self._key, self._noun)
            environment = dict(worker_environment(os.environ), MALLOC_ARENA_MAX="2")
            self._reactor.spawnProcess(self._child, self._argv[0], self._argv, env=environment)
        return self._child.ask(request)

    def close(self) -> defer.Deferred:
        """Stop the child (its requests in hand fail); fires when it has exited."""
        self.closed = True
        if self._child is None or not self._child.alive:
            return defer.succeed(None)
        self._child.kill()
        return self._child.ended
