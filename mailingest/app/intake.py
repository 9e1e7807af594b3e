"""
One intake process of C{--processes N}: the SMTP side alone, on listening
sockets its parent (L{mailingest.app.processes}) opened.

Run as C{python -m mailingest.app.intake INDEX FD...}: it reads its settings
from stdin (netstrings holding pickles, from the parent only) and serves the
inherited sockets with its own reactor and blob store. On PostgreSQL it has its
own store connection (the parent's extraction is woken by NOTIFY); on SQLite
the parent is the one writer and answers its store calls (L{ParentStore}) over
stdin/stdout. It logs JSON events to stderr, which the parent relays into its
own log. It stops (draining its sessions within the grace period) on SIGTERM,
on the parent's C{stop} frame, or when its stdin ends (the parent is gone).
"""

import json
import os
import pickle
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, stdio
from twisted.logger import Logger, formatEvent, globalLogBeginner
from twisted.protocols.basic import NetstringReceiver

from mailingest.smtp.proxy import ENDPOINT_PREFIX, ProxyHeaderFirstFactory

log = Logger(namespace="mailingest.intake")

# Settings, a store call or its reply: a few KB; anything larger is not our parent speaking.
MAX_FRAME = 1024 * 1024


def share(total: int, count: int, index: int) -> int:
    """Process C{index}'s part of a limit divided among C{count} processes: the parts add up to C{total}."""
    return total // count + (1 if index < total % count else 0)


def child_settings(settings: dict, index: int) -> dict:
    """C{settings} for intake process C{index}: its share of the connection limits."""
    count = settings["processes"]
    return dict(
        settings,
        max_connections=share(settings["max_connections"], count, index),
        max_connections_per_ip=share(settings["max_connections_per_ip"], count, index),
    )


class AdoptedListener(service.Service):
    """A listening socket inherited from the parent (by descriptor), served while the service runs."""

    def __init__(self, reactor, fd: int, factory, description: str):
        self.reactor = reactor
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
        log.info("SMTP serving {address}", address=self.port.getHost())

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


def adopting(fds: list[int]):
    """A C{listen} for L{mailingest.app.service.add_smtp_side} that takes the inherited sockets in order."""
    remaining = list(fds)

    def listen(reactor, description: str, factory, what: str, proxy_trusted=()) -> AdoptedListener:
        if description.startswith(ENDPOINT_PREFIX):
            factory = ProxyHeaderFirstFactory(factory, proxy_trusted)
        return AdoptedListener(reactor, remaining.pop(0), factory, description)

    return listen


def build_intake(settings: dict, fds: list[int], reactor, store) -> service.MultiService:
    """The SMTP side of the daemon on inherited sockets; the schema is the parent's business."""
    from mailingest.app.service import DEFAULT_SCRATCH_DIR, add_smtp_side, make_ingest
    from mailingest.storage.blobs import open_blobs

    blobs = open_blobs(settings["storage"], settings["s3_endpoint"], settings["s3_region"], os.environ)
    root = _Intake(store, blobs)
    spool_dir = os.path.join(blobs.scratch_dir or DEFAULT_SCRATCH_DIR, "spool")
    ingest = make_ingest(settings, store, blobs, spool_dir, root)
    add_smtp_side(settings, reactor, ingest, root, adopting(fds))
    return root


class StoreCallFailed(Exception):
    """The parent's store refused a call (the database is locked, full, gone): the sender gets a 451."""


class ParentStore:
    """
    The store calls of the SMTP side, answered by the parent, the one writer
    (SQLite): message inserts from every intake process share its group
    commits instead of contending for the database's write lock.
    """

    def __init__(self, parent: "_Parent"):
        self.parent = parent
        self.waiting: dict[int, defer.Deferred] = {}
        self.next_request = 0

    def _call(self, method: str, *args) -> defer.Deferred:
        self.next_request += 1
        d = self.waiting[self.next_request] = defer.Deferred()
        self.parent.send("call", self.next_request, method, args)
        return d

    def insert_messages(self, rows):
        return self._call("insert_messages", rows)

    def raw_key_in_use(self, key):
        return self._call("raw_key_in_use", key)

    def active_orgs(self):
        return self._call("active_orgs")

    def get_org(self, slug):
        return self._call("get_org", slug)

    def answered(self, request: int, ok: bool, value) -> None:
        d = self.waiting.pop(request)
        if ok:
            d.callback(value)
        else:
            d.errback(StoreCallFailed(value))

    def close(self) -> defer.Deferred:
        for d in self.waiting.values():
            d.errback(StoreCallFailed("the intake process is stopping"))
        self.waiting.clear()
        return defer.succeed(None)


class _Intake(service.MultiService):
    """Stops its services (listeners first, then the drain), then closes storage."""

    def __init__(self, store, blobs):
        super().__init__()
        self.store = store
        self.blobs = blobs

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: self.store.close())
        d.addCallback(lambda _: self.blobs.close())
        return d


class _Parent(NetstringReceiver):
    """stdin/stdout with the parent: pickled frames (settings, store calls and their replies); the end of stdin stops us."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, reactor, index: int, fds: list[int]):
        self.reactor = reactor
        self.index = index
        self.fds = fds
        self.intake: service.MultiService | None = None
        self.store = None

    def connectionMade(self) -> None:
        self.stopping = False
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self):
        self.stopping = True
        if self.intake is not None:
            return self.intake.stopService()

    def send(self, *frame) -> None:
        self.sendString(pickle.dumps(frame))

    def stringReceived(self, data: bytes) -> None:
        kind, *rest = pickle.loads(data)
        if kind == "reply":
            self.store.answered(*rest)
        elif kind == "stop":
            self.stop()
        elif kind == "settings" and self.intake is None:
            settings, through_parent = rest
            if through_parent:
                self.store = ParentStore(self)
            else:
                from mailingest.storage.store import open_store

                self.store = open_store(settings["database"])
            self.intake = build_intake(child_settings(settings, self.index), self.fds, self.reactor, self.store)
            self.intake.startService()

    def stop(self) -> None:
        """Stop once, however many of SIGTERM, SIGINT, the parent's C{stop} and the end of stdin come."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def connectionLost(self, reason=None) -> None:
        """The parent is gone (even killed): stop as on SIGTERM."""
        self.stop()


def log_record(event: dict) -> str:
    """
    One log event as the line the parent relays (L{mailingest.app.processes}):
    the message formatted here, with the event's plain fields for a JSON log.
    Twisted's own JSON form of an event would keep a field's value but drop
    its format spec ({ms:.0f} reached the log as a long float) and costs
    twice as much per message.
    """
    text = formatEvent(event)
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
