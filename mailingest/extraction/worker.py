"""
The child side of L{mailingest.extraction.pool}: a process that parses messages.

Run as C{python -m mailingest.extraction.worker [RETIRE_ABOVE_BYTES [MEMORY_LIMIT_BYTES]]}. It reads
one JSON request per line on stdin, C{{"raw_path": ..., "out_dir": ..., "inline_images": "skip"}}, runs
L{extract_attachments} on it and writes one JSON reply per line on stdout:

  - C{{"attachments": [...], "warnings": [...], "skipped": [...]}}: parsed;
  - C{{"unparseable": reason}}: the message can never be parsed, also when it
    needs more memory than MEMORY_LIMIT_BYTES (the worker's address space is
    capped with RLIMIT_AS at start, so a parse that would need more raises
    MemoryError; the same message would need as much again, so this is final,
    and the worker retires after replying);
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

from mailingest.extraction.attachments import UnparseableMessage, extract_attachments
from mailingest.extraction.background import run_in_background

MiB = 1024 * 1024


def handle(request: dict[str, Any]) -> dict[str, Any]:
    raw_path, out_dir = request["raw_path"], request["out_dir"]
    # out_dir is reused message after message; the daemon has stored the
    # previous message's documents before it sends the next request.
    try:
        for name in os.listdir(out_dir):
            os.unlink(os.path.join(out_dir, name))
        result = extract_attachments(raw_path, out_dir, inline_images=request.get("inline_images", "skip"))
    except UnparseableMessage as e:
        return {"unparseable": str(e)}
    except MemoryError:
        raise
    except Exception as e:
        if isinstance(e, FileNotFoundError) and e.filename == raw_path:
            return {"missing": raw_path}
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "attachments": [dataclasses.asdict(attachment) for attachment in result.attachments],
        "warnings": result.warnings,
        "skipped": result.skipped,
    }


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _out_of_memory_reason() -> str:
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return "the message needs more memory to parse than the machine has"
    return f"the message needs more than {limit // MiB} MiB of memory to parse"


def serve(requests: BinaryIO, replies: BinaryIO, retire_above: int | None = None) -> None:
    """
    Answer requests until stdin closes, or until a parse has left this process
    holding more than C{retire_above} bytes, or ran out of memory: Python keeps
    most of what a big message took, so the worker says C{"retire":
    {"resident": ..., "peak": ...}} (bytes) with that reply and exits, and the
    daemon starts a fresh one for the next message.
    """
    for line in requests:
        try:
            reply = handle(json.loads(line))
            exhausted = False
        except MemoryError:
            reply = {"unparseable": _out_of_memory_reason()}
            exhausted = True
        resident = resident_bytes()
        retire = exhausted or (retire_above is not None and resident > retire_above)
        if retire:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            reply["retire"] = {"resident": resident, "peak": peak}
        replies.write(json.dumps(reply).encode("ascii") + b"\n")
        replies.flush()
        if retire:
            return


if __name__ == "__main__":
    # Parsing is background work: when the CPUs are busy, taking mail in goes first.
    run_in_background(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]) if len(sys.argv) > 1 else None)
