"""
Load generators: Postfix's smtp-source, and a small threaded Python sender.

smtp-source is the reference load tool (written in C, so the client is never
the bottleneck). Flags used, from smtp-source(1):

  -d   don't disconnect after a message: reuse each session's connection
  -s N parallel sessions        -m N messages in total
  -l N payload bytes per message (smtp-source adds From, To, Date and a
       unique Message-Id header of its own: <pid.fd.counter@host>)
  -c   print a counter of completed DATA commands (parsed as "sent")
  -4   IPv4 loopback only;  -f / -t envelope sender and recipient

It aborts at the first reply that is not positive, so a non-zero exit status
means some message was refused. smtp-source cannot attach files nor send one
huge message from several clients at once, so those rounds use
L{send_threaded}, which streams wire-ready chunks and never holds a 50 MB
message in memory twice.
"""

import re
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bench.targets import HOST, RECIPIENT, SENDER, tool

# A message ready for the wire: CRLF line endings, dot-stuffed, produced lazily.
WireMessage = Callable[[], Iterable[bytes]]


@dataclass
class LoadResult:
    sent: int
    seconds: float
    errors: list[str] = field(default_factory=list)
    ended_at: float = 0.0  # time.monotonic() when the last reply arrived


def smtp_source(port: int, size: int, messages: int, sessions: int) -> LoadResult:
    argv = [
        tool("smtp-source"), "-4", "-c", "-d",
        "-s", str(sessions), "-m", str(messages), "-l", str(size),
        "-f", SENDER, "-t", RECIPIENT,
        f"{HOST}:{port}",
    ]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True)
    ended = time.monotonic()
    counts = re.findall(rb"(\d+)\r", done.stdout)
    errors = [] if done.returncode == 0 else [done.stderr.decode("utf-8", "replace").strip()]
    return LoadResult(int(counts[-1]) if counts else 0, ended - started, errors, ended)


def _session(port: int, queue: list[WireMessage], lock: threading.Lock, result: LoadResult) -> None:
    """One connection, reused for as many messages as it can take from the queue."""
    try:
        with smtplib.SMTP(HOST, port, timeout=300) as client:
            client.ehlo("load.bench.test")
            while True:
                with lock:
                    if not queue:
                        return
                    message = queue.pop()
                client.mail(SENDER)
                client.rcpt(RECIPIENT)
                code, reply = client.docmd("DATA")
                if code != 354:
                    raise smtplib.SMTPDataError(code, reply)
                for chunk in message():
                    client.send(chunk)
                client.send(b".\r\n")
                code, reply = client.getreply()
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
                with lock:
                    result.sent += 1
    except (OSError, smtplib.SMTPException) as e:
        with lock:
            result.errors.append(f"{type(e).__name__}: {e}")


def send_threaded(port: int, messages: list[WireMessage], connections: int) -> LoadResult:
    """Send C{messages} over C{connections} concurrent sessions; time from first connect to last 250."""
    queue = list(reversed(messages))
    lock = threading.Lock()
    result = LoadResult(0, 0.0)
    threads = [
        threading.Thread(target=_session, args=(port, queue, lock, result), daemon=True)
        for _ in range(min(connections, len(messages)))
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.ended_at = time.monotonic()
    result.seconds = result.ended_at - started
    return result
