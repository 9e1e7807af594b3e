"""
Wrong API tokens and console sign-ins: the per-address budgets and the log's
budget on a task.Clock, then the API and the console on a real daemon.
"""

import os

from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from mailingest.errors import ConfigError
from mailingest.handoff.api import read_admin_token
from mailingest.handoff.throttle import (
    FAILURE_LIMIT,
    LOG_LINES_PER_MINUTE,
    SIGN_IN_LIMIT,
    WINDOW,
    AddressWindow,
    AuthThrottle,
    TooManyFailures,
)
from mailingest.ops import metrics
from tests.daemon import temp_dir
from tests.test_console import ConsoleCase


def failures(site: str, reason: str) -> float:
    return metrics.AUTH_FAILURES.labels(site, reason)._value.get()


def auth_lines(events) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "mailingest.auth"]


class AddressWindowTests(unittest.TestCase):
    def test_limit_then_the_window_moves_on(self):
        clock = task.Clock()
        window = AddressWindow(clock, limit=3, window=60)
        for _ in range(2):
            window.add("192.0.2.1")
            clock.advance(10)
        self.assertIsNone(window.wait("192.0.2.1"))
        window.add("192.0.2.1")
        self.assertEqual(window.wait("192.0.2.1"), 40)  # the oldest, at 0 s, leaves the window at 60 s
        self.assertIsNone(window.wait("192.0.2.2"))
        clock.advance(40)
        self.assertIsNone(window.wait("192.0.2.1"))
        clock.advance(60)
        self.assertIsNone(window.wait("192.0.2.1"))
        self.assertEqual(len(window), 0)  # nothing kept of an address with nothing in the window

    def test_remembers_a_bounded_number_of_addresses(self):
        clock = task.Clock()
        window = AddressWindow(clock, limit=1, max_addresses=100)
        for n in range(1000):
            window.add(f"2001:db8:{n:x}::/64")
        self.assertEqual(len(window), 100)
        self.assertEqual(window.wait("2001:db8:3e7::/64"), WINDOW)
        self.assertIsNone(window.wait("2001:db8:0::/64"))


class AuthThrottleTests(unittest.TestCase):
    def test_2000_wrong_tokens_from_one_address(self):
        """Issue 22.6: 20 answered 401 and counted, the rest 429 without a look at the token; two log lines."""
        clock = task.Clock()
        throttle = AuthThrottle(clock)
        wrong, throttled = failures("api", "unknown_token"), failures("api", "throttled")
        answers = []
        with capturedLogs() as events:
            for _ in range(2000):
                try:
                    throttle.check("198.51.100.7", "api")
                except TooManyFailures as e:
                    answers.append((429, e.code, e.retry_after))
                else:
                    throttle.failed("198.51.100.7", "api")
                    answers.append((401,))
                clock.advance(0.001)
        self.assertEqual(answers[:FAILURE_LIMIT], [(401,)] * FAILURE_LIMIT)
        self.assertEqual({a[:2] for a in answers[FAILURE_LIMIT:]}, {(429, "too_many_failures")})
        self.assertEqual(len(answers), 2000)
        self.assertEqual(answers[-1][2], 599)  # until the first failure leaves the 10 minutes
        self.assertEqual(failures("api", "unknown_token") - wrong, FAILURE_LIMIT)
        self.assertEqual(failures("api", "throttled") - throttled, 2000 - FAILURE_LIMIT)
        self.assertEqual(
            auth_lines(events),
            [
                "api: wrong token from 198.51.100.7, 1 in 10 min from this address",
                f"api: wrong token from 198.51.100.7, {FAILURE_LIMIT} in 10 min from this address; it gets 429 for 600 s",
            ],
        )
        self.assertIsNone(throttle.check("198.51.100.8", "api"))  # another address is not held back

    def test_log_lines_held_back_are_counted_into_the_next(self):
        clock = task.Clock()
        throttle = AuthThrottle(clock)
        with capturedLogs() as events:
            for n in range(50):
                throttle.failed(f"203.0.113.{n}", "console")
            clock.advance(60)
            throttle.failed("203.0.113.200", "console")
        lines = auth_lines(events)
        self.assertEqual(len(lines), LOG_LINES_PER_MINUTE + 1)
        self.assertEqual(lines[-1], "console: wrong token from 203.0.113.200, 1 in 10 min from this address (40 more such lines not logged)")

    def test_the_line_at_the_limit_says_so(self):
        clock = task.Clock()
        throttle = AuthThrottle(clock)
        with capturedLogs() as events:
            for _ in range(FAILURE_LIMIT):
                throttle.failed("198.51.100.7", "api")
                clock.advance(7)
        self.assertEqual(auth_lines(events)[-1], f"api: wrong token from 198.51.100.7, {FAILURE_LIMIT} in 10 min from this address; it gets 429 for {int(WINDOW - 7 * (FAILURE_LIMIT - 1))} s")

    def test_sign_ins_of_any_outcome_are_bounded(self):
        clock = task.Clock()
        throttle = AuthThrottle(clock)
        for _ in range(SIGN_IN_LIMIT):
            throttle.sign_in("192.0.2.1")
        with self.assertRaises(TooManyFailures) as e:
            throttle.sign_in("192.0.2.1")
        self.assertEqual(e.exception.code, "too_many_sign_ins")
        throttle.sign_in("192.0.2.2")
        clock.advance(WINDOW)
        throttle.sign_in("192.0.2.1")


class AdminTokenTests(unittest.TestCase):
    def token_file(self, token: str) -> str:
        path = os.path.join(temp_dir(self), "admin-token")
        with open(path, "w") as f:
            f.write(token + "\n")
        return path

    def test_at_least_128_bits_in_form(self):
        for token in ("4UhvAqpI7KRvkR14JVzNVg", "0c1181d04c3304e2d2f3163c43ecee37", "+FxwiAoA7ZqrZ1PyPkXuug==", "mit_b-MLAbqBBBO-wujB7BagxjemlACM"):
            self.assertEqual(read_admin_token(self.token_file(token)), token)
        for token in (
            "secret",
            "kq_Bxt-MYISi2c7sHFgV",  # 20 base64 characters: 120 bits
            "ab1eb09f1007f79cc09a9e6934ab35",  # 30 hex digits
            "admin-" + "x" * 40,
            "correct horse battery staple",
        ):
            path = self.token_file(token)
            with self.assertRaises(ConfigError, msg=token) as e:
                read_admin_token(path)
            message = str(e.exception)
            self.assertIn("at least 22 base64 characters (A-Z a-z 0-9 + / - _) or 32 hex digits", message)
            self.assertIn(f"mailingest admin-token --write {path}", message)
            self.assertNotIn(token, message)


class OverHttp(ConsoleCase):
    @defer.inlineCallbacks
    def test_wrong_bearer_tokens_then_429_for_the_address(self):
        codes = []
        for n in range(FAILURE_LIMIT + 5):
            code, headers, body = yield self.get("/v1/messages", f"mit_guess{n}")
            codes.append(code)
        self.assertEqual(codes, [401] * FAILURE_LIMIT + [429] * 5)
        self.assertIn(b'"error": "too_many_failures"', body)
        self.assertLessEqual(int(headers.getRawHeaders("retry-after")[0]), WINDOW)
        code, _, _ = yield self.get("/v1/messages", "acme")  # even the right token, from this address
        self.assertEqual(code, 429)
        response, body = yield self.post_sign_in(self.tokens["acme"])
        self.assertEqual(response.code, 429)
        self.assertIn("Too many wrong tokens from your address", body)
        code, _, _ = yield self.get("/v1/openapi.json", None)
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_sign_ins_per_address_and_the_admins_session_survives(self):
        """Issue 22.5: an organisation's token signing in again and again gets 429 and signs nobody else out."""
        admin = yield self.sign_in("admin")
        codes = []
        for _ in range(SIGN_IN_LIMIT):
            response, _ = yield self.post_sign_in(self.tokens["acme"])
            codes.append(response.code)
        self.assertEqual(codes, [303] * (SIGN_IN_LIMIT - 1) + [429])
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        response, body = yield self.request("GET", "/console/orgs", admin)
        self.assertEqual(response.code, 200)
        self.assertIn(">acme<", body)
        self.assertIn(">beta<", body)

    @defer.inlineCallbacks
    def test_wrong_sign_ins_are_counted_and_logged(self):
        before = failures("console", "unknown_token")
        with capturedLogs() as events:
            response, _ = yield self.post_sign_in("mit_nope")
        self.assertEqual(response.code, 401)
        self.assertEqual(failures("console", "unknown_token") - before, 1)
        [line] = auth_lines(events)
        self.assertEqual(line, "console: wrong token from 127.0.0.1, 1 in 10 min from this address")
        response, _ = yield self.request("GET", "/console/orgs", "forged")
        self.assertEqual(response.code, 303)
        self.assertEqual(failures("console", "unknown_token") - before, 1)  # a session id is not a token
