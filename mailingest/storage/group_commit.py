"""
Group commit: one durable write for many requests.

Requests that arrive while a commit is in flight wait and are committed
together in the next one: under load many messages share one transaction or
one file-system flush; a request alone is committed at once, with no added
delay.
"""

from twisted.internet import defer
from twisted.python.failure import Failure


class GroupCommit:
    """
    C{commit(requests)} returns a Deferred firing with one result per request.
    A failed commit fails every request in it.
    """

    def __init__(self, commit):
        self._commit = commit
        self._pending: list[tuple[object, defer.Deferred]] = []
        self._busy = False

    def submit(self, request) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append((request, d))
        if not self._busy:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        committed = defer.maybeDeferred(self._commit, [request for request, _ in batch])

        def answer(results):
            self._busy = False
            if isinstance(results, Failure):
                for _, d in batch:
                    d.errback(results)
            else:
                for (_, d), result in zip(batch, results):
                    d.callback(result)
            if self._pending and not self._busy:
                self._flush()

        committed.addBoth(answer)
