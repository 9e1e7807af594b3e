"""
Log output (SPEC section 8): the text and JSON-lines formats, secret
redaction, and the twistd integration, including twistd's own lines.
"""

import calendar
import io
import json
import os
import subprocess
import signal
import sys
import textwrap
import threading
import time

from twisted.internet import defer, reactor, task, utils
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.reflect import namedAny
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from mailingest.ops import logs
from mailingest.ops import secrets
from mailingest.errors import StorageError
from tests.test_urls import HOSTILE_URLS, leaked
from mailingest.ops.logs import make_observer
from tests.daemon import DaemonTestCase, message

NOV_24_0700 = calendar.timegm((2026, 11, 24, 7, 0, 0))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capture(log_format, secrets=()):
    stream = io.StringIO()
    observer = logs.make_observer(log_format, stream, secrets)
    return stream, Logger(namespace="mailingest.smtp", observer=observer), observer


def a_failure(log):
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("extraction of message {id} crashed", id=9)


class TextFormatTests(unittest.TestCase):
    def test_one_line_per_event(self):
        stream, log, observer = capture("text")
        observer(
            {
                "log_format": "accepted message {id} for {org}",
                "id": 17,
                "org": "acme",
                "log_time": NOV_24_0700,
                "log_level": LogLevel.info,
                "log_namespace": "mailingest.smtp",
            }
        )
        log.warn("message {id} has no attachments", id=18)
        lines = stream.getvalue().splitlines()
        self.assertEqual(lines[0], "2026-11-24T07:00:00Z [mailingest.smtp#info] accepted message 17 for acme")
        self.assertRegex(
            lines[1],
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[mailingest.smtp#warn\] message 18 has no attachments$",
        )
        self.assertEqual(len(lines), 2)

    def test_failure_has_traceback(self):
        stream, log, _ = capture("text")
        a_failure(log)
        first, *rest = stream.getvalue().splitlines()
        self.assertIn("[mailingest.smtp#critical] extraction of message 9 crashed", first)
        self.assertIn("ZeroDivisionError", stream.getvalue())
        self.assertIn("Traceback", stream.getvalue())
        self.assertTrue(rest)
        # Continuation lines are indented: each record starts at column 0.
        self.assertTrue(all(line.startswith("\t") for line in rest), rest)

    def test_event_logged_while_writing_a_line(self):
        """What a signal handler does when it interrupts a write: the nested line is written, nothing hangs."""

        class Interrupted(io.StringIO):
            def write(self, text):
                if "interrupts" in text:
                    log.info("Received SIGTERM, shutting down.")
                return super().write(text)

        stream = Interrupted()
        observer = make_observer("text", stream)
        log = Logger(namespace="twisted.internet.base", observer=observer)
        done = threading.Event()

        def emit():
            log.info("a line the signal interrupts")
            done.set()

        threading.Thread(target=emit, daemon=True).start()
        self.assertTrue(done.wait(5), "the observer deadlocked on its own lock")
        self.assertIn("Received SIGTERM", stream.getvalue())
        self.assertIn("a line the signal interrupts", stream.getvalue())

    def test_debug_is_dropped(self):
        stream, log, _ = capture("text")
        log.debug("GET /metrics 200")
        self.assertEqual(stream.getvalue(), "")


class FormatMessageTests(unittest.TestCase):
    """format_message (issue 29: str.format_map on the per-message path) says what Twisted's formatEvent says."""

    class Thing:
        size = 42

        def __str__(self):
            return "a thing"

        def name(self):
            return "called"

    def test_same_text_as_twisted(self):
        thing = self.Thing()
        events = [
            dict(log_format="accepted message {message_id} ({size} bytes, {ms:.0f} ms, message-id={m})", message_id=7, size=1, ms=2.6, m=""),
            dict(log_format="{reply!r} {peer:>6} {thing} {thing.size} {items[1]}", reply=b"550", peer="a", thing=thing, items=[1, 2]),
            dict(log_format="{thing.name()} and {a}", thing=thing, a="b"),  # Twisted's call syntax
            dict(log_format="{missing} key", present=1),  # Twisted: "Unable to format event ..."
            dict(log_format="{0} positional"),
            dict(log_format="{ms:.0f}", ms="not a number"),
            dict(log_format="{{braces}} {log_text}", log_text="relayed"),
            dict(log_format=b"bytes {a}", a=1),
            dict(log_format=None),
            dict(a=1),
        ]
        for event in events:
            event.setdefault("log_level", LogLevel.info)
            self.assertEqual(logs.format_message(event), formatEvent(event), event)
        self.assertEqual(logs.format_message(events[0]), "accepted message 7 (1 bytes, 3 ms, message-id=)")
        self.assertIn("Unable to format event", logs.format_message(events[3]))


class JsonFormatTests(unittest.TestCase):
    def test_one_object_per_line(self):
        stream, log, observer = capture("json")
        observer(
            {
                "log_format": "accepted message {id} for {org}",
                "id": 17,
                "org": "acme",
                "log_time": NOV_24_0700 + 0.25,
                "log_level": LogLevel.info,
                "log_namespace": "mailingest.smtp",
                "log_logger": object(),
            }
        )
        log.info("multi\nline {thing}", thing=object(), size=1.5, ok=True, nothing=None)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(
            first,
            {
                "time": "2026-11-24T07:00:00.250Z",
                "level": "info",
                "namespace": "mailingest.smtp",
                "message": "accepted message 17 for acme",
                "id": 17,
                "org": "acme",
            },
        )
        self.assertEqual(second["message"][:10], "multi\nline")
        self.assertTrue(second["thing"].startswith("<object object at"))
        self.assertEqual((second["size"], second["ok"], second["nothing"]), (1.5, True, None))
        self.assertNotIn("traceback", second)

    def test_failure_has_traceback(self):
        stream, log, _ = capture("json")
        a_failure(log)
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "extraction of message 9 crashed")
        self.assertEqual(record["id"], 9)
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_unknown_format(self):
        self.assertRaises(ValueError, logs.make_observer, "xml", io.StringIO())


class RedactionTests(unittest.TestCase):
    SECRET = "pa ss/w@rd"

    def test_redact(self):
        text = "plain pa ss/w@rd, quoted pa%20ss%2Fw%40rd, path pa%20ss/w%40rd, form pa+ss%2Fw%40rd"
        self.assertEqual(
            secrets.redact(text, [self.SECRET, ""]),
            "plain ***, quoted ***, path ***, form ***",
        )
        self.assertEqual(secrets.redact("nothing secret", []), "nothing secret")

    def test_text_lines(self):
        stream, log, _ = capture("text", [self.SECRET])
        log.error("cannot connect to postgresql://u:pa%20ss%2Fw%40rd@db/x ({why})", why="pa ss/w@rd")
        self.assertNotIn("rd", stream.getvalue().replace("postgresql", ""))
        self.assertEqual(stream.getvalue().count("***"), 2)

    def test_json_lines(self):
        stream, log, _ = capture("json", [self.SECRET])
        log.error("login failed", password="pa ss/w@rd", url="s3://k:pa%20ss%2Fw%40rd@host/")
        record = json.loads(stream.getvalue())
        self.assertEqual((record["password"], record["url"]), ("***", "s3://k:***@host/"))

    def test_daemon_secrets(self):
        database = "postgresql://ingest:p%40ss@db.example.com:5432/mailingest"
        environ = {"AWS_SECRET_ACCESS_KEY": "wJalr/K7MDENG", "AWS_ACCESS_KEY_ID": "AKIA"}
        self.assertEqual(
            logs.daemon_secrets(database, environ),
            ["p%40ss", "p@ss", "wJalr/K7MDENG"],
        )
        self.assertEqual(logs.daemon_secrets("sqlite:///x.db", {}), [])


class TwistdIntegrationTests(unittest.TestCase):
    """What tap.py does: install_twistd_logger from the plugin's postOptions."""

    database = "postgresql://u:s3cret@db/x"

    def setUp(self):
        self.patch(logs, "_twistd_observer_factory", None)

    def plugin_options(self, *twistd_args):
        server = ServerOptions()
        server.parseOptions(list(twistd_args))
        plugin = usage.Options()
        plugin.parent = server
        return server, plugin

    def test_stdout_with_nodaemon(self):
        server, plugin = self.plugin_options("--nodaemon")
        logs.install_twistd_logger(plugin, "json", self.database, {})
        self.assertEqual(server["logger"], logs.TWISTD_LOGGER)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        observer = namedAny(server["logger"])()
        Logger(namespace="probe", observer=observer).info("password {pw}", pw="s3cret")
        self.assertEqual(json.loads(stdout.getvalue())["message"], "password ***")

    def logfile_observer(self, path: str):
        """The observer twistd makes for C{--logfile path}, through install_twistd_logger, in text."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        server, plugin = self.plugin_options("--logfile", path)
        logs.install_twistd_logger(plugin, "text", self.database, {})
        observer = namedAny(server["logger"])()
        return observer, Logger(namespace="probe", observer=observer)

    def test_logfile(self):
        path = os.path.abspath(self.mktemp())
        _, log = self.logfile_observer(path)
        log.info("to the file, password {pw}", pw="s3cret")
        with open(path) as f:
            self.assertIn("[probe#info] to the file, password ***\n", f.read())
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    @defer.inlineCallbacks
    def test_logfile_rotated_on_sigusr1(self):
        """As twistd does it: SIGUSR1 moves the file to C{.1} (on the reactor) and logging goes on in a new one."""
        path = os.path.abspath(self.mktemp())
        _, log = self.logfile_observer(path)
        log.info("before rotation")
        self.assertFalse(os.path.exists(path + ".1"))
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if os.path.exists(path + ".1"):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        log.info("after rotation")
        with open(path + ".1") as f:
            self.assertIn("before rotation", f.read())
        with open(path) as f:
            self.assertEqual([line.split("] ", 1)[1] for line in f], ["after rotation\n"])

    def test_operator_choice_wins(self):
        for args in (["--syslog"], ["--logger", "twisted.logger.textFileLogObserver"]):
            server, plugin = self.plugin_options(*args)
            before = server["logger"]
            logs.install_twistd_logger(plugin, "json", self.database, {})
            self.assertEqual(server["logger"], before)

    def test_without_twistd(self):
        logs.install_twistd_logger(usage.Options(), "json", self.database, {})
        self.assertIsNone(logs._twistd_observer_factory)

    def test_real_twistd(self):
        """
        A throwaway twistd plugin calling install_twistd_logger: everything,
        twistd's own start and stop lines included, comes out as JSON lines.
        """
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "twisted", "plugins"))
        with open(os.path.join(root, "twisted", "plugins", "logprobe_plugin.py"), "w") as f:
            f.write(
                "from twisted.application.service import ServiceMaker\n"
                "logprobe = ServiceMaker('logprobe', 'logprobe_tap', 'probe', 'logprobe')\n"
            )
        with open(os.path.join(root, "logprobe_tap.py"), "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    from twisted.application import service
                    from twisted.logger import Logger
                    from twisted.python import usage
                    from mailingest.ops.logs import install_twistd_logger

                    class Options(usage.Options):
                        optParameters = [["log-format", None, "text", ""]]

                        def postOptions(self):
                            install_twistd_logger(self, self["log-format"], "postgresql://u:s3cret@db/x",
                                                  {"AWS_SECRET_ACCESS_KEY": "AWSsecret"})

                    class Probe(service.Service):
                        def startService(self):
                            from twisted.internet import reactor
                            Logger(namespace="probe").info(
                                "keys {pw} {key}", pw="s3cret", key="AWSsecret", org="acme")
                            print("printed")
                            reactor.callLater(0, reactor.stop)

                    def makeService(options):
                        return Probe()
                    """
                )
            )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, REPO]))
        args = ["--nodaemon", "--pidfile=", "logprobe", "--log-format", "json"]
        d = utils.getProcessOutputAndValue(TWISTD, args, env=env, path=root)

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            records = [json.loads(line) for line in out.decode().splitlines()]
            messages = [r["message"] for r in records]
            self.assertTrue(messages[0].startswith("twistd "), messages)
            self.assertIn("keys *** ***", messages)
            self.assertIn("printed", messages)
            self.assertEqual(messages[-1], "Server Shut Down.")
            self.assertEqual([r["org"] for r in records if "org" in r], ["acme"])
            self.assertNotIn(b"secret", out)

        return d.addCallback(check)


class DatabasePasswordInDaemonLogTests(unittest.TestCase):
    """Issue 11 item 6: a real twistd given a database it cannot use never logs the password."""

    def wait_for(self, process, log_path, done, timeout=40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            with open(log_path, errors="replace") as f:
                if done(f.read()):
                    break
            time.sleep(0.2)
        if process.poll() is None:
            process.terminate()
        process.wait(20)
        with open(log_path, errors="replace") as f:
            return f.read()

    def test_hostile_database_urls(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        running = []
        for index, (url, passwords, usable) in enumerate(HOSTILE_URLS):
            log_path = os.path.join(directory, f"daemon-{index}.log")
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [TWISTD, "-n", "--pidfile=", "mailingest", "--smtp", "tcp:0:interface=127.0.0.1",
                     "--http", "none", "--database", url, "--storage", "file:" + directory],
                    cwd=directory, stdout=log, stderr=subprocess.STDOUT,
                    env={k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")},
                )
            self.addCleanup(lambda p=process: p.poll() is not None or p.kill())
            running.append((url, passwords, usable, process, log_path))
        for url, passwords, usable, process, log_path in running:
            if usable and url.startswith("postgresql://"):
                # the line repeated every 5 s while the database cannot be reached
                text = self.wait_for(process, log_path, lambda t: t.count("cannot prepare the database") >= 2)
                self.assertGreaterEqual(text.count("cannot prepare the database"), 2, text)
            else:
                # refused at start: libpq would misread it, or it is not a URL
                text = self.wait_for(process, log_path, lambda t: False)
                self.assertIn("database URL", text)
            self.assertIn("***", text, url)
            self.assertEqual(leaked(text, passwords), [], f"{url}: {text}")


class UsageTests(unittest.TestCase):
    def test_help_usage_line(self):
        d = utils.getProcessOutputAndValue(TWISTD, ["mailingest", "--help"], env=dict(os.environ))

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err)
            self.assertEqual(out.decode().splitlines()[0], "Usage: twistd [twistd options] mailingest [options]")

        return d.addCallback(check)


class DeliveryLogTests(DaemonTestCase):
    """Issue 12: what the accepted, duplicate, 451 and parsed lines say."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.daemon.store.add_org("beta", "Beta Ltd")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    @defer.inlineCallbacks
    def test_accepted_and_duplicate_lines(self):
        yield self.daemon.send(message(), ["orders+acme@example.com"])
        yield self.daemon.send(message(), ["orders+acme@example.com"])
        [row] = yield self.daemon.store.list_messages()
        [accepted] = self.logged("accepted")
        [duplicate] = self.logged("duplicate")
        for line in (accepted, duplicate):
            self.assertEqual(
                (line["message_id"], line["message_id_header"], line["size"], line["org"]),
                (row["id"], "<order-1@customer.test>", row["raw_size"], "acme"),
            )
            self.assertIn("message-id=<order-1@customer.test>", formatEvent(line))

    @defer.inlineCallbacks
    def test_temporary_failure_line(self):
        self.patch(self.daemon.blobs, "put_bytes", lambda *args: defer.fail(StorageError("disk on fire")))
        code, _ = yield self.daemon.send(message(), ["orders+beta@example.com", "orders+acme@example.com"])
        self.assertEqual(code, 451)
        [line] = self.logged("temporary_failure")
        self.assertEqual(
            (line["org"], line["recipients"], line["message_id_header"], line["log_level"]),
            ("acme, beta", "orders+beta@example.com, orders+acme@example.com", "<order-1@customer.test>", LogLevel.error),
        )
        self.assertIn("disk on fire", formatEvent(line))
        self.assertIn("message-id=<order-1@customer.test>", formatEvent(line))

    @defer.inlineCallbacks
    def test_message_without_attachments_is_info_once(self):
        code, reply = yield self.daemon.send(message(), ["orders+acme@example.com"])
        row = yield self.daemon.settled(int(reply.split()[-1]))
        self.assertEqual(row["status"], "parsed")
        [line] = self.logged("parsed")
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(formatEvent(line), f"message {row['id']} for acme parsed: no attachments")
