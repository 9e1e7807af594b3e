"""
A real webhook receiver for the tests: a twisted.web server on 127.0.0.1
(or ::1) that records each POST (headers and body) and answers with the
status codes it is given, one per request (the last repeats); and a
L{SilentReceiver} that never answers.
"""

import time

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.web import resource, server

from tests.daemon import sleep


class _Hook(resource.Resource):
    isLeaf = True

    def __init__(self, receiver: "Receiver"):
        super().__init__()
        self.receiver = receiver

    def render_POST(self, request):
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.receiver.requests.append((headers, request.content.read(), time.monotonic()))
        codes = self.receiver.codes
        request.setResponseCode(codes.pop(0) if len(codes) > 1 else codes[0])
        return b"ok"


class Receiver:
    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.requests: list[tuple[dict, bytes, float]] = []
        self.port = None

    @defer.inlineCallbacks
    def start(self, port: int = 0, interface: str = "127.0.0.1"):
        site = server.Site(_Hook(self))
        site.noisy = False
        self.port = yield _listen(site, port, interface)
        return self

    def stop(self):
        return self.port.stopListening()

    @property
    def url(self) -> str:
        return _url(self.port)

    @defer.inlineCallbacks
    def received(self, count: int, timeout: float = 20.0):
        """Fire once C{count} requests have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} webhook request(s) arrived, expected {count}")
            yield sleep(0.02)
        return self.requests


def _listen(factory, port: int, interface: str) -> defer.Deferred:
    endpoint = endpoints.TCP6ServerEndpoint if ":" in interface else endpoints.TCP4ServerEndpoint
    return endpoint(reactor, port, interface=interface).listen(factory)


def _url(port) -> str:
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}/hooks/mail"


class _Hang(protocol.Protocol):
    def connectionMade(self):
        self.factory.held.add(self)
        self.factory.most_at_once = max(self.factory.most_at_once, len(self.factory.held))

    def connectionLost(self, reason):
        self.factory.held.discard(self)


class SilentReceiver(protocol.Factory):
    """Accepts connections, reads what comes and never answers; C{most_at_once} connections were held at a time."""

    protocol = _Hang
    noisy = False

    def __init__(self):
        self.held: set[_Hang] = set()
        self.most_at_once = 0
        self.port = None

    @defer.inlineCallbacks
    def start(self):
        self.port = yield _listen(self, 0, "127.0.0.1")
        return self

    def stop(self):
        """Drop the connections held (the attempts on them fail at once), stop listening."""
        for connection in list(self.held):
            connection.transport.abortConnection()
        return self.port.stopListening()

    @property
    def url(self) -> str:
        return _url(self.port)
