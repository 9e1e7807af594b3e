"""
One intake process of C{--processes N}: the SMTP side alone, on listening
sockets its parent (L{mailingest.app.processes}) opened.

Run as C{python -m mailingest.app.intake INDEX FD...}: it speaks AMP with the
parent on stdin/stdout (L{mailingest.app.intake_protocol}), takes its settings
from the parent's L{StartIntake} and serves the inherited sockets with its own
reactor and blob store. On PostgreSQL it has its own store connection (the
parent's extraction is woken by NOTIFY); on SQLite the parent is the one writer
and answers its store calls (L{ParentStore}). Recipients refused to a client
address are counted with the other processes through the parent
(L{SharedRefusals}). It logs JSON events to stderr, which the parent relays
into its own log. It stops (draining its sessions within the grace period) on
SIGTERM, on the parent's L{StopIntake}, or when its stdin ends (the parent is
gone).
"""

import json
import os
import re
import signal
import socket
import sys
from dataclasses import replace

from twisted.application import service
from twisted.internet import stdio
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols import amp

from mailingest.app.settings import Settings
from mailingest.app.intake_protocol import ParentStore, QuietAMP, RecipientRefused, StartIntake, StopIntake
from mailingest.interfaces import IClosable, IIntakeStore
from mailingest.ops.logs import format_message
from mailingest.smtp import replies
from mailingest.smtp.limits import AddressWindow
from mailingest.smtp.proxy import ENDPOINT_PREFIX, ProxyHeaderFirstFactory

log = Logger(namespace="mailingest.intake")


def share(total: int, count: int, index: int) -> int:
    """Process C{index}'s part of a limit divided among C{count} processes: the parts add up to C{total}."""
    return total // count + (1 if index < total % count else 0)


def child_settings(settings: Settings, index: int) -> Settings:
    """C{settings} for intake process C{index}: its share of the connection limits."""
    count = settings.processes
    return replace(
        settings,
        max_connections=share(settings.max_connections, count, index),
        max_connections_per_ip=share(settings.max_connections_per_ip, count, index),
    )


class AdoptedListener(service.Service):
    """A listening socket inherited from the parent (by descriptor), served while the service runs."""

    def __init__(self, reactor, fd: int, factory, description: str, index: int = 0):
        self.reactor = reactor
        self.index = index
        self.fd = fd
        self.factory = factory
        self.description = description
        self.tls = None
        self.port = None

    def startService(self):
        super().startService()
        with socket.socket(fileno=os.dup(self.fd)) as inherited:
            family = inherited.family
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        address = self.port.getHost()
        log.info(
            "intake process {index} (pid {pid}) serving SMTP on {host}:{port}",
            index=self.index, pid=os.getpid(), host=address.host, port=address.port,
        )

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


def adopting(fds: list[int], index: int):
    """A C{listen} for L{mailingest.app.service.add_smtp_side} that takes the inherited sockets in order."""
    remaining = list(fds)

    def listen(reactor, description: str, factory, what: str, proxy_trusted=()) -> AdoptedListener:
        if description.startswith(ENDPOINT_PREFIX):
            factory = ProxyHeaderFirstFactory(factory, proxy_trusted)
        return AdoptedListener(reactor, remaining.pop(0), factory, description, index)

    return listen


class SharedRefusals(AddressWindow):
    """This process's count of refused recipients, kept equal to the others' through the parent."""

    def __init__(self, clock, parent: amp.AMP):
        super().__init__(clock, replies.REFUSED_RECIPIENT_LIMIT, replies.REFUSED_RECIPIENT_WINDOW)
        self.parent = parent

    def add(self, peer: str, when: float | None = None) -> int:
        count = super().add(peer, when)
        self.parent.callRemote(RecipientRefused, peer=peer)
        return count

    def refused_elsewhere(self, peer: str, when: float | None = None) -> None:
        """Another process refused a recipient to C{peer}: counted here, not sent back."""
        AddressWindow.add(self, peer, when)


def build_intake(settings: Settings, fds: list[int], reactor, store, index: int = 0, refusals=None) -> service.MultiService:
    """The SMTP side of the daemon on inherited sockets; the schema is the parent's business."""
    from mailingest.app.service import DEFAULT_SCRATCH_DIR, add_smtp_side, make_ingest
    from mailingest.storage.blobs import open_blobs
    from mailingest.storage.journal import journaled

    blobs = open_blobs(settings.storage, settings.s3_endpoint, settings.s3_region, os.environ)
    # The parent's sweeper reads this process's journal file too: same scratch directory.
    blobs = journaled(blobs, blobs.scratch_dir or DEFAULT_SCRATCH_DIR)
    root = _Intake(store, blobs)
    spool_dir = os.path.join(blobs.scratch_dir or DEFAULT_SCRATCH_DIR, "spool")
    ingest = make_ingest(settings, store, blobs, spool_dir, root)
    add_smtp_side(settings, reactor, ingest, root, adopting(fds, index), refusals)
    return root


class _Intake(service.MultiService):
    """Stops its services (listeners first, then the drain), then closes storage."""

    def __init__(self, store: "IIntakeStore | IClosable", blobs):
        super().__init__()
        self.store = store
        self.blobs = blobs

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: self.store.close())
        d.addCallback(lambda _: self.blobs.close())
        return d


class _Parent(QuietAMP):
    """AMP with the parent on stdin/stdout: its settings start the intake; the end of stdin stops us."""

    def __init__(self, reactor, index: int, fds: list[int]):
        super().__init__()
        self.reactor = reactor
        self.index = index
        self.fds = fds
        self.intake: service.MultiService | None = None
        self.refusals: SharedRefusals | None = None
        self.stopping = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self):
        self.stopping = True
        if self.intake is not None:
            return self.intake.stopService()

    @StartIntake.responder
    def start_intake(self, through_parent: bool, refusals: list[dict], **values) -> dict:
        if self.intake is not None:
            raise amp.RemoteAmpError(b"STARTED", "this intake process has started already")
        settings = Settings.from_values(values)
        if through_parent:
            store = ParentStore(self, self.reactor)
        else:
            from mailingest.handoff.events import MESSAGE_EVENTS
            from mailingest.storage.store import open_store

            store = open_store(settings.database, MESSAGE_EVENTS)
        self.refusals = SharedRefusals(self.reactor, self)
        for refusal in refusals:
            self.refusals.refused_elsewhere(refusal["peer"], refusal["at"])
        self.intake = build_intake(child_settings(settings, self.index), self.fds, self.reactor, store, self.index, self.refusals)
        self.intake.startService()
        return {}

    @StopIntake.responder
    def stop_intake(self) -> dict:
        self.stop()
        return {}

    @RecipientRefused.responder
    def refused_elsewhere(self, peer: str) -> dict:
        if self.refusals is not None:
            self.refusals.refused_elsewhere(peer)
        return {}

    def stop(self) -> None:
        """Stop once, however many of SIGTERM, SIGINT, the parent's L{StopIntake} and the end of stdin come."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def connectionLost(self, reason=None) -> None:
        """The parent is gone (even killed): stop as on SIGTERM."""
        super().connectionLost(reason)
        self.stop()


# What Twisted's ports log about themselves: which process serves where is
# logged by L{AdoptedListener} instead.
_PORT_NOISE = re.compile(r".* starting on \d+|\(\w+ Port \d+ Closed\)")


def log_record(event: dict) -> str:
    """
    One log event as the line the parent relays (L{mailingest.app.processes}):
    the message formatted here, with the event's plain fields for a JSON log.
    Twisted's own JSON form of an event would keep a field's value but drop
    its format spec ({ms:.0f} reached the log as a long float) and costs
    twice as much per message.
    """
    text = format_message(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    level = event.get("log_level")
    record = {
        "log_text": text,
        "log_level": level.name if level is not None else None,
        "log_namespace": event.get("log_namespace"),
        "log_time": event.get("log_time"),
    }
    for key, value in event.items():
        if not key.startswith("log_") and (value is None or isinstance(value, (str, int, float))):
            record[key] = value
    return json.dumps(record) + "\n"


def relay_observer(stream):
    """Write each event to C{stream} as a L{log_record} line."""

    def observe(event):
        if event.get("log_namespace") == "log_legacy" and _PORT_NOISE.fullmatch(event.get("log_text") or ""):
            return
        stream.write(log_record(event))
        stream.flush()

    return observe


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([relay_observer(sys.stderr)], redirectStandardIO=False)
    index, fds = int(argv[1]), [int(fd) for fd in argv[2:]]
    parent = _Parent(reactor, index, fds)
    stdio.StandardIO(parent)
    # systemd (KillMode=control-group) or a terminal signals every process of
    # the daemon, and the parent passes its SIGTERM on: one stop for all.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: reactor.callFromThread(parent.stop))
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(sys.argv)
