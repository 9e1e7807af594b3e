"""
Test helpers: a real mailingest daemon on 127.0.0.1, in this process (on the
trial reactor) or as a C{twistd} subprocess, and blocking SMTP clients run in
threads so the reactor keeps serving them.
"""

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailingest.app.settings import Settings
from mailingest.app.service import build_daemon
from tests.ports import free_port

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MAILINGEST = os.path.join(os.path.dirname(sys.executable), "mailingest")


def settings_for(directory: str, **overrides) -> Settings:
    given = {
        "smtp": ["tcp:0:interface=127.0.0.1"],
        "http": "none",
        "domain": ["example.com", "ingest.example.org"],
        "hostname": "mx.test",
        "database": "sqlite:///" + os.path.join(directory, "mailingest.db"),
        "storage": "file:" + os.path.join(directory, "blobs"),
    }
    given.update(overrides)
    return Settings.settle(given, environ={})


class RunningDaemon:
    """A daemon started in-process; C{port} is its SMTP port."""

    def __init__(self, directory: str, environ=os.environ, **overrides):
        self.directory = directory
        self.settings = settings_for(directory, **overrides)
        self.service = build_daemon(self.settings, reactor, environ)
        self.store = self.service.store
        self.blobs = self.service.blobs
        self.delivery = self.service.delivery

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        yield self.service.ready
        self.port = self.service.smtp_listeners[0].port.getHost().port
        return self

    def stop(self):
        return self.service.stopService()

    def smtp(self, fn, *args, **kwargs):
        """Run C{fn(client, ...)} with a connected smtplib client, in a thread."""

        def run():
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
            try:
                return fn(client, *args, **kwargs)
            finally:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    client.close()

        return threads.deferToThread(run)

    def send(self, message: bytes, rcpts, mail_from="sender@customer.test"):
        """Send one message; fires with (code, reply) of the end of DATA."""

        def transaction(client):
            client.ehlo("customer.test")
            code, reply = client.mail(mail_from)
            assert code == 250, (code, reply)
            for rcpt in rcpts:
                code, reply = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, reply)
            return client.data(message)

        return self.smtp(transaction)

    def until(self, message_id: int, predicate, timeout: float = 20.0):
        """Poll a message's row until C{predicate(row)} holds; fire with that row."""
        return poll(
            lambda: self.store.get_message(message_id), predicate, timeout,
            lambda row: f"message {message_id} never reached the expected state: {row}",
        )

    def settled(self, message_id: int, timeout: float = 20.0):
        """Fire with the message's row once extraction is done with it (parsed or failed)."""
        return self.until(message_id, lambda row: row["status"] != "received", timeout)

    def blob_files(self) -> list[str]:
        root = os.path.join(self.directory, "blobs", "raw")
        found = []
        for folder, _, files in os.walk(root):
            found += [os.path.join(folder, f) for f in files]
        return sorted(found)

    def spool_files(self) -> list[str]:
        spool = os.path.join(self.directory, "blobs", ".scratch", "spool")
        return sorted(os.listdir(spool)) if os.path.isdir(spool) else []

    def spooled(self, timeout: float = 10.0):
        """Fire with the spool files once there is one (a message past the in-memory limit is being received)."""
        return poll(self.spool_files, bool, timeout, lambda files: "no spool file appeared", interval=0.01)


@defer.inlineCallbacks
def poll(read, predicate, timeout: float, failure, interval: float = 0.05):
    """
    Call C{read()} (a value or a Deferred of one) until C{predicate} holds
    for its value; fire with that value, or fail with C{failure(value)} after
    C{timeout} seconds: the one loop of the tests that wait for a state only
    another process or thread can reach.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = yield read()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure(value))
        yield sleep(interval)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def message(subject="Order 1", message_id="<order-1@customer.test>", body="Please find our order.\r\n") -> bytes:
    headers = ["From: buyer@customer.test", "To: orders+acme@example.com", f"Subject: {subject}"]
    if message_id:
        headers.append(f"Message-ID: {message_id}")
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


class TwistdProcess:
    """C{twistd -n mailingest} as a subprocess, as an operator runs it."""

    def __init__(self, directory: str, *args: str, env=None, http: str = "none"):
        self.directory = directory
        self.port = free_port()
        self.args = ["--smtp", f"tcp:{self.port}:interface=127.0.0.1", "--http", http, *args]
        self.env = dict(os.environ if env is None else env)
        self.log_path = os.path.join(directory, "daemon.log")
        self.process = None

    def start(self, timeout: float = 20.0) -> "TwistdProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mailingest", *self.args],
            cwd=self.directory,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("twistd did not start listening:\n" + self.log())

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def rss_kib(self) -> int:
        """Resident memory of the daemon now."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def mailingest_cli(directory: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAILINGEST, *args],
        cwd=directory,
        env=dict(os.environ if env is None else env),
        capture_output=True,
        timeout=60,
    )


def temp_dir(test) -> str:
    path = tempfile.mkdtemp(prefix="mailingest-test-")
    test.addCleanup(_rmtree, path)
    return path


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class DaemonTestCase(unittest.TestCase):
    """A fresh daemon on 127.0.0.1 for each test, with the active organisation C{acme}."""

    overrides: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = temp_dir(self)
        self.daemon = RunningDaemon(self.directory, **self.overrides)
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        yield self.daemon.store.add_org("acme", "Acme Corp")
