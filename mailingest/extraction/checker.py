"""
The child side of L{mailingest.extraction.checks}: a process that runs the
sender checks (L{mailingest.verification}) of several messages at once.

Run as C{python -m mailingest.extraction.checker THREADS [MEMORY_LIMIT_BYTES]}.
It reads one JSON request per line on stdin, C{{"id": n, "verify": {"raw_path":
..., "client_ip": ..., ...}}}, and writes one JSON reply per line on stdout as
each check ends, in any order: C{{"id": n, "verdicts": {...}, "text_body": b}}
(b: whether the header section read for the checks says the message is one
text body, L{mailingest.extraction.text_body}, so the daemon need not read
it again), C{{"id": n,
"missing": path}} when there is no file at C{raw_path}, or C{{"id": n,
"error": "Type: message"}} (retried by the daemon). The checks wait on DNS
servers the sender chooses, with blocking libraries (pyspf, dkimpy): each
runs in one of THREADS threads, so a silent server holds one thread for its
DNS budget, not the others' messages. A check whose DNS answers are all
cached, of a message small enough to check in a moment, is run at once in the
thread that reads the requests: most of a burst's checks are of senders
checked a moment ago, and handing each to a thread and back costs more than
the check.

It exits when stdin closes, which is also what happens when the daemon dies.
"""

import json
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from mailingest.extraction.background import run_in_background
from mailingest.extraction.text_body import HEADER_LIMIT, one_text_body
from mailingest.verification.dkim_reading import header_end
from mailingest.verification.resolver import NotCached
from mailingest.verification.verify import verify_message

HEADER_SECTION_LIMIT = 256 * 1024
# Checked from the cache in the reading thread only up to this size: a bigger
# signed message's body hash would keep the next requests from their threads.
CHECKED_AT_ONCE_BYTES = 64 * 1024
# A field that signs the message, after a line end (searched with a LF put
# first: a pattern led by a literal LF is searched fast).
_SIGNATURE_FIELD = re.compile(rb"\n(?:dkim-signature:|arc-)", re.IGNORECASE)


def message_for_checks(raw: BinaryIO, limit: int | None = None) -> bytes | None:
    """
    What the sender checks need of a message: the header section alone when it
    carries no DKIM or ARC header (SPF and DMARC read no body), else the whole
    message (a signature covers the body). A 50 MB unsigned message is then
    never held whole here. With C{limit}, None when that is more than
    C{limit} bytes, and the body is not read much past the limit.
    """
    head = raw.read(min(HEADER_SECTION_LIMIT, limit or HEADER_SECTION_LIMIT) + 1)
    ends = header_end(head)
    if ends is None or _SIGNATURE_FIELD.search(b"\n" + head, 0, ends[0] + 1):
        return _with_the_rest(head, raw, limit)
    return _within(head[: ends[1]], limit)


def _with_the_rest(head: bytes, raw: BinaryIO, limit: int | None) -> bytes | None:
    if limit is None:
        return head + raw.read()
    if len(head) > limit:
        return None
    return _within(head + raw.read(limit - len(head) + 1), limit)


def _within(message: bytes, limit: int | None) -> bytes | None:
    return None if limit is not None and len(message) > limit else message


def verify(request: dict[str, Any], cached_only: bool = False) -> dict[str, Any] | None:
    """
    The sender checks of the message at C{raw_path}, with the SMTP facts and
    DNS settings given; with C{cached_only}, None unless the message is small
    and every answer its checks need is cached.
    """
    raw_path = request["raw_path"]
    try:
        with open(raw_path, "rb") as raw:
            # From the cache, a large message is not even read whole: a thread will.
            message = message_for_checks(raw, CHECKED_AT_ONCE_BYTES if cached_only else None)
        if message is None:
            return None
        resolver = request["resolver"]
        verdicts = verify_message(
            message,
            request["client_ip"],
            request["helo"],
            request["mail_from"],
            request["authserv_id"],
            tuple(resolver) if resolver else None,
            request["budget"],
            cached_only,
        )
    except NotCached:
        return None
    except FileNotFoundError as e:
        if e.filename == raw_path:
            return {"missing": raw_path}
        return {"error": f"FileNotFoundError: {e}"}
    except Exception as e:  # MemoryError too: other checks in hand may need the memory, retried
        return {"error": f"{type(e).__name__}: {e}"}
    return {"verdicts": verdicts.as_dict(), "text_body": one_text_body(message[:HEADER_LIMIT])}


def serve(requests: BinaryIO, replies: BinaryIO, threads: int) -> None:
    """Answer requests, C{threads} at a time, until stdin closes and the checks in hand are answered."""
    lock = threading.Lock()

    def reply(request: dict[str, Any], result: dict[str, Any]) -> None:
        line = json.dumps({"id": request["id"], **result}).encode("ascii") + b"\n"
        with lock:
            replies.write(line)
            replies.flush()

    with ThreadPoolExecutor(threads, thread_name_prefix="check") as pool:
        for line in requests:
            request = json.loads(line)
            result = verify(request["verify"], cached_only=True)
            if result is None:
                pool.submit(lambda request=request: reply(request, verify(request["verify"])))
            else:
                reply(request, result)


if __name__ == "__main__":
    # Like parsing, checking is background work: taking mail in goes first.
    run_in_background(int(sys.argv[2]) if len(sys.argv) > 2 else None)
    serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]))
