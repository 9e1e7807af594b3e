"""
The daemon as an operator runs it: C{twistd -n mailingest} in a subprocess,
configured by options, environment and a config file, restarted, and fed a
50 MB message while its memory is watched.
"""

import os
import signal
import smtplib
import sqlite3
import subprocess

from twisted.trial import unittest

from tests.daemon import TWISTD, TwistdProcess, mailingest_cli, message, temp_dir


def send(port: int, body: bytes, rcpt="orders+acme@example.com"):
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("customer.test")
        client.mail("buyer@customer.test")
        code, reply = client.rcpt(rcpt)
        if code != 250:
            return code, reply
        return client.data(body)


def rows(directory: str) -> list[tuple]:
    db = sqlite3.connect(os.path.join(directory, "mailingest-data", "mailingest.db"))
    try:
        return db.execute("SELECT id, source_message_id, raw_size FROM inbound_message ORDER BY id").fetchall()
    finally:
        db.close()


class TwistdTests(unittest.TestCase):
    def setUp(self):
        self.directory = temp_dir(self)
        result = mailingest_cli(self.directory, "org", "add", "acme")
        self.assertEqual(result.returncode, 0, result.stderr)

    def start(self, *args, env=None) -> TwistdProcess:
        daemon = TwistdProcess(self.directory, "--domain", "example.com", *args, env=env)
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        return daemon

    def test_help_lists_every_option(self):
        out = subprocess.run([TWISTD, "mailingest", "--help"], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        for name in (
            "smtp", "http", "database", "storage", "s3-endpoint", "s3-region", "domain", "hostname",
            "max-message-size", "max-recipients", "max-connections", "max-connections-per-ip",
            "timeout", "tls-cert", "tls-key", "poll-interval", "max-attempts", "config",
        ):
            self.assertIn("--" + name, out.stdout)

    def test_bad_option_fails_at_start_with_one_clear_line(self):
        out = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "mailingest", "--database", "mysql://u:hunter2@h/db"],
            capture_output=True, text=True, timeout=60, cwd=self.directory,
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("unsupported database URL", out.stdout + out.stderr)
        self.assertNotIn("hunter2", out.stdout + out.stderr)
        self.assertNotIn("Traceback", out.stdout + out.stderr)

    def test_restart_keeps_every_accepted_message(self):
        daemon = self.start()
        for i in range(5):
            code, _ = send(daemon.port, message(message_id=f"<restart-{i}@customer.test>"))
            self.assertEqual(code, 250)
        self.assertIn(daemon.stop(), (0, -signal.SIGTERM))
        before = rows(self.directory)
        self.assertEqual(len(before), 5)
        daemon = self.start()
        self.assertEqual(rows(self.directory), before)
        code, reply = send(daemon.port, message(message_id="<restart-0@customer.test>"))
        self.assertEqual((code, b"duplicate" in reply), (250, True))
        listed = mailingest_cli(self.directory, "messages", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual(listed.stdout.count(b'"source_message_id"'), 5)

    def test_precedence_between_command_line_environment_and_file(self):
        with open(os.path.join(self.directory, "mailingest.ini"), "w") as f:
            f.write("[mailingest]\nmax-recipients = 1\ndomain = file.test\n")
        env = dict(os.environ, MAILINGEST_MAX_RECIPIENTS="2", MAILINGEST_CONFIG="mailingest.ini")
        daemon = self.start("--max-recipients", "3", env=env)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("customer.test")
            client.mail("buyer@customer.test")
            codes = [client.rcpt(f"orders+acme@example.com")[0] for _ in range(4)]
            # --domain on the command line wins over the file
            codes.append(client.rcpt("orders+acme@file.test")[0])
        self.assertEqual(codes, [250, 250, 250, 452, 452])

    def test_fifty_megabyte_message_with_flat_memory(self):
        daemon = self.start()
        chunk = b"0123456789abcdef" * 4 + b"\r\n"
        body = message(body="") + chunk * (50 * 1000 * 1000 // len(chunk))
        baseline = daemon.peak_rss_kib()
        code, reply = send(daemon.port, body)
        self.assertEqual(code, 250, reply)
        growth_mib = (daemon.peak_rss_kib() - baseline) / 1024
        [(_, _, raw_size)] = rows(self.directory)
        self.assertGreater(raw_size, len(body))
        # the message never sits in memory whole: growth is a small fraction of 50 MB
        self.assertLess(growth_mib, 25, f"peak RSS grew by {growth_mib:.0f} MiB")
