"""
The child side of L{mailingest.parse_pool}: a process that parses messages.

Run as C{python -m mailingest.parse_worker [RETIRE_ABOVE_BYTES]}. It reads one JSON request per
line on stdin, C{{"raw_path": ..., "out_dir": ...}}, runs
L{extract_attachments} on it and writes one JSON reply per line on stdout:

  - C{{"attachments": [...], "warnings": [...]}}: parsed;
  - C{{"unparseable": reason}}: the message can never be parsed;
  - C{{"missing": path}}: there is no file at C{raw_path};
  - C{{"error": "Type: message"}}: anything else (retried by the daemon).

It exits when stdin closes, which is also what happens when the daemon dies,
however it dies: no worker outlives its daemon.
"""

import dataclasses
import json
import os
import resource
import sys
from typing import Any, BinaryIO

from mailingest.attachments import UnparseableMessage, extract_attachments


def handle(request: dict[str, Any]) -> dict[str, Any]:
    raw_path, out_dir = request["raw_path"], request["out_dir"]
    # out_dir is reused message after message; the daemon has stored the
    # previous message's documents before it sends the next request.
    try:
        for name in os.listdir(out_dir):
            os.unlink(os.path.join(out_dir, name))
        result = extract_attachments(raw_path, out_dir)
    except UnparseableMessage as e:
        return {"unparseable": str(e)}
    except Exception as e:
        if isinstance(e, FileNotFoundError) and e.filename == raw_path:
            return {"missing": raw_path}
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "attachments": [dataclasses.asdict(attachment) for attachment in result.attachments],
        "warnings": result.warnings,
    }


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def serve(requests: BinaryIO, replies: BinaryIO, retire_above: int | None = None) -> None:
    """
    Answer requests until stdin closes, or until a parse has left this process
    holding more than C{retire_above} bytes: Python keeps most of what a big
    message took, so the worker says C{"retire": {"resident": ..., "peak":
    ...}} (bytes) with that reply and exits, and the daemon starts a fresh one
    for the next message.
    """
    for line in requests:
        reply = handle(json.loads(line))
        resident = resident_bytes()
        retire = retire_above is not None and resident > retire_above
        if retire:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            reply["retire"] = {"resident": resident, "peak": peak}
        replies.write(json.dumps(reply).encode("ascii") + b"\n")
        replies.flush()
        if retire:
            return


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else None
    serve(sys.stdin.buffer, sys.stdout.buffer, limit)
