"""Group commit: requests arriving during a commit share the next one."""

from twisted.internet import defer
from twisted.trial import unittest

from mailingest.storage.group_commit import GroupCommit


class GroupCommitTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.commits = []

    def commit(self, batch):
        d = defer.Deferred()
        self.commits.append((batch, d))
        return d

    def test_alone_commits_at_once(self):
        group = GroupCommit(self.commit)
        d = group.submit("a")
        self.assertEqual([b for b, _ in self.commits], [["a"]])
        self.commits[0][1].callback(["id-a"])
        self.assertEqual(self.successResultOf(d), "id-a")

    def test_requests_during_a_commit_share_the_next(self):
        group = GroupCommit(self.commit)
        first = group.submit("a")
        later = [group.submit(x) for x in "bcd"]
        self.assertEqual(len(self.commits), 1)
        self.commits[0][1].callback(["id-a"])
        self.assertEqual(self.successResultOf(first), "id-a")
        self.assertEqual([b for b, _ in self.commits], [["a"], ["b", "c", "d"]])
        self.commits[1][1].callback(["id-b", "id-c", "id-d"])
        self.assertEqual([self.successResultOf(d) for d in later], ["id-b", "id-c", "id-d"])

    def test_a_failed_commit_fails_its_requests_only(self):
        group = GroupCommit(self.commit)
        first = group.submit("a")
        second = group.submit("b")
        self.commits[0][1].errback(RuntimeError("disk full"))
        self.failureResultOf(first, RuntimeError)
        self.commits[1][1].callback(["id-b"])
        self.assertEqual(self.successResultOf(second), "id-b")
