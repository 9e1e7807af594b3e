"""
CPU per message of the SMTP session on the reactor, in one process (issue 29).

The daemon's own factory (L{IngestSMTPFactory} over L{IngestDeliveries} and
L{Ingest}) is driven over StringTransports as smtp-source drives it (HELO
once, then MAIL, RCPT, DATA, the message and "." for each message, one command
at a time, several sessions side by side), with a store and a blob store in
memory that answer at once, and the daemon's text log written to /dev/null.
What it measures is the Python work of the dialogue and the delivery path on
the reactor; the sockets, epoll and the database are not in it.

On a shared machine rates are noise; the figure is the process CPU time
(C{time.process_time}) of the best of C{--repeat} rounds, divided by the
messages.

    python -m bench.smtp_session [--messages 2000] [--sessions 20] [--size 1024]
    python -m bench.smtp_session --profile     # cProfile of one round, by own time
"""

import argparse
import cProfile
import itertools
import os
import pstats
import shutil
import sys
import tempfile
import time

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner
from zope.interface import implementer

from bench.targets import DOMAIN, ORG, RECIPIENT, SENDER
from mailingest.delivery.directory import OrgDirectory
from mailingest.delivery.ingest import Ingest
from mailingest.delivery.transaction import IngestDeliveries
from mailingest.interfaces import IIntakeStore
from mailingest.ops.logs import make_observer
from mailingest.smtp.protocol import IngestSMTPFactory

HOSTNAME = "mx.bench.test"


@implementer(IIntakeStore)
class InstantStore:
    """Rows committed at once: one organisation, ids counted."""

    def __init__(self):
        self._ids = itertools.count(1)

    def active_orgs(self):
        return defer.succeed({ORG: 1})

    def get_org(self, slug):
        return defer.succeed({"id": 1, "slug": ORG, "active": True} if slug == ORG else None)

    def insert_messages(self, rows):
        return defer.succeed([next(self._ids) for _ in rows])

    def raw_key_in_use(self, key):
        return defer.succeed(False)


class InstantBlobs:
    """Blobs kept at once (and dropped: only their count matters)."""

    def __init__(self):
        self.stored = 0

    def put_bytes(self, key, data, sha256):
        self.stored += 1
        return defer.succeed(None)

    def put_file(self, key, path, sha256, size):
        self.stored += 1
        return defer.succeed(None)

    def delete(self, key):
        return defer.succeed(None)


def wire_message(number: int, size: int) -> bytes:
    """What smtp-source -l SIZE sends: From, To, Date, a unique Message-Id, then SIZE bytes of lines of X."""
    header = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: Mon, 07 Dec 2026 02:00:00 +0000\r\n"
        f"Message-Id: <{os.getpid()}.{number}@load.bench.test>\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n"
    return header + body + b".\r\n"


class Round:
    """One daemon's SMTP side, and the sessions a round drives."""

    def __init__(self, spool_dir: str, sessions: int):
        # The real reactor's timers (a heap), not task.Clock's sorted list: the reactor never runs
        # here, so no timer fires, but arming, resetting and cancelling them costs what it costs in the daemon.
        from twisted.internet import reactor as clock

        self.clock = clock
        self.store = InstantStore()
        self.blobs = InstantBlobs()
        directory = OrgDirectory(self.store)
        directory.refresh()
        ingest = Ingest(self.store, self.blobs, directory, [DOMAIN], HOSTNAME, spool_dir, clock=self.clock)
        self.factory = IngestSMTPFactory(
            IngestDeliveries(ingest), hostname=HOSTNAME, max_message_size=10 * 1024 * 1024, max_recipients=100,
            timeout=300, max_connections=1000, max_connections_per_ip=1000, clock=self.clock,
        )
        self.sessions = []
        for port in range(40000, 40000 + sessions):
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(transport)
            self.sessions.append((protocol, transport))
            self._expect(transport, b"220")
            protocol.dataReceived(b"HELO load.bench.test\r\n")
            self._expect(transport, b"250")

    @staticmethod
    def _expect(transport, code: bytes) -> None:
        reply = transport.value()
        transport.clear()
        if not reply.startswith(code):
            raise SystemExit(f"expected {code.decode()}, got {reply!r}")

    def run(self, messages: list[bytes]) -> None:
        """Each message on the next session in turn, a command at a time, each reply checked."""
        mail = b"MAIL FROM:<" + SENDER.encode() + b">\r\n"
        rcpt = b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n"
        expect = self._expect
        sessions = itertools.cycle(self.sessions)
        for message in messages:
            protocol, transport = next(sessions)
            protocol.dataReceived(mail)
            expect(transport, b"250")
            protocol.dataReceived(rcpt)
            expect(transport, b"250")
            protocol.dataReceived(b"DATA\r\n")
            expect(transport, b"354")
            protocol.dataReceived(message)
            expect(transport, b"250")

    def close(self) -> None:
        for protocol, transport in self.sessions:
            protocol.dataReceived(b"QUIT\r\n")
            protocol.connectionLost(None)


def one_round(messages: list[bytes], sessions: int, spool_dir: str, profile: cProfile.Profile | None = None) -> float:
    """CPU seconds of one round (the sessions' setup left out)."""
    bench = Round(spool_dir, sessions)
    if profile is not None:
        profile.enable()
    started = time.process_time()
    bench.run(messages)
    cpu = time.process_time() - started
    if profile is not None:
        profile.disable()
    bench.close()
    if bench.blobs.stored != len(messages):
        raise SystemExit(f"{bench.blobs.stored} of {len(messages)} messages stored")
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per round (default 2000)")
    parser.add_argument("--sessions", type=int, default=20, help="sessions side by side (default 20)")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes per message (default 1024)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported (default 5)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round instead")
    args = parser.parse_args(argv)

    devnull = open(os.devnull, "w")
    globalLogBeginner.beginLoggingTo([make_observer("text", devnull)], redirectStandardIO=False)
    spool_dir = tempfile.mkdtemp(prefix="bench-smtp-")
    try:
        messages = [wire_message(n, args.size) for n in range(args.messages)]
        if args.profile:
            profile = cProfile.Profile()
            one_round(messages, args.sessions, spool_dir, profile)
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(40)
            return 0
        one_round(messages[: args.messages // 10 or 1], args.sessions, spool_dir)  # warm up
        rounds = [one_round(messages, args.sessions, spool_dir) for _ in range(args.repeat)]
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    per_message = [cpu / args.messages * 1e6 for cpu in rounds]
    print(
        f"{min(per_message):.1f} µs CPU per message (best of {args.repeat};"
        f" all: {', '.join(f'{r:.1f}' for r in per_message)}), {args.messages} messages of {args.size} bytes"
        f" over {args.sessions} sessions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
