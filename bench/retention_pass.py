"""
One retention pass over many messages past their period: how long it takes
and how long its longest batch holds its transaction.

    python -m bench.retention_pass [--messages 10000] [--postgres DSN] [--s3]

Fills a fresh SQLite database and local blob directory (or a PostgreSQL
scratch database given its DSN; with C{--s3}, a bucket of a moto server
started for the run) with C{--messages} parsed messages of one organisation,
each with its raw copy and one document, sets the organisation's raw
period so every one is due, and times the pass (the daemon's own
L{mailingest.storage.retention.run_pass}) and each marking transaction.
"""

import argparse
import hashlib
import sys
import tempfile
import time

from twisted.internet import defer, task

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.blobs import open_blobs
from mailingest.storage.retention import run_pass
from mailingest.storage.store import open_store
from tests.store_contract import message

FILL = 500


async def fill(store, blobs, count: int) -> None:
    org = await store.add_org("acme", "Acme")
    for first in range(0, count, FILL):
        rows = [message(org["id"], f"<b{n}@x>", raw_key=f"raw/2024/05/01/b{n}.eml") for n in range(first, min(count, first + FILL))]
        ids = await store.insert_messages(rows)
        puts = []
        for row, message_id in zip(rows, ids):
            key = f"documents/{org['id']}/{message_id}/0"
            document = {
                "org_id": org["id"], "ordinal": 0, "filename": "po.pdf", "content_type": "application/pdf",
                "size": 3, "sha256": hashlib.sha256(b"pdf").hexdigest(), "storage_key": key,
            }
            puts.append(store.mark_parsed(message_id, [document]))
            for blob in (row["raw_key"], key):
                puts.append(blobs.put_bytes(blob, b"pdf", hashlib.sha256(b"pdf").hexdigest()))
        await defer.gatherResults(puts, consumeErrors=True)


class TimedStore:
    """The store, with the time of each marking transaction recorded."""

    def __init__(self, store):
        self._store = store
        self.marks: list[float] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def incinerate_due(self, limit):
        started = time.perf_counter()
        gone = await self._store.incinerate_due(limit)
        self.marks.append(time.perf_counter() - started)
        return gone


async def main(reactor, args) -> None:
    directory = tempfile.mkdtemp(prefix="mailingest-bench-")
    database = args.postgres or f"sqlite:///{directory}/m.db"
    environ, endpoint, storage = {}, None, f"file:{directory}/blobs"
    if args.s3:
        from tests.moto import shared_server

        moto = shared_server()
        environ = {"AWS_ACCESS_KEY_ID": moto.access_key, "AWS_SECRET_ACCESS_KEY": moto.secret_key}
        endpoint, storage = moto.endpoint, f"s3://{moto.create_bucket()}/bench"
    store, blobs = open_store(database, MESSAGE_EVENTS), open_blobs(storage, endpoint, None, environ)
    await store.migrate()
    await fill(store, blobs, args.messages)
    await store.set_retention("acme", raw=86400)
    timed = TimedStore(store)
    started = time.perf_counter()
    done = await run_pass(timed, blobs)
    elapsed = time.perf_counter() - started
    print(
        f"{database.split(':')[0]} + {storage.split(':')[0]}: {done.messages} messages incinerated, {done.blobs} blobs deleted"
        f" in {elapsed:.2f} s ({done.messages / elapsed:.0f} messages/s, {done.batches} batches);"
        f" marking transaction p50 {1000 * sorted(timed.marks)[len(timed.marks) // 2]:.1f} ms, max {1000 * max(timed.marks):.1f} ms"
    )
    await blobs.close()
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--postgres", metavar="DSN", help="a scratch PostgreSQL database (its tables are made here)")
    parser.add_argument("--s3", action="store_true", help="blobs in a bucket of a moto server started for the run")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
    sys.exit(0)
