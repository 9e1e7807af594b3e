"""
Hostile and broken clients, from raw sockets: each is answered as designed and
the daemon keeps serving a normal client afterwards.
"""

import os
import select
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import time

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailingest.smtp import limits as smtp_limits, replies as smtp_replies
from mailingest.smtp import protocol as smtp_server
from mailingest.app.service import build_daemon
from mailingest.errors import ConfigError
from mailingest.delivery.spool import MEMORY_LIMIT
from tests.daemon import DaemonTestCase, message, settings_for, sleep, temp_dir
from tests.test_shutdown import hang_up, open_data
from tests.test_smtp_protocol import Server, rejected


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


class HardeningCase(DaemonTestCase):
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
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.01)

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


class ProbingTests(HardeningCase):
    """Guessing organisations (19 unknown ones, a NOOP, repeated) is slowed down and cut off."""

    @defer.inlineCallbacks
    def test_probing_is_slowed_and_cut_off(self):
        self.patch(smtp_replies, "ERROR_SLEEP_SECONDS", 0.05)

        def run():
            c = Conversation(self.daemon.port)
            c.command(b"EHLO prober.test")
            c.command(b"MAIL FROM:<p@prober.test>")
            replies, times = [], []
            for n in range(200):
                started = time.monotonic()
                replies.append(c.command(b"RCPT TO:<orders+guess%d@example.com>" % n))
                times.append(time.monotonic() - started)
                if not replies[-1].startswith(b"550"):
                    break
                if n % 19 == 18:
                    c.command(b"NOOP")
            return replies, times, c.closed()

        replies, times, closed = yield self.talk(run)
        self.assertEqual(sum(r.startswith(b"550 5.1.1") for r in replies), smtp_replies.ERROR_LIMIT)
        self.assertTrue(replies[-1].startswith(b"421 4.7.0"), replies[-1])
        self.assertTrue(closed)
        self.assertGreater(times[smtp_replies.ERROR_LIMIT - 1], 0.2)
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

    @defer.inlineCallbacks
    def test_byte_at_a_time_client_is_dropped(self):
        def run():
            c = Conversation(self.daemon.port)
            c.command(b"EHLO customer.test")
            started = time.monotonic()
            for byte in b"MAIL FROM:<slow@customer.test>" * 4:
                try:
                    c.sock.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)
            return c.reply(), time.monotonic() - started, c.closed()

        reply, waited, closed = yield self.talk(run)
        self.assertTrue(reply.startswith(b"421 4.4.2"), reply)
        self.assertLess(waited, 3)
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
    overrides = {
        "smtp": ["haproxy:tcp:0:interface=127.0.0.1"],
        "max_connections_per_ip": "1",
        "proxy_trusted": ["127.0.0.0/8"],
    }

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


class ProxyTrustTests(HardeningCase):
    overrides = {
        "smtp": ["haproxy:tcp:0:interface=127.0.0.1"],
        "proxy_trusted": ["127.0.0.2"],
        "max_connections": "10",
        "max_connections_per_ip": "100",
    }

    @defer.inlineCallbacks
    def test_header_believed_only_from_a_trusted_peer(self):
        def run():
            untrusted = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10, source_address=("127.0.0.1", 0))
            untrusted.sendall(b"PROXY TCP4 6.6.6.0 127.0.0.1 40000 2525\r\nEHLO evil.test\r\n")
            refused = untrusted.recv(100)
            untrusted.close()
            trusted = Conversation(self.daemon.port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 2525\r\n", source="127.0.0.2")
            ehlo = trusted.command(b"EHLO customer.test")
            trusted.close()
            return refused, trusted.greeting, ehlo

        refused, greeting, ehlo = yield self.talk(run)
        self.assertEqual(refused, b"")
        self.assertTrue(greeting.startswith(b"220"), greeting)
        self.assertIn(b"Hello 203.0.113.7", ehlo)

    @defer.inlineCallbacks
    def test_connections_without_a_header_count_against_max_connections(self):
        def run():
            sockets = [
                socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10, source_address=("127.0.0.2", 0))
                for _ in range(30)
            ]
            answers = {}
            deadline = time.monotonic() + 10
            # Wait for 20 answers, then 0.3 s more to see that no 21st comes.
            while time.monotonic() < deadline:
                waiting = [s for s in sockets if s not in answers]
                readable, _, _ = select.select(waiting, [], [], 0.3)
                if not readable and len(answers) >= 20:
                    break
                for s in readable:
                    answers[s] = s.recv(100)
            for s in sockets:
                s.close()
            return [answers.get(s, b"<open>") for s in sockets]

        answers = yield self.talk(run)
        self.assertEqual(answers.count(b"<open>"), 10, answers)
        self.assertEqual(answers.count(b"421 4.7.0 mx.test Too many connections, try again later\r\n"), 20, answers)
        yield sleep(0.2)

        def later():
            c = Conversation(self.daemon.port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 2525\r\n", source="127.0.0.2")
            c.close()
            return c.greeting

        self.assertTrue((yield self.talk(later)).startswith(b"220"))


class ProxyTrustRequiredTests(unittest.TestCase):
    def test_haproxy_endpoint_without_trusted_networks(self):
        with self.assertRaises(ConfigError) as raised:
            build_daemon(settings_for(temp_dir(self), smtp=["haproxy:tcp:0:interface=127.0.0.1"]))
        self.assertIn("--proxy-trusted", str(raised.exception))


class DataPaceTests(unittest.TestCase):
    """
    DATA must keep a minimum pace (Postfix's smtpd_min_data_rate) and end
    within a maximum time: on the protocol, time advanced on a task.Clock.
    """

    def setUp(self):
        self.server = Server(self)
        self.session = self.server.connect()
        open_data(self.session)

    def spool_files(self) -> list[str]:
        return os.listdir(self.server.spool_dir)

    def drip(self, seconds: int, chunk: bytes) -> None:
        """Send C{chunk} every second for C{seconds} s, or until we close the connection."""
        for _ in range(seconds):
            self.session.send(chunk)
            self.server.clock.advance(1)
            if self.session.closed:
                return

    def test_slow_drip_client_is_dropped(self):
        # past the in-memory limit, so the message is in a spool file
        burst = b"Subject: drip\r\n\r\n" + (b"x" * 70 + b"\r\n") * 2000
        self.assertGreater(len(burst), MEMORY_LIMIT)
        self.session.send(burst)
        self.assertEqual(len(self.spool_files()), 1)
        slow = rejected("slow")
        # the average rate stays above 500 bytes/s until about 290 s
        self.drip(280, b"x" * 9 + b"\r\n")
        self.assertFalse(self.session.closed)
        self.drip(30, b"x" * 9 + b"\r\n")
        self.assertTrue(self.session.closed)
        self.assertEqual(self.session.replies(), [b"421 4.4.2 mx.test Data too slow, closing connection"])
        self.assertEqual(rejected("slow"), slow + 1)
        hang_up(self.session)
        self.assertEqual(self.spool_files(), [])
        self.assertEqual(self.server.store.rows, [])

    def test_slow_start_is_allowed_within_the_grace_period(self):
        self.drip(int(smtp_limits.DATA_RATE_GRACE_SECONDS) - 1, b"x\r\n")
        self.session.send(b"\r\n".join([b"y" * 70] * 300) + b"\r\n")
        self.server.clock.advance(smtp_limits.DATA_CHECK_SECONDS)
        self.session.send(b".\r\n")
        [reply] = self.session.replies()
        self.assertTrue(reply.startswith(b"250 2.0.0"), reply)


class DataLimitTests(HardeningCase):
    def open_data(self, c: Conversation) -> None:
        c.command(b"EHLO customer.test")
        c.command(b"MAIL FROM:<buyer@customer.test>")
        c.command(b"RCPT TO:<orders+acme@example.com>")
        c.command(b"DATA")

    @defer.inlineCallbacks
    def test_header_section_too_large(self):
        def run():
            c = Conversation(self.daemon.port)
            self.open_data(c)
            c.sock.sendall(b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100) for i in range(3000)) + b"\r\nbody\r\n.\r\n")
            return c.reply(), c.command(b"NOOP")

        reply, noop = yield self.talk(run)
        self.assertTrue(reply.startswith(b"552 5.3.4"), reply)
        self.assertTrue(noop.startswith(b"250"), noop)
        self.assertEqual((yield self.daemon.store.count_messages()), 0)

    @defer.inlineCallbacks
    def test_endless_data_line(self):
        def run():
            c = Conversation(self.daemon.port)
            self.open_data(c)
            c.sock.sendall(b"Subject: long\r\n\r\n" + b"z" * (400 * 1024) + b"\r\nend\r\n.\r\n")
            return c.reply(), c.command(b"NOOP")

        reply, noop = yield self.talk(run)
        self.assertTrue(reply.startswith(b"500 5.5.2"), reply)
        self.assertTrue(noop.startswith(b"250"), noop)
        self.assertEqual((yield self.daemon.store.count_messages()), 0)
        yield self.assertStillServing()


def make_certificate(directory: str, name: str = "mx.test") -> tuple[str, str]:
    """A self-signed certificate and key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def peer_certificate_name(client) -> str:
    der = client.sock.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class TLSTests(HardeningCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = temp_dir(self)
        self.cert, self.key = make_certificate(directory)
        self.overrides = {"tls_cert": self.cert, "tls_key": self.key}
        yield super().setUp()

    @defer.inlineCallbacks
    def test_starttls_then_send(self):
        def run():
            client = smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10)
            client.ehlo("customer.test")
            offered = client.has_extn("starttls")
            client.starttls(context=ssl._create_unverified_context())
            client.ehlo("customer.test")
            name = peer_certificate_name(client)
            result = client.sendmail("b@customer.test", ["orders+acme@example.com"], message())
            client.quit()
            return offered, name, result

        offered, name, result = yield self.talk(run)
        self.assertTrue(offered)
        self.assertEqual((name, result), ("CN=mx.test", {}))
        [path] = self.daemon.blob_files()
        with open(path, "rb") as f:
            received = f.read().split(b"\r\nFrom:")[0]
        self.assertRegex(received, rb"with ESMTPS \(TLSv1\.[23] [A-Z0-9_-]+\)")

    @defer.inlineCallbacks
    def test_starttls_command_injection(self):
        """
        An on-path attacker appends commands to the victim's STARTTLS (CVE-2011-0411
        class): they must not run inside TLS and move the victim's message to beta.
        """
        yield self.daemon.store.add_org("beta", "Beta Ltd")
        body = message(subject="victim order", message_id="<victim@customer.test>")

        def run():
            c = Conversation(self.daemon.port)
            c.command(b"EHLO victim")
            c.sock.sendall(
                b"STARTTLS\r\nEHLO mitm\r\nMAIL FROM:<mitm@evil.test>\r\n"
                b"RCPT TO:<orders+beta@example.com>\r\nDATA\r\n"
            )
            starttls = c.reply()
            c.sock = ssl._create_unverified_context().wrap_socket(c.sock, server_hostname="mx.test")
            c.file = c.sock.makefile("rb")
            c.sock.sendall(
                b"EHLO victim\r\nMAIL FROM:<victim@customer.test>\r\n"
                b"RCPT TO:<orders+acme@example.com>\r\nDATA\r\n"
            )
            replies = [c.reply() for _ in range(4)]
            c.sock.sendall(body + b".\r\n")
            replies.append(c.reply())
            replies.append(c.command(b"QUIT"))
            return starttls, replies

        starttls, replies = yield self.talk(run)
        self.assertTrue(starttls.startswith(b"220 2.0.0"), starttls)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"250", b"354", b"250", b"221"])
        self.assertIn(b"mx.test Hello", replies[0])
        [row] = yield self.daemon.store.list_messages()
        self.assertEqual((row["org_slug"], row["mail_from"], row["subject"]), ("acme", "victim@customer.test", "victim order"))
        [path] = self.daemon.blob_files()
        with open(path, "rb") as f:
            stored = f.read()
        self.assertTrue(stored.endswith(b"\r\n" + body), stored[-300:])
        self.assertNotIn(b"mitm", stored)

    @defer.inlineCallbacks
    def test_certificate_reloaded_on_sighup(self):
        directory = temp_dir(self)
        new_cert, new_key = make_certificate(directory, "renewed.test")
        os.replace(new_cert, self.cert)
        os.replace(new_key, self.key)
        os.kill(os.getpid(), signal.SIGHUP)
        yield sleep(0.2)

        def run():
            client = smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10)
            client.starttls(context=ssl._create_unverified_context())
            name = peer_certificate_name(client)
            client.quit()
            return name

        self.assertEqual((yield self.talk(run)), "CN=renewed.test")


class ImplicitTLSTests(HardeningCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = temp_dir(self)
        self.cert, self.key = make_certificate(directory)
        self.overrides = {"smtp": [f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"]}
        yield super().setUp()

    def certificate_name(self):
        def run():
            client = smtplib.SMTP_SSL("127.0.0.1", self.daemon.port, timeout=10, context=ssl._create_unverified_context())
            name = peer_certificate_name(client)
            client.quit()
            return name

        return self.talk(run)

    @defer.inlineCallbacks
    def test_certificate_reloaded_on_sighup(self):
        self.assertEqual((yield self.certificate_name()), "CN=mx.test")
        new_cert, new_key = make_certificate(temp_dir(self), "renewed.test")
        os.replace(new_cert, self.cert)
        os.replace(new_key, self.key)
        # Without the daemon's handler SIGHUP would end the test run.
        self.assertNotIn(signal.getsignal(signal.SIGHUP), (signal.SIG_DFL, signal.SIG_IGN))
        os.kill(os.getpid(), signal.SIGHUP)
        yield sleep(0.2)
        self.assertEqual((yield self.certificate_name()), "CN=renewed.test")

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        def run():
            client = smtplib.SMTP_SSL("127.0.0.1", self.daemon.port, timeout=10, context=ssl._create_unverified_context())
            result = client.sendmail("b@customer.test", ["orders+acme@example.com"], message())
            client.quit()
            return result

        self.assertEqual((yield self.talk(run)), {})
        [path] = self.daemon.blob_files()
        with open(path, "rb") as f:
            self.assertRegex(f.read(), rb"with ESMTPS \(TLSv1")


class SMTPUTF8Tests(HardeningCase):
    @defer.inlineCallbacks
    def test_internationalised_addresses_and_headers(self):
        body = "From: Jürgen <jürgen@münchen.test>\r\nSubject: Bestellung für März\r\nMessage-ID: <ü@x>\r\n\r\nGrüße\r\n".encode()

        def run():
            client = smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10)
            client.ehlo("customer.test")
            offered = client.has_extn("smtputf8")
            client.send("MAIL FROM:<jürgen@münchen.test>\r\n".encode())
            refused_without = client.getreply()
            client.rset()
            result = client.sendmail("jürgen@münchen.test", ["bestellung+acme@example.com"], body, mail_options=["SMTPUTF8"])
            client.quit()
            return offered, refused_without, result

        offered, refused_without, result = yield self.talk(run)
        self.assertTrue(offered)
        self.assertEqual(refused_without[0] // 100, 5)
        self.assertEqual(result, {})
        [row] = yield self.daemon.store.list_messages()
        self.assertEqual((row["mail_from"], row["subject"]), ("jürgen@münchen.test", "Bestellung für März"))
        [path] = self.daemon.blob_files()
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(body))


SWAKS = shutil.which("swaks")


class SwaksTests(HardeningCase):
    """A real external client: swaks, with an attachment and over STARTTLS."""

    skip = None if SWAKS else "swaks is not installed (apt-get install swaks; .ci/run installs it)"

    @defer.inlineCallbacks
    def setUp(self):
        directory = temp_dir(self)
        cert, key = make_certificate(directory)
        self.overrides = {"tls_cert": cert, "tls_key": key}
        self.attachment = os.path.join(directory, "PO-77.pdf")
        with open(self.attachment, "wb") as f:
            f.write(b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF\n")
        yield super().setUp()

    def swaks(self, *args: str) -> defer.Deferred:
        command = [SWAKS, "--server", f"127.0.0.1:{self.daemon.port}", "--to", "orders+acme@example.com",
                   "--from", "buyer@customer.test", "--helo", "customer.test", *args]
        return threads.deferToThread(subprocess.run, command, capture_output=True, timeout=60)

    @defer.inlineCallbacks
    def test_swaks_with_attachment_over_starttls(self):
        result = yield self.swaks("--tls", "--attach", f"@{self.attachment}", "--attach-type", "application/pdf")
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace")[-2000:])
        self.assertIn(b"250 2.0.0", result.stdout)
        [row] = yield self.daemon.store.list_messages()
        for _ in range(100):
            row = yield self.daemon.store.get_message(row["id"])
            if row["status"] != "received":
                break
            yield sleep(0.05)
        [doc] = yield self.daemon.store.list_documents(message_id=row["id"])
        with open(self.daemon.blobs.path_for(doc["storage_key"]), "rb") as stored, open(self.attachment, "rb") as original:
            self.assertEqual(stored.read(), original.read())
        self.assertEqual(doc["filename"], "PO-77.pdf")

    @defer.inlineCallbacks
    def test_swaks_refused_recipient(self):
        result = yield self.swaks("--to", "orders+nobody@example.com")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"550 5.1.1", result.stdout)


class PeerKeyTests(unittest.SynchronousTestCase):
    def test_units_counted_by_the_per_address_limit(self):
        self.assertEqual(smtp_server.peer_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(smtp_server.peer_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(smtp_server.peer_key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")
        self.assertEqual(smtp_server.peer_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(smtp_server.peer_key("fe80::1%eth0"), "fe80::/64")
