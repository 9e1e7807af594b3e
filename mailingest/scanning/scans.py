"""
Content scanning in a process of its own (L{mailingest.scanning.child}),
niced like the parser and sender-check processes.

Asking clamd (a connection per file) and rspamd (an HTTP request per
message, a new connection each time: rspamd closes every one) on the
daemon's reactor cost the daemon's own CPU per message what receiving it
costs, in the process that answers SMTP clients. Here the daemon sends a
line per message and reads a line back; the metrics of the verdicts are
recorded here, where C{/metrics} is scraped.

Every message in the extraction step is scanned at once, as many as the
extraction has in hand (the process answers in any order). A scan still
unanswered C{MARGIN_SECONDS} past its budget means the process is stuck:
it is killed, and its scans in hand get C{error} verdicts, as a scanner
that does not answer gives (the organisation's C{--unscanned} applies);
the next scan starts a new process.
"""

import json
import sys

from zope.interface import implementer

from mailingest.extraction.asked import AskedChild
from mailingest.extraction.pool import MEMORY_LIMIT_BYTES, ParserDied, ParserError
from mailingest.interfaces import IContentScanner
from mailingest.ops import metrics
from mailingest.scanning.clamd import DEFAULT_MAX_STREAM, FileVerdict
from mailingest.scanning.rspamd import MESSAGE_FIELDS, SpamVerdict
from mailingest.scanning.verdicts import ContentVerdicts

SCANNER_ARGV = [sys.executable, "-m", "mailingest.scanning.child"]
MARGIN_SECONDS = 10.0


@implementer(IContentScanner)
class ScanProcess:
    """Scans with clamd at C{clamd} and/or rspamd at C{rspamd} (None: that one is off), each message within C{budget} seconds."""

    def __init__(
        self,
        clamd: str | None,
        rspamd: str | None,
        hostname: str,
        budget: float,
        clamd_max_stream: int = DEFAULT_MAX_STREAM,
        reactor=None,
        argv: list[str] = SCANNER_ARGV,
        memory_limit: int = MEMORY_LIMIT_BYTES,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.clamd = clamd
        self.rspamd = rspamd
        settings = {"clamd": clamd, "clamd_max_stream": clamd_max_stream, "rspamd": rspamd, "hostname": hostname, "budget": budget}
        argv = [*argv, json.dumps(settings), str(memory_limit)]
        self._child = AskedChild(reactor, argv, budget + MARGIN_SECONDS, "scan", "scan")

    async def scan(self, message: dict, raw_path: str, documents: list[str], sender: dict | None) -> ContentVerdicts:
        """The scan process's verdicts; C{error} ones if it ended first. Its own error is raised (L{ParserError}: retried)."""
        started = self._reactor.seconds()
        request = {
            "message": {name: message.get(name) for name in MESSAGE_FIELDS},
            "raw_path": raw_path,
            "documents": documents,
            "sender": sender,
        }
        try:
            reply = await self._child.ask(request)
        except ParserDied as e:
            if self._child.closed:
                raise  # the daemon is stopping: the message is scanned again at its next start, not held or passed
            verdicts = self._unanswered(str(e), len(documents), self._reactor.seconds() - started)
        else:
            if "error" in reply:
                raise ParserError(reply["error"])
            verdicts = ContentVerdicts.from_json(reply["verdicts"])
        record(verdicts)
        return verdicts

    def _unanswered(self, why: str, documents: int, seconds: float) -> ContentVerdicts:
        """What a scanner that did not answer gives, for each scanner that is on."""
        verdicts = ContentVerdicts(clamd=self.clamd is not None)
        if self.clamd is not None:
            error = FileVerdict("error", why, True)
            verdicts.documents = [error] * documents
            verdicts.raw = error
            verdicts.seconds["clamd"] = seconds
        if self.rspamd is not None:
            verdicts.spam = SpamVerdict("error", detail=why)
            verdicts.seconds["rspamd"] = seconds
        return verdicts

    def close(self):
        """Stop the process (its scans in hand fail with L{ParserDied}: done again later); fires when it has exited."""
        return self._child.close()


def record(verdicts: ContentVerdicts) -> None:
    """The verdict and latency metrics of one message's scan."""
    for scanner, seconds in verdicts.seconds.items():
        metrics.SCAN_SECONDS.labels(scanner).observe(seconds)
    if verdicts.virus is not None:
        metrics.VIRUS_VERDICTS.labels(verdicts.virus.result).inc()
    if verdicts.spam is not None:
        metrics.SPAM_VERDICTS.labels(verdicts.spam.action).inc()
