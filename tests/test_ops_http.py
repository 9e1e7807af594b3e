"""
The ops endpoint of SPEC section 8, over a real socket on 127.0.0.1.
"""

import json
import os

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from mailingest.ops import metrics
from mailingest.ops.http import MAX_REASON_LENGTH, make_ops_site


class _Client(protocol.Protocol):
    """A bare HTTP client that can hang up whenever the test wants."""

    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


class OpsSiteTests(unittest.TestCase):
    def serve(self, checks=None, queue_depth=None, check_timeout=2.0, clock=None):
        """Listen on 127.0.0.1 and track the server's connections, to close them all."""
        site = make_ops_site(checks or {}, queue_depth, check_timeout, clock)
        self.server_lost = []
        connections = []
        build = site.buildProtocol

        def build_tracked(addr):
            channel = build(addr)
            lost = defer.Deferred()
            make_connection, connection_lost = channel.makeConnection, channel.connectionLost

            def tracked_make_connection(transport):
                connections.append((transport, lost))
                make_connection(transport)

            def tracked_connection_lost(reason):
                connection_lost(reason)
                lost.callback(None)

            channel.makeConnection = tracked_make_connection
            channel.connectionLost = tracked_connection_lost
            self.server_lost.append(lost)
            return channel

        site.buildProtocol = build_tracked
        port = reactor.listenTCP(0, site, interface="127.0.0.1")

        @defer.inlineCallbacks
        def close():
            yield port.stopListening()
            for transport, lost in connections:
                if not lost.called:
                    transport.abortConnection()
                    yield lost

        self.addCleanup(close)
        self.port = port.getHost().port

    @defer.inlineCallbacks
    def request(self, path, method=b"GET"):
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(method, b"http://127.0.0.1:%d%s" % (self.port, path))
        body = yield readBody(response)
        return response, body

    def header(self, response, name):
        return response.headers.getRawHeaders(name)[0]

    @defer.inlineCallbacks
    def test_healthz(self):
        self.serve()
        response, body = yield self.request(b"/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"ok\n")
        self.assertTrue(self.header(response, b"content-type").startswith(b"text/plain"))

    @defer.inlineCallbacks
    def test_head(self):
        self.serve()
        response, body = yield self.request(b"/healthz", b"HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")

    @defer.inlineCallbacks
    def test_readyz_all_pass(self):
        self.serve({"database": lambda: defer.succeed(None), "storage": lambda: defer.succeed(None)})
        response, body = yield self.request(b"/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"application/json")
        self.assertEqual(
            json.loads(body),
            {"status": "ready", "checks": {"database": "ok", "storage": "ok"}},
        )

    @defer.inlineCallbacks
    def test_readyz_names_the_failing_check(self):
        def storage():
            return defer.fail(ConnectionRefusedError("bucket unreachable\nat minio:9000"))

        self.serve({"database": lambda: defer.succeed(None), "storage": storage})
        response, body = yield self.request(b"/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(body),
            {
                "status": "unavailable",
                "checks": {"database": "ok", "storage": "error: bucket unreachable at minio:9000"},
            },
        )

    @defer.inlineCallbacks
    def test_readyz_check_raising_and_long_reason(self):
        def database():
            raise RuntimeError("x" * 1000)

        self.serve({"database": database})
        response, body = yield self.request(b"/readyz")
        self.assertEqual(response.code, 503)
        reason = json.loads(body)["checks"]["database"]
        self.assertEqual(reason, "error: " + "x" * MAX_REASON_LENGTH)

    @defer.inlineCallbacks
    def test_readyz_hanging_check_times_out(self):
        hanging = []

        def database():
            hanging.append(defer.Deferred())
            return hanging[-1]

        self.serve({"database": database, "storage": lambda: defer.succeed(None)}, check_timeout=0.1)
        response, body = yield self.request(b"/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(body),
            {
                "status": "unavailable",
                "checks": {"database": "error: timed out after 0.1 s", "storage": "ok"},
            },
        )
        self.assertTrue(hanging[0].called)

    @defer.inlineCallbacks
    def test_readyz_checks_run_concurrently(self):
        """
        Both checks start before either answers, and the deadlines follow the
        given clock.
        """
        clock = task.Clock()
        started = []
        both_started = defer.Deferred()

        def check(name):
            def run():
                started.append(name)
                if len(started) == 2:
                    both_started.callback(None)
                return defer.Deferred()

            return run

        self.serve({"database": check("database"), "storage": check("storage")}, clock=clock)
        answer = self.request(b"/readyz")
        yield both_started.addTimeout(5, reactor)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        clock.advance(2.0)
        response, body = yield answer
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(body)["checks"],
            {"database": "error: timed out after 2.0 s", "storage": "error: timed out after 2.0 s"},
        )

    @defer.inlineCallbacks
    def test_metrics(self):
        metrics.MESSAGES_ACCEPTED.inc(0)
        self.serve(queue_depth=lambda: defer.succeed(7))
        response, body = yield self.request(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type").decode(), CONTENT_TYPE_LATEST)
        self.assertIn(b"mailingest_messages_accepted_total", body)
        self.assertIn(b"\nmailingest_queue_depth 7.0\n", body)

    def test_every_metric_is_in_the_readme(self):
        from prometheus_client.metrics import MetricWrapperBase

        readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        names = [m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
        self.assertIn("mailingest_parser_workers_replaced", names)
        for name in names:
            self.assertIn(f"`{name}", text)

    @defer.inlineCallbacks
    def test_metrics_queue_depth_failure_keeps_gauge(self):
        metrics.QUEUE_DEPTH.set(3)
        self.serve(queue_depth=lambda: defer.fail(RuntimeError("database down")))
        response, body = yield self.request(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"\nmailingest_queue_depth 3.0\n", body)

    @defer.inlineCallbacks
    def test_not_found(self):
        self.serve()
        for path in (b"/", b"/nope", b"/healthz/extra", b"/readyz/"):
            response, _ = yield self.request(path)
            self.assertEqual(response.code, 404, path)

    @defer.inlineCallbacks
    def test_method_not_allowed(self):
        self.serve()
        for path, method in [(b"/healthz", b"POST"), (b"/readyz", b"PUT"), (b"/metrics", b"DELETE"),
                             (b"/healthz", b"OPTIONS"), (b"/metrics", b"PATCH")]:
            response, _ = yield self.request(path, method)
            self.assertEqual(response.code, 405, (path, method))
            self.assertEqual(self.header(response, b"allow"), b"GET, HEAD")

    @defer.inlineCallbacks
    def test_requests_logged_at_debug_only(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.serve()
        yield self.request(b"/healthz")
        about_request = [e for e in events if "/healthz" in formatEvent(e)]
        self.assertEqual([e["log_level"] for e in about_request], [LogLevel.debug])

    @defer.inlineCallbacks
    def test_client_gone_before_checks_finish(self):
        """
        The answer computed after the client hung up is dropped: no error is
        logged (trial fails a test that logs one).
        """
        pending = defer.Deferred()
        called = defer.Deferred()

        def database():
            called.callback(None)
            return pending

        self.serve({"database": database})
        client = yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(
            protocol.Factory.forProtocol(_Client)
        )
        client.transport.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        yield called
        client.transport.loseConnection()
        yield defer.gatherResults([client.lost, self.server_lost[0]])
        pending.callback(None)
