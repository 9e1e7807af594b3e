"""
Retention as the daemon runs it: every C{--retention-interval} a pass
finishes the blob deletes a previous pass (or an erasure) left queued, then
incinerates due messages and deletes due documents in small batches, each
batch one bounded transaction (L{mailingest.storage.stores.retention})
followed by the deletes of its blobs. Several daemons share the work: on
PostgreSQL a batch skips the rows another daemon is marking. One log event
per batch.
"""

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from mailingest.interfaces import IRetentionStore
from mailingest.ops import metrics
from mailingest.periodic import PeriodicService
from mailingest.timestamps import iso

BATCH = 100
# Blob deletes of one batch in flight at once.
DELETES_AT_ONCE = 8
DEFAULT_INTERVAL = 3600.0

log = Logger(namespace="mailingest.retention")


def delete_all(blobs, keys: list[str]) -> defer.Deferred:
    """Delete C{keys}, L{DELETES_AT_ONCE} at a time (an object store answers each delete in a round trip)."""
    limit = defer.DeferredSemaphore(DELETES_AT_ONCE)
    return defer.gatherResults([limit.run(blobs.delete, key) for key in keys], consumeErrors=True)


async def purge(store: IRetentionStore, blobs, limit: int = BATCH, keep_going: Callable[[], bool] = lambda: True) -> int:
    """
    Delete the queued blobs, C{limit} keys at a time, each batch's keys taken
    off the queue once its blobs are gone (deleting a missing blob succeeds,
    so a batch cut short is simply done again); fires with how many.
    """
    done = 0
    while keep_going():
        keys = await store.pending_purges(limit)
        if not keys:
            break
        await delete_all(blobs, keys)
        await store.purged(keys)
        done += len(keys)
        if len(keys) < limit:
            break
    return done


async def delete_now(store: IRetentionStore, blobs, gone: list[dict]) -> None:
    """
    Delete the blobs an erasure just queued (only those: a backlog of the
    daemon's is its own), then take them off the queue; what a failing
    store could not delete stays queued for the daemon's next pass.
    """
    count_incinerated(gone)
    keys = [key for row in gone for key in row["keys"]]
    try:
        await delete_all(blobs, keys)
        await store.purged(keys)
    except Exception as e:
        log.warn("erasure: {count} blobs left for the next retention pass: {error}", count=len(keys), error=str(e))


async def erase_message(store: IRetentionStore, blobs, message_id: int, actor: str) -> dict:
    """Erase one message and delete its blobs now (the console's, the API's and the admin command's erasure); the erased row."""
    row = await store.erase_message(message_id, actor)
    await delete_now(store, blobs, [dict(row, reason="erasure")])
    return row


def count_incinerated(gone: list[dict]) -> None:
    """The metrics of incinerated messages (and erased ones), by reason."""
    for row in gone:
        metrics.INCINERATED.labels(row["reason"]).inc()
        metrics.INCINERATED_BYTES.labels(row["reason"]).inc(row["bytes"])


@dataclass
class Pass:
    """What one pass did."""

    messages: int = 0
    documents: int = 0
    bytes: int = 0
    blobs: int = 0
    batches: int = 0


async def run_pass(store: IRetentionStore, blobs, batch: int = BATCH, keep_going: Callable[[], bool] = lambda: True) -> Pass:
    """One pass: leftover deletes first, then batches of due messages and of due documents until none is left."""
    done = Pass()
    done.blobs += await purge(store, blobs, batch, keep_going)
    if done.blobs:
        log.info(
            "retention: {blobs} blobs deleted that an earlier pass or erasure left queued", blobs=done.blobs, event="retention_purge"
        )
    for what in ("messages", "documents"):
        while keep_going():
            if what == "messages":
                gone = await store.incinerate_due(batch)
                count, size = len(gone), sum(row["bytes"] for row in gone)
                count_incinerated(gone)
            else:
                count, size = await store.delete_due_documents(batch)
                metrics.RETENTION_DOCUMENTS.inc(count)
                metrics.INCINERATED_BYTES.labels("retention").inc(size)
            if not count:
                break
            removed = await purge(store, blobs, batch, keep_going)
            done.batches += 1
            setattr(done, what, getattr(done, what) + count)
            done.bytes += size
            done.blobs += removed
            log.info(
                "retention: {count} {what} past their period deleted ({bytes} bytes, {blobs} blobs)",
                count=count, what=what, bytes=size, blobs=removed, event="retention_batch",
            )
    return done


class RetentionService(PeriodicService):
    """A pass every C{interval} seconds, the first one at start (it finishes what a killed daemon left); a pass stops after its current batch."""

    name = "retention"
    at_start = True

    def __init__(self, store: IRetentionStore, blobs, interval: float, batch: int = BATCH, clock=None):
        super().__init__(interval, clock)
        self.store = store
        self.blobs = blobs
        self.batch = batch

    async def run(self) -> None:
        try:
            await run_pass(self.store, self.blobs, self.batch, keep_going=lambda: self.running)
        except Exception as e:
            log.error("retention: pass stopped, next one in {interval:.0f} s: {error}", interval=self.interval, error=str(e))


def gone(row: dict) -> str | None:
    """Why a message's raw copy (a message row) or a document's bytes (a document row) are gone; None when they are kept."""
    if row.get("status") == "incinerated":
        return f"message {row['id']} was incinerated ({row['incinerated_reason']}) at {iso(row['incinerated_at'])}: its raw copy is gone"
    if row.get("deleted_at") is not None:
        return f"document {row['id']} was deleted ({row['deleted_reason']}) at {iso(row['deleted_at'])}: its content is gone"
    return None
