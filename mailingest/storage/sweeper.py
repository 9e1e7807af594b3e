"""
The blob sweeper: removes blobs that no row references.

A raw copy is stored before its row is inserted and a document before its
row, so a failure in between (a 451 during a database outage, a kill -9)
leaves a blob nothing refers to. The sweeper lists C{raw/} and C{documents/}
page by page, asks the database which of the blobs older than a margin are
referenced, and deletes the others, with the temporary files of interrupted
local-disk writes. The margin (C{--gc-min-age}, a day by default) must be far
longer than the time between storing a blob and committing its row, which
the store timeout, the extraction lease and the extraction timeout bound.
The documents of a message still to be extracted count as referenced (a
reprocess may be putting them again before it records them).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import threads
from twisted.logger import Logger

from mailingest.ops import metrics
from mailingest.errors import ConfigError
from mailingest.interfaces import BlobInfo, IBlobReferences
from mailingest.storage.journal import IntentJournal
from mailingest.periodic import PeriodicService

PREFIXES = ("raw/", "documents/")
DEFAULT_MIN_AGE = 86400.0

log = Logger(namespace="mailingest.gc")


def check_min_age(min_age: float, floor: float) -> float:
    """Refuse a margin a blob written by a transaction still in progress could be older than (C{floor}: the daemon settings' C{gc_floor})."""
    if min_age < floor:
        raise ConfigError(
            f"gc minimum age {min_age:g} s is too short: a blob can wait for its row up to"
            f" store-timeout + extraction-lease + extraction-timeout = {floor:g} s"
        )
    return min_age


@dataclass
class Sweep:
    """What one sweep found and removed."""

    scanned: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    removed: int = 0
    removed_bytes: int = 0
    temporaries: int = 0
    temporary_bytes: int = 0


async def sweep(
    store: IBlobReferences,
    blobs,
    min_age: float,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
    keep_going: Callable[[], bool] = lambda: True,
    on_orphan: Callable[[BlobInfo], None] = lambda blob: None,
    on_page: Callable[[Sweep], None] = lambda found: None,
) -> Sweep:
    """
    The full sweep: delete (or with C{dry_run} only find) unreferenced
    blobs older than C{min_age} seconds among every blob stored, calling
    C{on_orphan} with each and C{on_page} after each page listed (memory
    stays that of a page); stops early once C{keep_going()} is false.
    """
    before = now() - min_age
    found = Sweep()
    for prefix in PREFIXES:
        async for page in blobs.list_keys(prefix):
            if not keep_going():
                return found
            found.scanned += len(page)
            await _remove_unreferenced(store, blobs, [blob for blob in page if blob.mtime < before], found, dry_run, on_orphan)
            on_page(found)
    found.temporaries, found.temporary_bytes = await blobs.remove_temporaries(before, dry_run)
    if not dry_run:
        metrics.GC_REMOVED.inc(found.temporaries)
        metrics.GC_REMOVED_BYTES.inc(found.temporary_bytes)
    return found


async def _remove_unreferenced(store, blobs, candidates: list[BlobInfo], found: Sweep, dry_run: bool, on_orphan) -> None:
    """Of C{candidates}, delete (or count) those no row references."""
    if not candidates:
        return
    referenced = await store.referenced_keys([blob.key for blob in candidates])
    for blob in candidates:
        if blob.key in referenced:
            continue
        found.orphans += 1
        found.orphan_bytes += blob.size
        on_orphan(blob)
        metrics.GC_ORPHANS.inc()
        if dry_run:
            continue
        await blobs.delete(blob.key)
        found.removed += 1
        found.removed_bytes += blob.size
        metrics.GC_REMOVED.inc()
        metrics.GC_REMOVED_BYTES.inc(blob.size)


async def sweep_journal(
    store: IBlobReferences,
    blobs,
    journal: IntentJournal,
    min_age: float,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
    keep_going: Callable[[], bool] = lambda: True,
    on_orphan: Callable[[BlobInfo], None] = lambda blob: None,
) -> Sweep:
    """
    The routine sweep: only the blobs the journal says were put (see
    L{mailingest.storage.journal}), from its files older than C{min_age};
    its cost is what was stored since the last sweep, whatever the size of
    the store. Sizes are not known without listing: an orphan counts 0 bytes.
    Each file is deleted once swept (kept with C{dry_run}).
    """
    before = now() - min_age
    found = Sweep()
    for path in await threads.deferToThread(journal.due, before):
        pages = await threads.deferToThread(lambda: list(journal.keys(path)))
        for keys in pages:
            if not keep_going():
                return found
            found.scanned += len(keys)
            await _remove_unreferenced(store, blobs, [BlobInfo(key, 0, 0.0) for key in keys], found, dry_run, on_orphan)
        if not dry_run:
            journal.done(path)
    found.temporaries, found.temporary_bytes = await blobs.remove_temporaries(before, dry_run)
    return found


class GcService(PeriodicService):
    """
    Sweeps every C{interval} seconds, the first time one interval after
    start: the blobs C{journal} names (the routine sweep, L{sweep_journal}),
    or without a journal every blob (L{sweep}); a sweep in progress stops
    after its current page.
    """

    name = "gc"

    def __init__(self, store: IBlobReferences, blobs, interval: float, min_age: float, clock=None, journal: IntentJournal | None = None):
        super().__init__(interval, clock)
        self.store = store
        self.blobs = blobs
        self.journal = journal
        self.min_age = min_age

    async def run(self) -> None:
        started = self.clock.seconds()
        try:
            if self.journal is not None:
                found = await sweep_journal(self.store, self.blobs, self.journal, self.min_age, keep_going=lambda: self.running)
            else:
                found = await sweep(self.store, self.blobs, self.min_age, keep_going=lambda: self.running)
        except Exception as e:
            log.error("gc: sweep stopped, next one in {interval:.0f} s: {error}", interval=self.interval, error=str(e))
            return
        log.info(
            "gc: {scanned} blobs scanned, {orphans} orphaned ({orphan_bytes} bytes), {removed} removed"
            " ({removed_bytes} bytes), {temporaries} stale temporary files removed ({temporary_bytes} bytes), {seconds:.1f} s",
            scanned=found.scanned,
            orphans=found.orphans,
            orphan_bytes=found.orphan_bytes,
            removed=found.removed,
            removed_bytes=found.removed_bytes,
            temporaries=found.temporaries,
            temporary_bytes=found.temporary_bytes,
            seconds=self.clock.seconds() - started,
            event="gc",
        )
