"""
One intake process of C{--processes N}: the SMTP side alone, on listening
sockets its parent (L{mailingest.app.processes}) opened.

Run as C{python -m mailingest.app.intake INDEX FD...}: it reads its settings
from stdin (one netstring holding a pickle, from the parent only), serves the
inherited sockets with its own reactor, store connection and blob store, tells
the parent of each stored message with a C{stored} line on stdout (the parent's
extraction is woken), and logs JSON events to stderr, which the parent relays
into its own log. The end of stdin means the parent is gone: it stops, as on
SIGTERM (sessions in progress finish within the grace period): this is how
the parent passes its SIGTERM on.
"""

import os
import pickle
import socket
import sys

from twisted.application import service
from twisted.internet import stdio
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols.basic import NetstringReceiver

from mailingest.smtp.proxy import ENDPOINT_PREFIX, ProxyHeaderFirstFactory

log = Logger(namespace="mailingest.intake")

# Settings are a few KB; anything larger is not our parent speaking.
MAX_SETTINGS_BYTES = 1024 * 1024


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


def build_intake(settings: dict, fds: list[int], reactor, on_stored) -> service.MultiService:
    """The SMTP side of the daemon on inherited sockets; the schema is the parent's business."""
    from mailingest.app.service import DEFAULT_SCRATCH_DIR, add_smtp_side, make_ingest
    from mailingest.storage.blobs import open_blobs
    from mailingest.storage.store import open_store

    store = open_store(settings["database"])
    blobs = open_blobs(settings["storage"], settings["s3_endpoint"], settings["s3_region"], os.environ)
    root = _Intake(store, blobs)
    spool_dir = os.path.join(blobs.scratch_dir or DEFAULT_SCRATCH_DIR, "spool")
    ingest = make_ingest(settings, store, blobs, spool_dir, root)
    ingest.on_stored.append(on_stored)
    add_smtp_side(settings, reactor, ingest, root, adopting(fds))
    return root


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
    """stdin/stdout with the parent: settings in, C{stored} lines out; the end of stdin stops us."""

    MAX_LENGTH = MAX_SETTINGS_BYTES

    def __init__(self, reactor, index: int, fds: list[int]):
        self.reactor = reactor
        self.index = index
        self.fds = fds
        self.intake: service.MultiService | None = None

    def connectionMade(self) -> None:
        self.stopping = False
        self.reactor.addSystemEventTrigger("before", "shutdown", self._stopping)

    def _stopping(self):
        self.stopping = True
        if self.intake is not None:
            return self.intake.stopService()

    def stringReceived(self, data: bytes) -> None:
        if self.intake is not None:
            return
        settings = child_settings(pickle.loads(data), self.index)
        self.intake = build_intake(settings, self.fds, self.reactor, self.stored)
        self.intake.startService()

    def stored(self) -> None:
        self.transport.write(b"stored\n")

    def connectionLost(self, reason=None) -> None:
        """The parent closed our stdin (its SIGTERM) or died: stop as on SIGTERM, unless already stopping."""
        if not self.stopping:
            self.reactor.stop()


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stderr)], redirectStandardIO=False)
    index, fds = int(argv[1]), [int(fd) for fd in argv[2:]]
    stdio.StandardIO(_Parent(reactor, index, fds))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
