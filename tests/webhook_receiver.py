"""
A real webhook receiver for the tests: a twisted.web server on 127.0.0.1
that records each POST (headers and body) and answers with the status codes
it is given, one per request (the last repeats).
"""

import time

from twisted.internet import defer, endpoints, reactor
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
    def start(self, port: int = 0):
        site = server.Site(_Hook(self))
        site.noisy = False
        self.port = yield endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)
        return self

    def stop(self):
        return self.port.stopListening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/hooks/mail"

    @defer.inlineCallbacks
    def received(self, count: int, timeout: float = 20.0):
        """Fire once C{count} requests have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} webhook request(s) arrived, expected {count}")
            yield sleep(0.02)
        return self.requests
