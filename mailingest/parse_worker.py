"""
The child side of L{mailingest.parse_pool}: a process that parses messages.

Run as C{python -m mailingest.parse_worker}. It reads one JSON request per
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
    except FileNotFoundError as e:
        if e.filename != raw_path:
            return {"error": f"{type(e).__name__}: {e}"}
        return {"missing": raw_path}
    except UnparseableMessage as e:
        return {"unparseable": str(e)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "attachments": [dataclasses.asdict(attachment) for attachment in result.attachments],
        "warnings": result.warnings,
    }


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    for line in requests:
        replies.write(json.dumps(handle(json.loads(line))).encode("ascii") + b"\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
