"""
The one retry helper, on a Clock: the waits it makes, when it stops, and
cancelling it; then each loop that uses it, on a Clock too.
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailingest.app.service import AfterMigration
from mailingest.retry import Backoff, retry
from mailingest.storage.engines import postgresql


class BackoffTests(SynchronousTestCase):
    def test_doubling_up_to_the_maximum(self):
        delays = Backoff(0.5, maximum=10.0).delays()
        self.assertEqual([next(delays) for _ in range(7)], [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0])

    def test_constant(self):
        self.assertEqual([Backoff(5.0, factor=1).delay(n) for n in (1, 2, 50)], [5.0, 5.0, 5.0])


class Flaky:
    """Fails C{failures} times, then answers; remembers when it was called."""

    def __init__(self, clock, failures: int):
        self.clock = clock
        self.failures = failures
        self.calls: list[float] = []

    def __call__(self):
        self.calls.append(self.clock.seconds())
        if len(self.calls) <= self.failures:
            return defer.fail(OSError(f"failure {len(self.calls)}"))
        return defer.succeed("done")


class RetryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.asked = []

    def should_retry(self, limit):
        def decide(error, number, delay):
            self.asked.append((str(error), number, delay))
            return number <= limit

        return decide

    def start(self, call, policy, limit=100):
        return defer.Deferred.fromCoroutine(retry(call, policy, self.should_retry(limit), self.clock))

    def test_waits_the_policy_between_calls(self):
        flaky = Flaky(self.clock, 3)
        d = self.start(flaky, Backoff(1.0, maximum=3.0))
        self.assertNoResult(d)
        self.clock.pump([0.5] * 20)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(flaky.calls, [0.0, 1.0, 3.0, 6.0])
        self.assertEqual(
            self.asked, [("failure 1", 1, 1.0), ("failure 2", 2, 2.0), ("failure 3", 3, 3.0)]
        )

    def test_no_wait_before_the_first_call_nor_after_a_success(self):
        flaky = Flaky(self.clock, 0)
        self.assertEqual(self.successResultOf(self.start(flaky, Backoff(1.0))), "done")
        self.assertEqual((flaky.calls, self.asked, self.clock.getDelayedCalls()), ([0.0], [], []))

    def test_declined_raises_the_last_error(self):
        flaky = Flaky(self.clock, 10)
        d = self.start(flaky, Backoff(1.0), limit=2)
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertEqual(str(self.failureResultOf(d, OSError).value), "failure 3")
        self.assertEqual(len(flaky.calls), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_synchronous_exceptions_count_as_failures(self):
        calls = []

        def call():
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("at once")
            return 7

        d = self.start(call, Backoff(2.0))
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(self.asked, [("at once", 1, 2.0)])

    def test_cancel_while_waiting(self):
        flaky = Flaky(self.clock, 10)
        d = self.start(flaky, Backoff(1.0))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(flaky.calls), 1)

    def test_cancel_during_a_call_is_not_retried(self):
        pending = defer.Deferred()
        d = self.start(lambda: pending, Backoff(1.0))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((self.asked, self.clock.getDelayedCalls()), ([], []))


class RefusingStore:
    """A database that refuses C{refusals} times to migrate."""

    def __init__(self, refusals: int):
        self.refusals = refusals
        self.calls = 0

    def migrate(self):
        self.calls += 1
        if self.calls <= self.refusals:
            return defer.fail(OSError("connection refused"))
        return defer.succeed([1, 2])

    def build_indexes(self, progress=None, keep_going=None):
        return defer.succeed(None)


class FixedStore:
    """A database whose migration is the given Deferred."""

    def __init__(self, migrated: defer.Deferred):
        self.migrated = migrated

    def migrate(self):
        return self.migrated

    def build_indexes(self, progress=None, keep_going=None):
        return defer.succeed(None)


class DaemonMigrateRetryTests(SynchronousTestCase):
    def test_waits_for_the_database_every_five_seconds(self):
        clock = task.Clock()
        store = RefusingStore(refusals=3)
        daemon = AfterMigration(clock, store)
        daemon.startService()
        self.assertEqual(store.calls, 1)
        self.assertNoResult(daemon.ready)
        clock.advance(4.9)
        self.assertEqual(store.calls, 1)
        clock.advance(0.1)
        self.assertEqual(store.calls, 2)
        clock.pump([5.0, 5.0])
        self.assertEqual(store.calls, 4)
        self.successResultOf(daemon.ready)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.flushLoggedErrors()

    def test_stopped_as_it_becomes_ready_stops_what_it_started(self):
        """A stop in the same turn as C{ready} (a caller waiting for it) stops the children that had just started."""
        migrated = defer.Deferred()
        daemon = AfterMigration(task.Clock(), FixedStore(migrated))
        child = service.Service()
        child.setServiceParent(daemon)
        stopped = []
        daemon.ready.addCallback(lambda _: stopped.append((child.running, daemon.stopService())))
        daemon.startService()
        migrated.callback([1])
        [(was_running, d)] = stopped
        self.successResultOf(d)
        self.assertEqual((was_running, child.running, daemon.running), (1, 0, 0))


class FakeConnection:
    """What the reconnector reopens: each connect fails C{failures} times, then succeeds."""

    def __init__(self, clock, failures: int):
        self.clock = clock
        self.failures = failures
        self.connects: list[float] = []

    def close(self):
        pass

    def pollable(self):
        return None

    def connect(self, *args, **kwargs):
        self.connects.append(self.clock.seconds())
        if len(self.connects) <= self.failures:
            return defer.fail(OSError("connection refused"))
        return defer.succeed(None)


class ReconnectorTests(SynchronousTestCase):
    def reconnector(self, failures: int):
        clock = task.Clock()
        target = postgresql._target("postgresql://u:pw@127.0.0.1:1/x")
        detector = postgresql._Reconnector(clock, target)
        connection = FakeConnection(clock, failures)
        detector.setReconnectable(connection)
        detector.lost(Failure(OSError("gone")))
        return clock, detector, connection

    def test_at_once_then_half_a_second_doubling_to_ten(self):
        clock, detector, connection = self.reconnector(failures=7)
        self.assertEqual(connection.connects, [])
        clock.pump([0.0] + [0.25] * 200)
        self.assertEqual(connection.connects, [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 25.5, 35.5])
        self.assertFalse(detector.connectionIsDead)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels_the_wait(self):
        clock, detector, connection = self.reconnector(failures=100)
        clock.pump([0.0, 0.5, 1.0])
        self.assertEqual(len(connection.connects), 3)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        detector.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(detector.connectionIsDead)
