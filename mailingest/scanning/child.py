"""
The child side of L{mailingest.scanning.scans}: the process that asks clamd
and rspamd (L{ContentScanner}) on a reactor of its own, so the daemon's
reactor, which takes mail in, does not pay for their connections and HTTP.

Run as C{python -m mailingest.scanning.child SETTINGS_JSON [MEMORY_LIMIT_BYTES]},
SETTINGS_JSON being C{{"clamd": ..., "clamd_max_stream": ..., "rspamd": ...,
"hostname": ..., "budget": ...}} (C{clamd}, C{rspamd}: None when off). It reads
one request per line on stdin, C{{"id": n, "scan": {"message": {...},
"raw_path": ..., "documents": [...], "sender": {...}}}}, scans them all at
once, and writes one reply per line on stdout as each ends, in any order:
C{{"id": n, "verdicts": {...}}} (L{ContentVerdicts.to_json}) or C{{"id": n,
"error": "Type: message"}}.

It exits when stdin closes, which is also what happens when the daemon dies.
"""

import json
import sys
from typing import Any

from twisted.internet import defer, protocol, stdio

from mailingest.extraction.background import run_in_background
from mailingest.scanning.clamd import ClamdClient
from mailingest.scanning.rspamd import RspamdClient
from mailingest.scanning.scanner import ContentScanner


def make_scanner(settings: dict[str, Any], reactor) -> ContentScanner:
    """The scanners SETTINGS_JSON names, on C{reactor}."""
    clamd = settings["clamd"] and ClamdClient(settings["clamd"], settings["clamd_max_stream"], reactor)
    rspamd = settings["rspamd"] and RspamdClient(settings["rspamd"], settings["hostname"], reactor=reactor)
    return ContentScanner(clamd or None, rspamd or None, settings["budget"], reactor)


async def scan(scanner: ContentScanner, request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request (without its id)."""
    try:
        verdicts = await scanner.scan(request["message"], request["raw_path"], request["documents"], request["sender"])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"verdicts": verdicts.to_json()}


class Requests(protocol.Protocol):
    """Requests on stdin, each scanned as it comes; replies on stdout as they end."""

    def __init__(self, scanner: ContentScanner, ended):
        self._scanner = scanner
        self._ended = ended
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            request = json.loads(line)
            defer.ensureDeferred(self._answer(request["id"], request["scan"]))

    async def _answer(self, request_id: int, request: dict[str, Any]) -> None:
        reply = await scan(self._scanner, request)
        self.transport.write(json.dumps({"id": request_id, **reply}).encode("ascii") + b"\n")

    def connectionLost(self, reason) -> None:
        self._ended()


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    run_in_background(int(argv[2]) if len(argv) > 2 else None)
    stdio.StandardIO(Requests(make_scanner(json.loads(argv[1]), reactor), reactor.stop), reactor=reactor)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
