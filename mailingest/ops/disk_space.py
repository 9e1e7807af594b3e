"""
Readiness of the local disk: free space and writability of the directories
the daemon writes to (the local blob store, the SQLite database's directory,
the spool). A full disk makes every message 451, so /readyz must say so.
"""

import os
import tempfile
from collections.abc import Callable, Iterable

from twisted.internet import defer, threads
from twisted.python.failure import Failure

MIB = 1 << 20


class DiskProblem(Exception):
    """A data directory is short of space or cannot be written."""


def _amount(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size} bytes"


class DiskCheck:
    """
    A readiness check: each directory must have C{min_free} bytes available
    to the daemon's user and take a new file. It runs in a thread (statvfs on
    a hung NFS mount blocks); while one check is still running, later calls
    wait for it instead of taking another thread, so a hung disk cannot use up
    the reactor's thread pool (which also resolves host names).
    """

    def __init__(
        self,
        directories: Iterable[str],
        min_free: int,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        in_thread: Callable[..., defer.Deferred] = threads.deferToThread,
    ):
        self.directories = list(dict.fromkeys(os.path.abspath(d) for d in directories))
        self.min_free = min_free
        self._statvfs = statvfs
        self._in_thread = in_thread
        self._waiting: list[defer.Deferred] = []

    def __call__(self) -> defer.Deferred:
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._in_thread(self.check_now).addBoth(self._answer)
        return waiter

    def _answer(self, result) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def check_now(self) -> None:
        """Raise L{DiskProblem} naming every directory that is short of space or not writable."""
        problems = [problem for problem in map(self._problem, self.directories) if problem]
        if problems:
            raise DiskProblem("; ".join(problems))

    def _problem(self, directory: str) -> str | None:
        try:
            stats = self._statvfs(directory)
            free = stats.f_bavail * stats.f_frsize
            if free < self.min_free:
                return f"{_amount(free)} free in {directory}, below {_amount(self.min_free)}"
            fd, probe = tempfile.mkstemp(prefix=".readyz-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"{directory} not writable: {e.strerror or e}"
        return None
