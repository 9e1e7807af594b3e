"""/readyz and the local disk: free space and writability of the data directories."""

import json
import os
import shutil
import subprocess

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from mailingest.ops.disk_space import MIB, DiskCheck, DiskProblem
from tests.daemon import RunningDaemon, temp_dir


def fake_statvfs(free: dict[str, int]):
    def statvfs(path):
        return os.statvfs_result((4096, 4096, 10**6, 0, free[path] // 4096, 10**6, 10**5, 10**5, 0, 255))

    return statvfs


def synchronously(f, *args):
    return defer.maybeDeferred(f, *args)


class DiskCheckTests(unittest.TestCase):
    def setUp(self):
        self.spool = temp_dir(self)
        self.blobs = temp_dir(self)

    def test_enough_space(self):
        check = DiskCheck([self.spool, self.blobs], 100 * MIB, fake_statvfs({self.spool: 200 * MIB, self.blobs: 100 * MIB}), synchronously)
        self.assertIsNone(self.successResultOf(check()))

    def test_short_of_space(self):
        free = {self.spool: 200 * MIB, self.blobs: 42 * MIB + 5000}
        check = DiskCheck([self.spool, self.blobs, self.spool], 100 * MIB, fake_statvfs(free), synchronously)
        failure = self.failureResultOf(check(), DiskProblem)
        self.assertEqual(failure.getErrorMessage(), f"42 MiB free in {self.blobs}, below 100 MiB")

    def test_directory_gone(self):
        shutil.rmtree(self.blobs)
        failure = self.failureResultOf(DiskCheck([self.spool, self.blobs], 1, in_thread=synchronously)(), DiskProblem)
        self.assertEqual(failure.getErrorMessage(), f"{self.blobs} not writable: No such file or directory")

    def test_read_only_directory(self):
        directory = temp_dir(self)
        if os.geteuid() != 0:
            os.chmod(directory, 0o555)
            self.addCleanup(os.chmod, directory, 0o755)
        elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", directory], capture_output=True).returncode == 0:
            self.addCleanup(subprocess.run, ["umount", directory])
        else:
            raise unittest.SkipTest("running as root without the right to mount a read-only file system")
        failure = self.failureResultOf(DiskCheck([directory], 1, in_thread=synchronously)(), DiskProblem)
        self.assertRegex(failure.getErrorMessage(), f"^{directory} not writable: (Read-only file system|Permission denied)$")
        self.assertEqual(os.listdir(directory), [])

    def test_a_hung_check_takes_one_thread(self):
        started = []

        def in_thread(f):
            started.append(defer.Deferred())
            return started[-1]

        check = DiskCheck([self.spool], 1, in_thread=in_thread)
        first, second = check(), check()
        self.assertEqual(len(started), 1)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        started[0].callback(None)
        self.assertIsNone(self.successResultOf(second))
        third = check()
        self.assertEqual(len(started), 2)
        started[1].errback(DiskProblem("full"))
        self.failureResultOf(third, DiskProblem)


class ReadinessTests(unittest.TestCase):
    """The daemon's /readyz over a real socket, with the real statvfs."""

    @defer.inlineCallbacks
    def readyz(self, **overrides):
        daemon = RunningDaemon(temp_dir(self), http="tcp:0:interface=127.0.0.1", **overrides)
        yield daemon.start()
        self.addCleanup(daemon.stop)
        [ops] = [child for child in daemon.service if getattr(child, "what", "") == "ops HTTP"]
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(b"GET", b"http://127.0.0.1:%d/readyz" % ops.port.getHost().port)
        body = yield readBody(response)
        return response.code, json.loads(body), daemon

    @defer.inlineCallbacks
    def test_ready(self):
        code, body, _ = yield self.readyz()
        self.assertEqual((code, body["checks"]["disk"]), (200, "ok"))

    @defer.inlineCallbacks
    def test_below_the_threshold(self):
        code, body, daemon = yield self.readyz(min_free_space=str(1 << 60))
        self.assertEqual((code, body["status"]), (503, "unavailable"))
        self.assertRegex(body["checks"]["disk"], r"^error: \d+ MiB free in /\S+, below 1099511627776 MiB")
        self.assertEqual((body["checks"]["database"], body["checks"]["storage"]), ("ok", "ok"))
