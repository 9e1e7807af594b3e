"""
The daemon as an operator runs it: C{twistd -n mailingest} in a subprocess,
configured by options, environment and a config file, restarted, and fed a
50 MB message while its memory is watched.
"""

import json
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request

from twisted.trial import unittest

from tests.daemon import TWISTD, TwistdProcess, free_port, mailingest_cli, message, temp_dir


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


def sigterm_during_data(daemon, during=lambda: None) -> tuple[bytes, bytes]:
    """
    SIGTERM the daemon in the middle of a message's DATA, call C{during()} a
    second later, then finish the message: the reply to its end, and to a
    NOOP after it.
    """
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"HELO customer.test\r\nMAIL FROM:<b@customer.test>\r\nRCPT TO:<orders+acme@example.com>\r\nDATA\r\n")
        for _ in range(4):
            f.readline()
        s.sendall(message()[:40])
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        during()
        s.sendall(message()[40:] + b".\r\n")
        reply = f.readline()
        s.sendall(b"NOOP\r\n")
        return reply, f.readline()


class TwistdCase(unittest.TestCase):
    """A working directory with the organisation C{acme}, and daemons started in it."""

    http: str = "none"

    def setUp(self):
        self.directory = temp_dir(self)
        self.assertEqual(mailingest_cli(self.directory, "migrate").returncode, 0)
        result = mailingest_cli(self.directory, "org", "add", "acme")
        self.assertEqual(result.returncode, 0, result.stderr)

    def start(self, *args, env=None) -> TwistdProcess:
        daemon = TwistdProcess(self.directory, "--domain", "example.com", *args, env=env, http=self.http)
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        return daemon


class TwistdTests(TwistdCase):
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

    def test_unusable_search_file_fails_at_start_with_one_clear_line(self):
        """The database's search file cannot be opened (here a directory is in its place): the daemon and the admin command say so."""
        search_file = os.path.join(self.directory, "mailingest-data", "mailingest.db-search")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(search_file + suffix):
                os.remove(search_file + suffix)
        os.mkdir(search_file)
        daemon = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "mailingest", "--smtp", "tcp:0:interface=127.0.0.1", "--domain", "example.com"],
            capture_output=True, text=True, timeout=60, cwd=self.directory,
        )
        command = mailingest_cli(self.directory, "messages", "list")
        for status, out in ((daemon.returncode, daemon.stdout + daemon.stderr), (command.returncode, command.stdout + command.stderr)):
            out = out if isinstance(out, str) else out.decode()
            self.assertNotEqual(status, 0)
            self.assertIn("search index mailingest-data/mailingest.db-search: unable to open database file", out)
            self.assertNotIn("Traceback", out)
        self.assertTrue(daemon.stderr.startswith("mailingest could not start: database sqlite:///"), daemon.stderr)

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
        self.assertEqual((code, reply), (250, b"2.0.0 Ok: stored as message %d" % before[0][0]))
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
            codes = [client.rcpt("orders+acme@example.com")[0] for _ in range(4)]
            # --domain on the command line wins over the file
            codes.append(client.rcpt("orders+acme@file.test")[0])
        self.assertEqual(codes, [250, 250, 250, 452, 452])

    def test_fifty_megabyte_message_with_flat_memory(self):
        daemon = self.start()
        chunk = b"0123456789abcdef" * 4 + b"\r\n"
        body = message(body="") + chunk * (50 * 1000 * 1000 // len(chunk))
        baseline = daemon.rss_kib()
        samples = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                samples.append(daemon.rss_kib())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            code, reply = send(daemon.port, body)
        finally:
            done.set()
            sampler.join()
        self.assertEqual(code, 250, reply)
        growth_mib = (max(samples) - baseline) / 1024
        [(_, _, raw_size)] = rows(self.directory)
        self.assertGreater(raw_size, len(body))
        # the message never sits in memory whole while it is received
        self.assertLess(growth_mib, 25, f"RSS grew by {growth_mib:.0f} MiB")


class PortInUseTests(TwistdCase):
    """A port that cannot be opened stops the daemon with one critical line naming the endpoint."""

    def run_with_port_taken(self, option: str) -> tuple[subprocess.CompletedProcess, str]:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            args = {"--smtp": f"tcp:{free_port()}:interface=127.0.0.1", "--http": "none", option: endpoint}
            out = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "mailingest", *(word for pair in args.items() for word in pair)],
                capture_output=True, text=True, timeout=60, cwd=self.directory,
            )
        return out, endpoint

    def test_smtp_port_in_use(self):
        out, endpoint = self.run_with_port_taken("--smtp")
        self.assertIn(f"#critical] mailingest could not start: cannot listen on {endpoint} for SMTP", out.stdout)
        self.assertNotIn("SMTP listening on", out.stdout)

    def test_ops_port_in_use(self):
        out, endpoint = self.run_with_port_taken("--http")
        self.assertIn(f"#critical] mailingest could not start: cannot listen on {endpoint} for ops HTTP", out.stdout)


class OperationsTests(TwistdCase):
    def setUp(self):
        super().setUp()
        self.http_port = free_port()
        self.http = f"tcp:{self.http_port}:interface=127.0.0.1"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def test_sigterm_lets_data_in_progress_finish(self):
        daemon = self.start()
        started = time.monotonic()

        def new_connections_refused():
            with self.assertRaises(OSError):
                socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()

        reply, after = sigterm_during_data(daemon, new_connections_refused)
        self.assertTrue(reply.startswith(b"250 2.0.0"), reply)
        self.assertTrue(after.startswith(b"421 4.3.2"), after)
        status = daemon.process.wait(15)
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn(status, (0, -signal.SIGTERM))
        self.assertEqual(len(rows(self.directory)), 1)

    def test_sigterm_with_an_idle_client_exits_quickly(self):
        daemon = self.start()
        client = smtplib.SMTP("127.0.0.1", daemon.port, timeout=10)
        client.ehlo("customer.test")
        started = time.monotonic()
        status = daemon.stop()
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn(status, (0, -signal.SIGTERM))
        client.close()

    def test_health_readiness_and_metrics(self):
        daemon = self.start()
        self.assertEqual(self.get("/healthz")[0], 200)
        status, body = self.get("/readyz")
        self.assertEqual((status, json.loads(body)["status"]), (200, "ready"))
        code, _ = send(daemon.port, message())
        self.assertEqual(code, 250)
        send(daemon.port, message(), rcpt="orders+nobody@example.com")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, metrics = self.get("/metrics")
            if b"mailingest_extractions_total{outcome=\"parsed\"} 1.0" in metrics:
                break
            time.sleep(0.1)
        self.assertIn(b"mailingest_messages_accepted_total 1.0", metrics)
        self.assertIn(b'mailingest_rejected_total{reason="unknown_org"} 1.0', metrics)
        self.assertIn(b"mailingest_queue_depth 0.0", metrics)
        self.assertIn(b"mailingest_smtp_connections", metrics)
        # object storage breaks: /readyz names it; it recovers by itself
        scratch = os.path.join(self.directory, "mailingest-data", "blobs", ".tmp")
        os.rename(scratch, scratch + ".gone")
        with open(scratch, "w") as f:
            f.write("not a directory")
        status, body = self.get("/readyz")
        report = json.loads(body)
        self.assertEqual((status, report["checks"]["database"]), (503, "ok"))
        self.assertTrue(report["checks"]["storage"].startswith("error"))
        os.unlink(scratch)
        os.rename(scratch + ".gone", scratch)
        self.assertEqual(self.get("/readyz")[0], 200)

    def test_one_log_line_per_message_and_no_secrets(self):
        from tests import postgres

        database = postgres.create_database()
        secret_url = database.replace("postgresql://postgres@", "postgresql://postgres:hunter2-secret@", 1)
        env = dict(os.environ, MAILINGEST_DATABASE=secret_url, AWS_SECRET_ACCESS_KEY="aws-secret-never-logged")
        result = mailingest_cli(self.directory, "org", "add", "acme", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        daemon = self.start("--log-format", "json", env=env)
        self.assertEqual(send(daemon.port, message())[0], 250)
        send(daemon.port, message())
        send(daemon.port, message(), rcpt="orders+nobody@example.com")
        time.sleep(1.5)
        daemon.stop()
        log = daemon.log()
        self.assertNotIn("hunter2-secret", log)
        self.assertNotIn("aws-secret-never-logged", log)
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        kinds = [e.get("event") for e in events if e.get("event")]
        self.assertEqual(sorted(kinds), ["accepted", "duplicate", "parsed", "rejected"])
        accepted = [e for e in events if e.get("event") == "accepted"][0]
        self.assertEqual((accepted["org"], accepted["peer"]), ("acme", "127.0.0.1"))
        self.assertIn("size", accepted)
