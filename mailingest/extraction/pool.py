"""
Worker processes that parse messages for the extraction service.

MIME parsing is pure Python. In a thread of the daemon it holds the GIL the
reactor needs to answer SMTP clients. In worker processes
(L{mailingest.extraction.worker}) it runs on another core, and a message that makes
the parser misbehave costs a worker, not the daemon: a worker that dies (out of
memory, a crash) or is killed for taking longer than C{timeout} fails that
attempt as a transient error (L{ParserDied}), and a new worker takes the next
message. A worker's address space is capped at C{memory_limit} bytes: a message
that needs more fails for good (L{UnparseableMessage}: it would need as much
again), and that worker is replaced. Workers read their requests from a pipe and exit when it closes, so
none outlives the daemon, even one killed with SIGKILL.
"""

import json
import os
import sys
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from mailingest.ops import metrics
from mailingest.extraction.attachments import Attachment, ExtractionResult, UnparseableMessage
from mailingest.errors import BlobNotFound

log = Logger(namespace="mailingest.extraction")

MiB = 1024 * 1024
# A worker whose resident memory stays above this after a parse (a big message)
# is replaced by a fresh one, so the memory goes back to the system.
RETIRE_ABOVE_BYTES = 128 * MiB
MEMORY_LIMIT_BYTES = 1024 * MiB
WORKER_ARGV = [sys.executable, "-m", "mailingest.extraction.worker", str(RETIRE_ABOVE_BYTES)]


def worker_environment(environ) -> dict[str, str]:
    """
    The daemon's environment without its settings and credentials: the worker
    parses hostile input and needs neither the database URL nor S3 keys.
    """
    return {k: v for k, v in environ.items() if not k.startswith(("MAILINGEST_", "AWS_"))}


class ParserDied(Exception):
    """The worker process ended, or was killed, before it replied."""


class ParserError(Exception):
    """The parser raised something other than L{UnparseableMessage} (a bug): retried."""


class ChildProcess(protocol.ProcessProtocol):
    """A child of the daemon that can be killed and whose stderr is logged as C{label}."""

    label = "parser worker"

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("{label} {pid}: {line}", label=self.label, pid=self.transport.pid, line=line)


class _Worker(ChildProcess):
    """One child process; it answers one request at a time."""

    def __init__(self, reactor, timeout: float):
        self._reactor = reactor
        self._timeout = timeout
        self._reply: defer.Deferred | None = None
        self._deadline = None
        self._buffer = b""
        self.alive = True
        # Why the pool is ending this worker: "timeout", "memory" or "stop";
        # None while it may take requests (ending then means it died).
        self.ending: str | None = None
        self.ended = defer.Deferred()

    @property
    def busy(self) -> bool:
        return self._reply is not None

    @property
    def reusable(self) -> bool:
        return self.alive and self.ending is None

    def ask(self, request: dict[str, Any]) -> defer.Deferred:
        self._reply = defer.Deferred()
        self._deadline = self._reactor.callLater(self._timeout, self._overtime)
        self.transport.write(json.dumps(request).encode("ascii") + b"\n")
        return self._reply

    def _overtime(self) -> None:
        self._deadline = None
        self.ending = "timeout"
        self.kill()

    def retire(self, memory: dict[str, int]) -> None:
        """Take no more requests: the worker is exiting after its last reply."""
        self.ending = "memory"
        metrics.PARSER_REPLACED.labels("memory").inc()
        self.transport.closeStdin()
        log.info(
            "parser worker {pid} replaced: it kept {resident_mib:.0f} MiB after a message (peak {peak_mib:.0f} MiB)",
            pid=self.transport.pid,
            resident_mib=memory["resident"] / MiB,
            peak_mib=memory["peak"] / MiB,
        )

    def stop(self) -> None:
        """The pool is closing: end the worker, killing it if it is busy (not counted as replaced)."""
        if self.ending is None:
            self.ending = "stop"
        if self.busy:
            self.kill()
        else:
            self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\n" not in self._buffer or self._reply is None:
            return
        line, self._buffer = self._buffer.split(b"\n", 1)
        self._answer().callback(json.loads(line))

    def processEnded(self, reason) -> None:
        self.alive = False
        if self.ending == "timeout":
            metrics.PARSER_REPLACED.labels("timeout").inc()
        elif self.ending is None:
            metrics.PARSER_REPLACED.labels("died").inc()
            log.warn("parser worker {pid} ended unexpectedly: {why}", pid=self.transport.pid, why=reason.getErrorMessage())
        if self._reply is not None:
            if self.ending == "timeout":
                why = f"the parser was stopped after {self._timeout:g} s"
            else:
                why = f"the parser process ended ({reason.getErrorMessage()})"
            self._answer().errback(ParserDied(why))
        self.ended.callback(None)

    def _answer(self) -> defer.Deferred:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        reply, self._reply = self._reply, None
        return reply


class ParsePool:
    """
    Up to C{size} worker processes, started when first needed and kept. L{parse}
    waits for a free one.
    """

    def __init__(
        self,
        size: int = 1,
        timeout: float = 300.0,
        reactor=None,
        argv: list[str] = WORKER_ARGV,
        memory_limit: int = MEMORY_LIMIT_BYTES,
        inline_images: str = "skip",
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._argv = argv
        self._memory_limit = memory_limit
        self._inline_images = inline_images
        self._timeout = timeout
        self._slots = defer.DeferredSemaphore(size)
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._closed = False

    async def parse(self, raw_path: str, out_dir: str) -> ExtractionResult:
        """
        What L{extract_attachments} returns or raises, computed in a worker;
        L{BlobNotFound} when there is no C{raw_path}. The worker empties
        C{out_dir} first.
        """
        reply = await self._ask({"raw_path": raw_path, "out_dir": out_dir, "inline_images": self._inline_images})
        return ExtractionResult([Attachment(**a) for a in reply["attachments"]], reply["warnings"], reply["skipped"])

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """A free worker's reply to C{request}; its failures as exceptions."""
        await self._slots.acquire()
        try:
            worker = self._worker()
            try:
                reply = await worker.ask(request)
                if reply.get("retire"):
                    worker.retire(reply["retire"])
            finally:
                if worker.reusable and not self._closed:
                    self._idle.append(worker)
        finally:
            self._slots.release()
        if "missing" in reply:
            raise BlobNotFound(f"no file {reply['missing']}")
        if "unparseable" in reply:
            raise UnparseableMessage(reply["unparseable"])
        if "error" in reply:
            raise ParserError(reply["error"])
        return reply

    def _worker(self) -> _Worker:
        if self._closed:
            raise ParserDied("the parser pool is closed")
        while self._idle:
            worker = self._idle.pop()
            if worker.reusable:
                return worker
        worker = _Worker(self._reactor, self._timeout)
        argv = [*self._argv, str(self._memory_limit)]
        self._reactor.spawnProcess(worker, argv[0], argv, env=worker_environment(os.environ))
        self._workers.add(worker)
        worker.ended.addCallback(lambda _: self._workers.discard(worker))
        return worker

    def close(self) -> defer.Deferred:
        """Stop every worker (a message being parsed is extracted again later); fires when they have exited."""
        self._closed = True
        self._idle.clear()
        ended = []
        for worker in list(self._workers):
            ended.append(worker.ended)
            worker.stop()
        return defer.DeferredList(ended)
