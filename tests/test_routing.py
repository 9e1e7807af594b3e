"""
How the three HTTP sites route (issue 24.5): one twisted.web resource tree
each, a resource per route, and the answers at the edges of the routes (ids,
trailing slashes, paths below an endpoint, methods) as the regex routers gave
them. Requests go through the site's own request processing on a
L{DummyChannel}: no socket, no store behind the routes these reach.
"""

import json

from twisted.internet import task
from twisted.trial import unittest
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel

from mailingest.console.rejections import RejectionHistory
from mailingest.console.resource import make_site
from mailingest.handoff import openapi
from mailingest.ops.http import make_ops_site


def request(site: server.Site, method: bytes, path: bytes) -> tuple[server.Request, DummyChannel]:
    channel = DummyChannel()
    channel.site = site
    req = server.Request(channel, False)
    req.gotLength(0)
    req.requestReceived(method, path, b"HTTP/1.1")
    return req, channel


def answer(site: server.Site, method: bytes, path: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """(status, headers, body) of a request answered without a backend."""
    req, channel = request(site, method, path)
    assert req.finished, path
    head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return int(status_line.split()[1]), headers, body


def api_site() -> server.Site:
    clock = task.Clock()
    return make_site(None, None, clock, RejectionHistory(clock, read=lambda: {}), checks={})


def route_of(site: server.Site, path: bytes):
    """The resource the site's traversal finds for C{path}."""
    req = server.Request(DummyChannel(), False)
    req.prepath, req.postpath = [], path.split(b"/")[1:]
    return site.getResourceFor(req)


class TreeTests(unittest.TestCase):
    def test_each_route_is_its_own_resource(self):
        """The trees, not a route table in one leaf: every route resolves to a resource of its own class, none a leaf."""
        site = api_site()
        api_paths = [p.replace("{id}", "7").encode() for p in openapi.DOCUMENT["paths"]]
        self.assertEqual(len(api_paths), 9)
        console_paths = [
            b"/console", b"/console/sign-in", b"/console/sign-out", b"/console/static/console.css", b"/console/orgs",
            b"/console/orgs/7/messages", b"/console/messages/7", b"/console/messages/7/raw", b"/console/messages/7/reprocess",
            b"/console/messages/7/release", b"/console/messages/7/erase", b"/console/documents/7/content", b"/console/events/7/redeliver", b"/console/status",
        ]
        ops = make_ops_site({}, clock=task.Clock())
        for tree, paths in ((site, api_paths), (site, console_paths), (ops, [b"/healthz", b"/readyz", b"/metrics"])):
            routes = [route_of(tree, path) for path in paths]
            self.assertEqual(len({type(route) for route in routes}), len(paths), [type(r).__name__ for r in routes])
            self.assertFalse([path for path, route in zip(paths, routes) if route.isLeaf])
        self.assertEqual(type(route_of(site, b"/v1/messages/7")), type(route_of(site, b"/v1/messages/123456789012345678")))


class ApiEdgeTests(unittest.TestCase):
    def setUp(self):
        self.site = api_site()

    def assertError(self, method: bytes, path: bytes, status: int, code: str) -> dict[bytes, list[bytes]]:
        got, headers, body = answer(self.site, method, path)
        self.assertEqual((got, json.loads(body)["error"]), (status, code), path)
        self.assertEqual(headers[b"content-type"], [b"application/json"], path)
        return headers

    def test_no_route(self):
        for path in (
            b"/", b"/v1", b"/v1/", b"/v1/nothing", b"/v1/messages/", b"/v1/messages/12a", b"/v1/messages/-1",
            b"/v1/messages/1234567890123456789", b"/v1/messages/%C2%B2", b"/v1/messages/1/raw/x", b"/v1/messages/1/nope",
            b"/v1/documents", b"/v1/documents/1/content/x", b"/v1/openapi.json/x", b"/v2/messages", b"/consoles",
        ):
            self.assertError(b"GET", path, 404, "no_route")

    def test_methods_before_routes(self):
        for method, path in ((b"POST", b"/v1/messages"), (b"DELETE", b"/v1/messages/1/raw"), (b"PUT", b"/v1/nothing"), (b"OPTIONS", b"/")):
            headers = self.assertError(method, path, 405, "method_not_allowed")
            self.assertEqual(headers[b"allow"], [b"GET, HEAD"])
        # a message alone takes DELETE too (the admin's erasure), after its token
        headers = self.assertError(b"POST", b"/v1/messages/1", 405, "method_not_allowed")
        self.assertEqual(headers[b"allow"], [b"GET, HEAD, DELETE"])
        self.assertError(b"DELETE", b"/v1/messages/1", 401, "unauthorized")

    def test_tokens_before_rows(self):
        for path in (b"/v1/messages", b"/v1/messages/1", b"/v1/messages/1/raw", b"/v1/documents/1", b"/v1/documents/1/content"):
            headers = self.assertError(b"GET", path, 401, "unauthorized")
            self.assertEqual(headers[b"www-authenticate"], [b'Bearer realm="mailingest"'])

    def test_openapi_needs_no_token_and_answers_head(self):
        status, headers, body = answer(self.site, b"GET", b"/v1/openapi.json")
        self.assertEqual((status, json.loads(body)), (200, openapi.DOCUMENT))
        status, head_headers, head_body = answer(self.site, b"HEAD", b"/v1/openapi.json")
        self.assertEqual((status, head_body, head_headers[b"content-length"]), (200, b"", headers[b"content-length"]))


class ConsoleEdgeTests(unittest.TestCase):
    def setUp(self):
        self.site = api_site()

    def answer(self, method: bytes, path: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        status, headers, body = answer(self.site, method, path)
        self.assertIn(b"script-src 'self'", headers[b"content-security-policy"][0], path)
        self.assertEqual(headers[b"x-frame-options"], [b"DENY"], path)
        return status, headers, body

    def test_redirects(self):
        for path, to in (
            (b"/console", b"/console/orgs"), (b"/console/", b"/console/orgs"), (b"/console/orgs", b"/console/sign-in"),
            (b"/console/orgs/1/messages", b"/console/sign-in"), (b"/console/messages/1/reprocess", b"/console/sign-in"),
            (b"/console/status", b"/console/sign-in"),
        ):
            status, headers, _ = self.answer(b"GET", path)
            self.assertEqual((status, headers[b"location"]), (303, [to]), path)

    def test_not_found(self):
        for path in (
            b"/console/nothing", b"/console/orgs/", b"/console/orgs/1", b"/console/orgs/x/messages", b"/console/messages",
            b"/console/messages/1/", b"/console/messages/1234567890123456789", b"/console/documents/1", b"/console/events/1",
            b"/console/static", b"/console/static/other.css", b"/console/status/x",
        ):
            status, headers, body = self.answer(b"GET", path)
            self.assertEqual(status, 404, path)
            self.assertEqual(headers[b"content-type"], [b"text/html; charset=utf-8"], path)
            self.assertTrue(body.startswith(b"<!DOCTYPE html>"), path)

    def test_method_not_allowed_says_which(self):
        for method, path, allowed in (
            (b"POST", b"/console/orgs", b"GET"), (b"PUT", b"/console/sign-in", b"GET, POST"), (b"GET", b"/console/sign-out", b"POST"),
            (b"GET", b"/console/events/1/redeliver", b"POST"), (b"DELETE", b"/console/messages/1/release", b"GET, POST"),
            (b"POST", b"/console", b"GET"),
        ):
            status, headers, _ = self.answer(method, path)
            self.assertEqual((status, headers[b"allow"]), (405, [allowed]), path)

    def test_pages_without_a_session(self):
        status, headers, body = self.answer(b"GET", b"/console/static/console.css")
        self.assertEqual((status, headers[b"content-type"]), (200, [b"text/css; charset=utf-8"]))
        self.assertIn(b"{", body)
        status, headers, body = self.answer(b"HEAD", b"/console/sign-in")
        self.assertEqual((status, body), (200, b""))
        self.assertIn(b"mailingest_console_sign_in=", headers[b"set-cookie"][0])
