"""
A client of ClamAV's daemon: one file streamed with C{zINSTREAM} per
connection (TCP or Unix socket), its answer read bounded.

clamd closes a stream longer than its C{StreamMaxLength} (25 MB by
default) with C{INSTREAM size limit exceeded}: a file larger than the
limit we are told (C{--clamd-max-stream}) is not sent at all and gets an
C{error} verdict saying so. Every way clamd can fail (no answer within the
time given, garbage, a connection closed mid-stream, refused) ends in an
C{error} verdict with the reason, never an exception, never a wait past
the deadline.
"""

import os
import struct
from dataclasses import asdict, dataclass

from twisted.internet import defer, protocol
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

CHUNK = 64 * 1024
# The longest answer clamd gives: "stream: <signature name> FOUND\0".
REPLY_LIMIT = 4096
DEFAULT_MAX_STREAM = 25 * 1024 * 1024


@dataclass(frozen=True)
class FileVerdict:
    """C{clean}, C{infected} (C{detail}: the signature) or C{error} (C{detail}: why), and whether trying again may help."""

    result: str
    detail: str | None = None
    transient: bool = False

    def to_json(self) -> dict:
        """As the scan process sends it to the daemon."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "FileVerdict":
        return cls(**data)


def endpoint_description(text: str) -> str:
    """C{--clamd}: C{unix:/path} or C{tcp:host:port}, as a Twisted client endpoint string."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix:path=" + rest.replace(":", r"\:")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return f"tcp:host={host.strip('[]')}:port={port}"
    raise ValueError("must be unix:/path/to/clamd.ctl or tcp:HOST:PORT")


def parse_reply(reply: bytes) -> FileVerdict:
    """clamd's answer to one stream (without its NUL)."""
    try:
        text = reply.decode("utf-8")
    except UnicodeDecodeError:
        return FileVerdict("error", "clamd answered garbage (not UTF-8)", True)
    if text.startswith("stream: "):
        text = text[len("stream: "):]
    if text == "OK":
        return FileVerdict("clean")
    if text.endswith(" FOUND") and text[:-6].strip():
        return FileVerdict("infected", text[:-6].strip())
    if text.endswith(" ERROR"):
        return FileVerdict("error", "clamd: " + text[:-6].strip()[:200], "size limit" not in text)
    return FileVerdict("error", f"clamd answered garbage: {text[:80]!r}", True)


@implementer(IPushProducer)
class _Instream(protocol.Protocol):
    """One file, sent as clamd's chunks as fast as the socket takes them, and its answer."""

    def __init__(self, path: str):
        self._path = path
        self._reply = b""
        self._paused: defer.Deferred | None = None
        self._lost = False
        self.answered: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        defer.ensureDeferred(self._send()).addErrback(self._failed)

    async def _send(self) -> None:
        self.transport.write(b"zINSTREAM\0")
        with open(self._path, "rb") as source:
            while not self._lost and not self.answered.called:
                if self._paused is not None:
                    await self._paused
                    continue
                # A page-cache read of one chunk: cheap, and the socket's pauses pace it.
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                self.transport.write(struct.pack(">I", len(chunk)) + chunk)
        if not self._lost and not self.answered.called:
            self.transport.write(struct.pack(">I", 0))
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._lost = True
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        self._reply += data
        if b"\0" in self._reply:
            self._answer(parse_reply(self._reply.split(b"\0", 1)[0].strip()))
        elif len(self._reply) > REPLY_LIMIT:
            self._answer(FileVerdict("error", f"clamd answered garbage ({len(self._reply)} bytes, no end)", True))

    def _answer(self, verdict: FileVerdict) -> None:
        if not self.answered.called:
            self.answered.callback(verdict)
        self.transport.loseConnection()

    def _failed(self, failure) -> None:
        self._answer(FileVerdict("error", f"cannot send to clamd: {failure.getErrorMessage()}", True))

    def connectionLost(self, reason) -> None:
        self._lost = True
        self.resumeProducing()
        if not self.answered.called:
            tail = self._reply.split(b"\0", 1)[0].strip()
            if tail.endswith(b"ERROR"):  # clamd's "size limit exceeded", told before it closes
                self.answered.callback(parse_reply(tail))
            else:
                self.answered.callback(FileVerdict("error", "clamd closed the connection before answering", True))


class _OneProtocol(protocol.Factory):
    """The factory of one connection's protocol (cheaper than Factory.forProtocol's per-call class checks)."""

    noisy = False

    def __init__(self, instream: _Instream):
        self._instream = instream

    def buildProtocol(self, addr) -> _Instream:
        self._instream.factory = self
        return self._instream


class ClamdClient:
    """Scans files with clamd at C{endpoint} (C{--clamd}), each within the time it is given."""

    def __init__(self, endpoint: str, max_stream: int = DEFAULT_MAX_STREAM, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.endpoint = endpoint
        # Parsed once: a description string costs more to parse than a scan's I/O.
        self._endpoint = clientFromString(reactor, endpoint_description(endpoint))
        self.max_stream = max_stream

    async def scan(self, path: str, timeout: float) -> FileVerdict:
        """The verdict on the file at C{path}, within C{timeout} seconds."""
        size = os.stat(path).st_size
        if size > self.max_stream:
            return FileVerdict(
                "error", f"not scanned: {size} bytes is over clamd's StreamMaxLength ({self.max_stream} bytes)"
            )
        if timeout <= 0:
            return FileVerdict("error", "not scanned: the message's scan budget was spent", True)
        instream = _Instream(path)
        connecting = self._endpoint.connect(_OneProtocol(instream))
        deadline = self._reactor.callLater(timeout, self._overtime, connecting, instream, timeout)
        try:
            connection = await connecting
        except defer.CancelledError:
            return FileVerdict("error", f"clamd did not accept a connection within {timeout:.2g} s", True)
        except Exception as e:
            if deadline.active():
                deadline.cancel()
            return FileVerdict("error", f"cannot connect to clamd at {self.endpoint}: {e}", True)
        try:
            return await instream.answered
        finally:
            if deadline.active():
                deadline.cancel()
            if connection.transport is not None:
                # Answered (or given up on): what is still unsent is not wanted.
                connection.transport.abortConnection()

    def _overtime(self, connecting: defer.Deferred, instream: _Instream, timeout: float) -> None:
        if not connecting.called:
            connecting.cancel()
            return
        if not instream.answered.called:
            instream.answered.callback(FileVerdict("error", f"clamd did not answer within {timeout:.2g} s", True))
            instream.transport.abortConnection()
