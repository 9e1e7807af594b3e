"""
Hostile and broken clients, from raw sockets: each is answered as designed and
the daemon keeps serving a normal client afterwards.
"""

import socket
import struct
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.daemon import RunningDaemon, message, temp_dir


class Conversation:
    """A blocking raw SMTP client (run it in a thread)."""

    def __init__(self, port: int, preamble: bytes = b"", source: str = "127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        if preamble:
            self.sock.sendall(preamble)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines) or b"<closed>"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return True

    def close(self):
        self.sock.close()


class HardeningCase(unittest.TestCase):
    overrides: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = temp_dir(self)
        self.daemon = RunningDaemon(self.directory, **self.overrides)
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        yield self.daemon.store.add_org("acme", "Acme Corp")

    def talk(self, fn, *args):
        return threads.deferToThread(fn, *args)

    @defer.inlineCallbacks
    def assertStillServing(self):
        code, _ = yield self.daemon.send(message(message_id=f"<alive-{time.monotonic()}@x>"), ["orders+acme@example.com"])
        self.assertEqual(code, 250)


class InputLimitTests(HardeningCase):
    @defer.inlineCallbacks
    def test_command_line_too_long(self):
        def run():
            c = Conversation(self.daemon.port)
            replies = [c.command(b"EHLO " + b"a" * 600), c.command(b"NOOP")]
            c.close()
            return replies

        long_reply, noop = yield self.talk(run)
        self.assertTrue(long_reply.startswith(b"500 5.5.2"), long_reply)
        self.assertTrue(noop.startswith(b"250 2.0.0"), noop)
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_endless_command_line(self):
        def run():
            c = Conversation(self.daemon.port)
            c.sock.sendall(b"HELO " + b"x" * 200000)
            first = c.reply()
            c.sock.sendall(b"\r\nNOOP\r\n")
            return first, c.reply()

        first, noop = yield self.talk(run)
        self.assertTrue(first.startswith(b"500 5.5.2"), first)
        self.assertTrue(noop.startswith(b"250"), noop)

    @defer.inlineCallbacks
    def test_nul_and_eight_bit_garbage_in_commands(self):
        def run():
            c = Conversation(self.daemon.port)
            return [c.command(b"HELO a\x00b"), c.command(b"MAIL FROM:<\xff\xfe@x>"), c.command(b"NOOP")]

        nul, garbage, noop = yield self.talk(run)
        self.assertTrue(nul.startswith(b"500 5.5.2"), nul)
        self.assertTrue(garbage.startswith(b"500 5.5.2"), garbage)
        self.assertTrue(noop.startswith(b"250"), noop)
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_too_many_errors_disconnects(self):
        def run():
            c = Conversation(self.daemon.port)
            replies = []
            for _ in range(25):
                replies.append(c.command(b"BOGUS"))
                if b"421" in replies[-1] or replies[-1] == b"<closed>":
                    break
            return replies, c.closed()

        replies, closed = yield self.talk(run)
        self.assertTrue(any(r.startswith(b"421 4.7.0") for r in replies), replies[-3:])
        self.assertTrue(closed)
        yield self.assertStillServing()


class SmugglingTests(HardeningCase):
    """Only CRLF.CRLF ends DATA; other endings are message text (2023 SMTP smuggling)."""

    VARIANTS = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\n.\r",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
    ]

    @defer.inlineCallbacks
    def test_smuggling_variants(self):
        for i, ending in enumerate(self.VARIANTS):
            smuggled = (
                b"MAIL FROM:<admin@victim.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nfake"
            )

            def run():
                c = Conversation(self.daemon.port)
                c.command(b"EHLO customer.test")
                c.command(b"MAIL FROM:<buyer@customer.test>")
                c.command(b"RCPT TO:<orders+acme@example.com>")
                c.command(b"DATA")
                c.sock.sendall(
                    f"Subject: variant {i}\r\nMessage-ID: <variant-{i}@customer.test>\r\n\r\nhello".encode()
                    + ending
                    + smuggled
                    + ending
                    + b"real end\r\n.\r\n"
                )
                first = c.reply()
                quit_ = c.command(b"QUIT")
                return first, quit_

            first, quit_ = yield self.talk(run)
            self.assertTrue(first.startswith(b"250 2.0.0"), (ending, first))
            self.assertTrue(quit_.startswith(b"221"), (ending, quit_))
        rows = yield self.daemon.store.list_messages(limit=100)
        self.assertEqual(len(rows), len(self.VARIANTS))
        self.assertEqual({r["subject"] for r in rows}, {f"variant {i}" for i in range(len(self.VARIANTS))})
        for path in self.daemon.blob_files():
            with open(path, "rb") as f:
                stored = f.read()
            self.assertIn(b"MAIL FROM:<admin@victim.test>", stored)
            self.assertTrue(stored.endswith(b"real end\r\n"))


class TimeoutTests(HardeningCase):
    overrides = {"timeout": "0.5"}

    @defer.inlineCallbacks
    def test_idle_client_is_dropped(self):
        def run():
            c = Conversation(self.daemon.port)
            c.command(b"EHLO customer.test")
            started = time.monotonic()
            reply = c.reply()
            return reply, time.monotonic() - started, c.closed()

        reply, waited, closed = yield self.talk(run)
        self.assertTrue(reply.startswith(b"421"), reply)
        self.assertLess(waited, 5)
        self.assertTrue(closed)


class ConnectionLimitTests(HardeningCase):
    overrides = {"max_connections_per_ip": "5"}

    @defer.inlineCallbacks
    def test_sixth_connection_from_one_address(self):
        def run():
            first = [Conversation(self.daemon.port) for _ in range(5)]
            sixth = Conversation(self.daemon.port)
            works = [c.command(b"NOOP") for c in first]
            for c in first + [sixth]:
                c.close()
            return sixth.greeting, works

        sixth, works = yield self.talk(run)
        self.assertTrue(sixth.startswith(b"421 4.7.0"), sixth)
        self.assertEqual([w[:3] for w in works], [b"250"] * 5)


def proxy_v2(source: str, port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 2525)
    return signature + b"\x21\x11" + struct.pack("!H", len(addresses)) + addresses


class ProxyProtocolTests(HardeningCase):
    overrides = {"smtp": ["haproxy:tcp:0:interface=127.0.0.1"], "max_connections_per_ip": "1"}

    @defer.inlineCallbacks
    def test_proxy_v1_and_v2_give_the_real_client(self):
        def run(preamble):
            c = Conversation(self.daemon.port, preamble)
            ehlo = c.command(b"EHLO customer.test")
            c.command(b"QUIT")
            return ehlo

        v1 = yield self.talk(run, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 2525\r\n")
        self.assertIn(b"203.0.113.7", v1)
        v2 = yield self.talk(run, proxy_v2("198.51.100.9", 40001))
        self.assertIn(b"198.51.100.9", v2)

    @defer.inlineCallbacks
    def test_limits_count_the_real_client(self):
        def run():
            a = Conversation(self.daemon.port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 2525\r\n")
            b = Conversation(self.daemon.port, b"PROXY TCP4 203.0.113.8 127.0.0.1 40000 2525\r\n")
            c = Conversation(self.daemon.port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40002 2525\r\n")
            greetings = a.greeting, b.greeting, c.greeting
            for conv in (a, b, c):
                conv.close()
            return greetings

        a, b, c = yield self.talk(run)
        self.assertTrue(a.startswith(b"220") and b.startswith(b"220"), (a, b))
        self.assertTrue(c.startswith(b"421 4.7.0"), c)
