"""
CPU of one extraction claim as the service makes it (8 messages, at most 4 of
one organisation), in-process on SQLite, with ORGS organisations each holding
PER due messages: what a claim costs with a backlog.

    python -m bench.claim [ORGS] [PER]        (default 1,000 organisations x 5)
"""

import sys
import tempfile
import time

from twisted.internet import defer, task

from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.engines.sqlite import SqliteEngine
from mailingest.storage.store import Store
from tests.store_contract import message


async def measure(orgs: int, per: int) -> float:
    """The best of 5 averages of 20 claims, each let go of again, in CPU seconds."""
    with tempfile.TemporaryDirectory() as directory:
        engine = SqliteEngine(f"{directory}/m.db")
        store = Store(engine, MESSAGE_EVENTS)
        await store.migrate()
        ids = [(await store.add_org(f"o{n}", f"O{n}"))["id"] for n in range(orgs)]
        rows = [message(org, f"<{org}.{k}@x>", k) for org in ids for k in range(per)]
        for start in range(0, len(rows), 500):
            await store.insert_messages(rows[start:start + 500])
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(20):
                claimed = await store.claim(60, 8, per_org=4)
                await store.release_claims([m["id"] for m in claimed])
            best = min(best, (time.process_time() - started) / 20)
        await engine.close()
    return best


def main(reactor, orgs: int, per: int):
    async def run():
        best = await measure(orgs, per)
        print(f"{orgs:,} organisations with {per:,} due messages each: {best * 1000:.2f} ms CPU per claim (and its release), best of 5")

    return defer.ensureDeferred(run())


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:3]]
    task.react(main, [*arguments, *(1000, 5)[len(arguments):]])
