"""
The intent journal (issue 28): every blob key is written down before the
blob is put, so the routine sweep looks at the keys written since, not at
the millions of blobs already stored.

A blob is left without a row only between its put and its row's commit
(a 451, a kill -9): such a blob's key is in the journal. The journal is a
directory of plain files, one per hour and process (C{2026120614-1234.keys}),
each key on a line, appended with one C{write} (no fsync: a key is lost only
with the machine, and after that the full sweep, C{mailingest gc --full},
is the tool). A file is swept once its hour ended more than the sweeper's
margin ago: by then every put it announced has long finished, and the
blobs it names are as old as the margin asks. Then it is deleted.
"""

import calendar
import os
import time
from collections.abc import Callable, Iterator

from twisted.internet import defer
from zope.interface import implementer

from mailingest.interfaces import IBlobStore

JOURNAL_DIR = "gc-journal"
_SUFFIX = ".keys"
_HOUR = 3600


class IntentJournal:
    """The keys about to be put, in hourly files of C{directory}."""

    def __init__(self, directory: str, now: Callable[[], float] = time.time):
        self.directory = directory
        self._now = now
        os.makedirs(directory, exist_ok=True)

    def __repr__(self) -> str:
        return f"<IntentJournal {self.directory}>"

    def record(self, key: str) -> None:
        """Write C{key} down (a few microseconds: one append to a file of this hour)."""
        hour = time.strftime("%Y%m%d%H", time.gmtime(self._now()))
        path = os.path.join(self.directory, f"{hour}-{os.getpid()}{_SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, key.encode("ascii") + b"\n")
        finally:
            os.close(fd)

    def due(self, before: float) -> list[str]:
        """The files whose hour ended before C{before}, oldest first."""
        found = []
        for name in os.listdir(self.directory):
            if not name.endswith(_SUFFIX):
                continue
            try:
                start = calendar.timegm(time.strptime(name.split("-", 1)[0], "%Y%m%d%H"))
            except ValueError:
                continue
            if start + _HOUR <= before:
                found.append(os.path.join(self.directory, name))
        return sorted(found)

    @staticmethod
    def keys(path: str) -> Iterator[list[str]]:
        """The keys of one file, in pages of at most 500, each key once per page."""
        page: dict[str, None] = {}
        with open(path, "rb") as lines:
            for line in lines:
                key = line.strip().decode("ascii", "replace")
                if key:
                    page[key] = None
                if len(page) >= 500:
                    yield list(page)
                    page = {}
        if page:
            yield list(page)

    @staticmethod
    def done(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@implementer(IBlobStore)
class JournaledBlobs:
    """A blob store whose puts are written down in an L{IntentJournal} first; everything else as the store does it."""

    def __init__(self, blobs: IBlobStore, journal: IntentJournal):
        self.blobs = blobs
        self.journal = journal

    def __repr__(self) -> str:
        return f"<JournaledBlobs {self.blobs!r}>"

    def __getattr__(self, name: str):
        return getattr(self.blobs, name)

    def _record(self, key: str) -> defer.Deferred | None:
        try:
            self.journal.record(key)
        except (OSError, UnicodeEncodeError) as e:
            from mailingest.errors import StorageError

            return defer.fail(StorageError(f"gc journal {self.journal.directory}: {getattr(e, 'strerror', None) or e}"))
        return None

    def put_file(self, key, path, sha256, size):
        return self._record(key) or self.blobs.put_file(key, path, sha256, size)

    def put_bytes(self, key, data, sha256):
        return self._record(key) or self.blobs.put_bytes(key, data, sha256)


def journaled(blobs: IBlobStore, scratch: str) -> JournaledBlobs:
    """C{blobs}, with its puts written down in the journal under C{scratch} (the daemon's, where the sweeper reads it)."""
    return JournaledBlobs(blobs, IntentJournal(os.path.join(scratch, JOURNAL_DIR)))
