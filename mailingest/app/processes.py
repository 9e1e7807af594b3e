"""
Several intake processes (C{--processes N}): the parent opens the SMTP
listening sockets and hands them to N children (L{mailingest.app.intake}),
each serving them with its own reactor.

Each child has a listening socket of its own, bound with C{SO_REUSEPORT} to
the one address: the kernel spreads new connections evenly among the
sockets. One shared socket (Twisted's C{adoptStreamPort} on a single
descriptor) was tried first: whichever child woke first accepted nearly every
connection, so with long-lived client sessions one child did all the work.
The parent opens the sockets and keeps them open, so the backlog of a child
that dies is not reset: its waiting connections are served by its
replacement. C{tcp:0} is bound once and the other sockets take the port it
got.

The connection limits are divided: child i of N gets its share of
C{--max-connections} and C{--max-connections-per-ip}
(L{mailingest.app.intake.share}), so the documented totals hold without a
round trip to the parent per connection; the price is that one address can be
refused before its total when the kernel hands its connections unevenly.

A child that dies is started again after C{RESTART_SECONDS}; its senders saw
no 250 for what it had not stored, and retry. SIGTERM stops every child (each
drains its sessions, as one daemon does) and then the parent; SIGHUP (with
TLS) is passed on, so every child reloads its certificate. Extraction, the
ops endpoint and the sweeper run in the parent only; metrics are the sum over
the processes (L{mailingest.ops.metrics.aggregate_children}); each relayed
log line carries its process.
"""

import json
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, tcp
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher
from twisted.protocols.basic import NetstringReceiver

from mailingest.errors import ConfigError
from mailingest.ops import metrics
from mailingest.smtp.proxy import ENDPOINT_PREFIX
from mailingest.smtp.tls import ReloadableTLS
from mailingest.twisted_private import tcp_listen_arguments

log = Logger(namespace="mailingest.daemon")


def stop_reactor(reactor) -> None:
    """Stop the daemon: now, or as soon as the reactor runs (a failure in twistd's privileged start-up comes before)."""
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)

RESTART_SECONDS = 1.0
# A child drains its sessions within the daemon's grace (10 s); then it is killed.
STOP_SECONDS = 15.0
# A child's log record is a JSON object; one longer than this is cut off.
MAX_LOG_RECORD = 1024 * 1024
# Settings, a store call or its reply: a few KB (a message's rows, without its content).
MAX_FRAME = 1024 * 1024


def plain_tcp(description: str) -> str:
    """The endpoint the parent listens on for C{description}: tcp only (a C{haproxy:} prefix is the children's)."""
    plain = description[len(ENDPOINT_PREFIX):] if description.startswith(ENDPOINT_PREFIX) else description
    if plain.split(":", 1)[0] not in ("tcp", "tcp6"):
        raise ConfigError(f"--processes above 1 needs tcp: SMTP endpoints (or haproxy:tcp:), not {description!r}")
    return plain


class _Nobody(protocol.ServerFactory):
    """The parent's factory on the SMTP sockets: it never accepts (the children do)."""

    noisy = False


_NOBODY = _Nobody()


class _SharedPort(tcp.Port):
    """One of several listening sockets bound to the same address (C{SO_REUSEPORT})."""

    def createInternetSocket(self):
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


# What an intake process may ask of the parent's store when the parent is the
# one writer (SQLite): what the SMTP side uses, nothing else.
STORE_CALLS = frozenset({"insert_messages", "raw_key_in_use", "active_orgs", "get_org"})


class _Frames(NetstringReceiver):
    """Netstrings of pickled tuples to and from one intake process (its stdin and stdout)."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, child: "_Child"):
        self.child = child

    def send(self, *frame) -> None:
        self.sendString(pickle.dumps(frame))

    def stringReceived(self, data: bytes) -> None:
        self.child.frame_received(pickle.loads(data))


class _Child(protocol.ProcessProtocol):
    """One intake process: settings and store replies go in on its stdin; store calls come out on stdout, log records on stderr."""

    def __init__(self, parent: "IntakeProcesses", index: int):
        self.parent = parent
        self.index = index
        self.ended = defer.Deferred()
        self.frames = _Frames(self)
        self._log = b""

    def connectionMade(self):
        self.pid = self.transport.pid
        self.frames.makeConnection(self.transport)
        self.frames.send("settings", self.parent.settings, self.parent.writer is not None)

    def outReceived(self, data: bytes):
        self.frames.dataReceived(data)

    def frame_received(self, frame: tuple) -> None:
        """A store call from the child (the parent is the one writer): answered with its result or error message."""
        kind, request, method, args = frame
        if kind != "call" or method not in STORE_CALLS or self.parent.writer is None:
            log.error("intake process {index} asked for {method}: not a store call; stopping it", index=self.index, method=method)
            self.transport.signalProcess("KILL")
            return
        d = defer.maybeDeferred(getattr(self.parent.writer, method), *args)
        if method == "insert_messages":
            d.addCallback(self._stored)
        d.addCallbacks(lambda result: (request, True, result), lambda f: (request, False, f.getErrorMessage()))
        d.addCallback(lambda reply: self.frames.send("reply", *reply) if self.transport.pid else None)

    def _stored(self, result):
        self.parent.on_stored()
        return result

    def errReceived(self, data: bytes):
        self._log = (self._log + data)[-MAX_LOG_RECORD:]
        # Each record is one line of JSON (L{mailingest.app.intake.log_record}).
        *records, self._log = self._log.split(b"\n")
        for record in records:
            if record:
                self._relay(record)

    def _relay(self, record: bytes) -> None:
        """One record into the daemon's log; a line that is not one (Python dying early, say) as a warning."""
        try:
            event = json.loads(record)
            level = LogLevel.levelWithName(event["log_level"])
            if not isinstance(event["log_text"], str):
                raise TypeError("log_text is not text")
        except (ValueError, KeyError, TypeError, InvalidLogLevelError):
            event = {"log_text": record.decode("utf-8", "replace"), "log_namespace": "mailingest.intake"}
            level = LogLevel.warn
        if not isinstance(event.get("log_time"), (int, float)):
            event["log_time"] = time.time()
        event["log_level"] = level
        event["log_format"] = "{log_text}"
        event["process"] = f"intake-{self.index} pid {self.pid}"
        event["log_namespace"] = f"{event.get('log_namespace') or '-'}@intake-{self.index}"
        globalLogPublisher(event)

    def processEnded(self, reason):
        self.parent.child_ended(self, reason)
        self.ended.callback(None)


class IntakeProcesses(service.Service):
    """Listening sockets opened here, served by C{settings['processes']} children, restarted when they die."""

    def __init__(self, reactor, settings: dict, store, on_stored):
        self.reactor = reactor
        self.settings = settings
        # One writer: with SQLite the children's store calls come here.
        self.writer = store if store.exclusive else None
        self.on_stored = on_stored
        self.endpoints = [plain_tcp(description) for description in settings["smtp"]]
        self.tls_context = ReloadableTLS(settings["tls_cert"], settings["tls_key"]) if settings["tls_cert"] else None
        self.ports = []
        self.children: dict[int, _Child] = {}
        self.metrics_dir: str | None = None
        self._previous_hup = None

    def startService(self):
        super().startService()
        self.metrics_dir = tempfile.mkdtemp(prefix="mailingest-metrics-")
        metrics.aggregate_children(self.metrics_dir)
        d = defer.ensureDeferred(self._listen())
        d.addCallback(lambda _: [self._spawn(index) for index in range(self.settings["processes"])])
        d.addErrback(self._cannot_listen)
        if self.tls_context is not None:
            self._previous_hup = signal.signal(signal.SIGHUP, self._forward_hup)

    async def _listen(self):
        """For each SMTP endpoint, one listening socket per child, all on the same address."""
        for description in self.endpoints:
            try:
                endpoint = endpoints.serverFromString(self.reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"bad SMTP endpoint {description!r}: {e}") from None
            number, interface, backlog = tcp_listen_arguments(endpoint)
            sockets = []
            self.ports.append(sockets)
            for _ in range(self.settings["processes"]):
                port = _SharedPort(number, _NOBODY, backlog, interface, self.reactor)
                sockets.append(port)
                port.startListening()
                # The children accept; here the socket only has to stay open.
                port.stopReading()
                number = port.getHost().port
            log.info("SMTP listening on {address} ({count} intake processes)", address=sockets[0].getHost(), count=len(sockets))

    def _cannot_listen(self, failure):
        log.critical("mailingest could not start: cannot listen for SMTP: {error}", error=failure.getErrorMessage())
        stop_reactor(self.reactor)

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        fds = [sockets[index].fileno() for sockets in self.ports]
        child = _Child(self, index)
        argv = [sys.executable, "-m", "mailingest.app.intake", str(index), *map(str, fds)]
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        child_fds = {0: "w", 1: "r", 2: "r", **{fd: fd for fd in fds}}
        self.reactor.spawnProcess(child, sys.executable, argv, env=env, childFDs=child_fds)
        self.children[index] = child
        log.info("intake process {index} started, pid {pid}", index=index, pid=child.pid)

    def child_ended(self, child: _Child, reason) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        metrics.process_ended(child.pid)
        if not self.running:
            return
        log.warn(
            "intake process {index} (pid {pid}) ended: {reason}; starting another in {seconds:g} s",
            index=child.index, pid=child.pid, reason=reason.getErrorMessage(), seconds=RESTART_SECONDS,
        )
        self.reactor.callLater(RESTART_SECONDS, self._spawn, child.index)

    def _forward_hup(self, signum, frame):
        self.reactor.callFromThread(self.signal_children, signal.SIGHUP)

    def signal_children(self, signum: int) -> None:
        for child in list(self.children.values()):
            try:
                child.transport.signalProcess(signum)
            except OSError:
                pass

    def stopService(self):
        super().stopService()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        ended = [child.ended for child in self.children.values()]
        # A child stops as on SIGTERM (once, if it got the signal too); its
        # stdin stays open for the replies to its last store calls.
        for child in self.children.values():
            child.frames.send("stop")
        kill = self.reactor.callLater(STOP_SECONDS, self.signal_children, signal.SIGKILL)
        d = defer.DeferredList(ended)

        def stopped(_):
            if kill.active():
                kill.cancel()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            return defer.DeferredList([defer.maybeDeferred(port.stopListening) for sockets in self.ports for port in sockets])

        return d.addCallback(stopped)
