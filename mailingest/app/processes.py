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

Parent and children speak AMP (L{mailingest.app.intake_protocol}) on the
children's stdin and stdout. The parent answers the store calls of the SMTP
side when it is the one writer (SQLite), and keeps the count of recipients
refused per client address for all of them: each refusal a child reports is
passed on to the others, and a child that starts gets the count so far.
"""

import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from operator import itemgetter

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IAddress
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher
from twisted.protocols import amp
from zope.interface import implementer

from mailingest.app.intake_protocol import (
    BAD_RECORDS, ActiveOrgs, InsertMessages, LookupOrg, RawKeyInUse, RecipientRefused, RoutedDomains,
    QuietAMP, StartIntake, StopIntake, StoreCallFailed, FAILED, kind_of, domains_answer,
)
from mailingest.app.settings import Settings
from mailingest.errors import ConfigError
from mailingest.interfaces import IIntakeStore, ISchemaStore
from mailingest.ops import metrics
from mailingest.smtp import replies
from mailingest.smtp.limits import AddressWindow
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
# A client address as a child reports it (an IPv6 /64 is the longest).
MAX_PEER = 64


def plain_tcp(description: str) -> str:
    """The endpoint the parent listens on for C{description}: tcp only (a C{haproxy:} prefix is the children's)."""
    plain = description[len(ENDPOINT_PREFIX):] if description.startswith(ENDPOINT_PREFIX) else description
    if plain.split(":", 1)[0] not in ("tcp", "tcp6"):
        raise ConfigError(f"--processes above 1 needs tcp: SMTP endpoints (or haproxy:tcp:), not {description!r}")
    return plain


def shared_socket(number: int, interface: str, backlog: int) -> socket.socket:
    """
    A listening socket bound with C{SO_REUSEPORT}, one of several on the same
    address: a plain socket, since the parent never accepts on it (a Twisted
    port would only log that it starts and stops).
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    skt = socket.socket(family, socket.SOCK_STREAM)
    try:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        skt.bind((interface, number))
        skt.listen(backlog)
        skt.setblocking(False)
    except OSError:
        skt.close()
        raise
    return skt


@implementer(IAddress)
@dataclass(frozen=True)
class IntakeAddress:
    """The other end of the AMP connection with an intake process."""

    index: int
    pid: int


class _StdioTransport:
    """
    What AMP needs of a transport, on a child's pipes: writes go to its stdin,
    and losing the connection closes it (the child then stops). A process
    transport has no C{getPeer}, which AMP calls.
    """

    def __init__(self, process, address: IntakeAddress):
        self.process = process
        self.address = address

    def write(self, data: bytes) -> None:
        self.process.write(data)

    def writeSequence(self, data) -> None:
        self.process.writeSequence(data)

    def loseConnection(self) -> None:
        self.process.closeStdin()

    def getPeer(self) -> IntakeAddress:
        return self.address

    def getHost(self) -> IntakeAddress:
        return self.address


def _store_failure(failure):
    """Any error of the store reaches the child as the declared L{StoreCallFailed}, with its message."""
    if failure.check(StoreCallFailed):
        return failure
    raise StoreCallFailed(failure.getErrorMessage())


class ChildConnection(QuietAMP):
    """The parent's end of the AMP connection with one intake process: what a child may ask, and nothing else."""

    def __init__(self, child: "_Child"):
        super().__init__()
        self.child = child

    def dispatchCommand(self, box):
        d = super().dispatchCommand(box)
        d.addErrback(self._refused, box)
        return d

    def _refused(self, failure, box):
        if failure.check(amp.RemoteAmpError) and failure.value.errorCode == BAD_RECORDS:
            log.error(
                "intake process {index} sent a bad {command}: {error}",
                index=self.child.index, command=box.get(amp.COMMAND, b"?").decode("ascii", "replace"),
                error=failure.value.description,
            )
        return failure

    def _writer(self):
        writer = self.child.parent.writer
        if writer is None:
            raise StoreCallFailed("the intake processes write to the database themselves")
        return writer

    @InsertMessages.responder
    def insert_messages(self, rows: list[dict]) -> defer.Deferred:
        writer = self._writer()
        batches = [list(batch) for _, batch in groupby(rows, key=itemgetter("batch"))]
        for row in rows:
            del row["batch"]
        calls = [defer.maybeDeferred(writer.insert_messages, batch) for batch in batches]
        return defer.DeferredList(calls, consumeErrors=True).addCallback(self._inserted, batches)

    def _inserted(self, outcomes, batches) -> dict:
        kinds, ids, errors = [], [], []
        for (ok, value), batch in zip(outcomes, batches):
            if ok:
                kinds += [kind_of(row_id) for row_id in value]
                ids += [int(row_id) for row_id in value]
            else:
                kinds.append(FAILED * len(batch))
                ids += [0] * len(batch)
                errors += [value.getErrorMessage() or "not stored"] * len(batch)
        if any(ok for ok, _ in outcomes):
            self.child.parent.on_stored()
        return {"kinds": b"".join(kinds), "ids": ids, "errors": errors}

    @RawKeyInUse.responder
    def raw_key_in_use(self, key: str) -> defer.Deferred:
        d = defer.maybeDeferred(self._writer().raw_key_in_use, key)
        return d.addCallbacks(lambda used: {"used": bool(used)}, _store_failure)

    @LookupOrg.responder
    def lookup_org(self, slug: str) -> defer.Deferred:
        d = defer.maybeDeferred(self._writer().get_org, slug)
        found = lambda org: {"id": None, "active": False} if org is None else {"id": org["id"], "active": bool(org["active"])}
        return d.addCallbacks(found, _store_failure)

    @ActiveOrgs.responder
    def active_orgs(self) -> defer.Deferred:
        d = defer.maybeDeferred(self._writer().active_orgs)
        return d.addCallbacks(lambda orgs: {"orgs": [{"slug": slug, "id": org_id} for slug, org_id in orgs.items()]}, _store_failure)

    @RoutedDomains.responder
    def routed_domains(self, known: int | None = None) -> defer.Deferred:
        d = defer.maybeDeferred(self._writer().routed_domains, known)
        return d.addCallbacks(domains_answer, _store_failure)

    @RecipientRefused.responder
    def recipient_refused(self, peer: str) -> dict:
        if len(peer) <= MAX_PEER:
            self.child.parent.recipient_refused(peer, self.child)
        return {}


class _Child(protocol.ProcessProtocol):
    """One intake process: AMP on its stdin and stdout (L{ChildConnection}), log records on stderr."""

    def __init__(self, parent: "IntakeProcesses", index: int):
        self.parent = parent
        self.index = index
        self.ended = defer.Deferred()
        self.amp = ChildConnection(self)
        self._log = b""

    def connectionMade(self):
        self.pid = self.transport.pid
        self.amp.makeConnection(_StdioTransport(self.transport, IntakeAddress(self.index, self.pid)))
        d = self.amp.callRemote(StartIntake, **self.parent.start_arguments())
        d.addErrback(lambda f: log.error("intake process {index} did not start: {error}", index=self.index, error=f.getErrorMessage()))

    def outReceived(self, data: bytes):
        self.amp.dataReceived(data)

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
        self.amp.connectionLost(reason)
        self.parent.child_ended(self, reason)
        self.ended.callback(None)


def endpoint_address(skt: socket.socket) -> str:
    host, port = skt.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class IntakeProcesses(service.Service):
    """Listening sockets opened here, served by C{settings.processes} children, restarted when they die."""

    def __init__(self, reactor, settings: Settings, store: "IIntakeStore | ISchemaStore", on_stored, metrics_dir: str):
        self.reactor = reactor
        self.settings = settings
        # One writer: with SQLite the children's store calls come here.
        self.writer = store if store.exclusive else None
        self.on_stored = on_stored
        self.refusals = AddressWindow(reactor, replies.REFUSED_RECIPIENT_LIMIT, replies.REFUSED_RECIPIENT_WINDOW)
        self.endpoints = [plain_tcp(description) for description in settings.smtp]
        self.tls_context = ReloadableTLS(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
        self.ports = []
        self.children: dict[int, _Child] = {}
        # The children's metric files; emptied at start, since a daemon killed with SIGKILL cannot.
        self.metrics_dir = metrics_dir
        self._previous_hup = None

    def startService(self):
        super().startService()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        os.makedirs(self.metrics_dir)
        metrics.aggregate_children(self.metrics_dir)
        d = defer.ensureDeferred(self._listen())
        d.addCallback(lambda _: [self._spawn(index) for index in range(self.settings.processes)])
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
            for _ in range(self.settings.processes):
                sockets.append(shared_socket(number, interface, backlog))
                number = sockets[-1].getsockname()[1]
            log.info(
                "SMTP listening on {address} ({count} intake processes)",
                address=endpoint_address(sockets[0]), count=len(sockets),
            )

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

    def start_arguments(self) -> dict:
        """L{StartIntake}'s arguments: the daemon's settings, and the refused recipients counted so far."""
        arguments = asdict(self.settings)
        arguments["through_parent"] = self.writer is not None
        arguments["refusals"] = self.refusals.snapshot()
        return arguments

    def recipient_refused(self, peer: str, reported_by: _Child) -> None:
        """A child refused a recipient to C{peer}: counted here for the children to come, and told to the others."""
        self.refusals.add(peer)
        for child in list(self.children.values()):
            if child is not reported_by:
                child.amp.callRemote(RecipientRefused, peer=peer)

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
            child.amp.callRemote(StopIntake)
        kill = self.reactor.callLater(STOP_SECONDS, self.signal_children, signal.SIGKILL)
        d = defer.DeferredList(ended)

        def stopped(_):
            if kill.active():
                kill.cancel()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            for sockets in self.ports:
                for skt in sockets:
                    skt.close()

        return d.addCallback(stopped)
