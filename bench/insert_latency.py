"""
C{python -m bench.insert_latency DATABASE_URL}: a message insert at its
slowest, on a large database, with the search index kept up to date as the
daemon keeps it.

On a database C{python -m bench.scale --work DIR --keep} loaded, it stores
C{--count} messages one at a time (intake's transaction, one message each,
C{--gap} ms apart), while the daemon's search index loop runs (every 0.25 s,
where the store keeps its index itself: SQLite's own file). Prints the
insert's p50, p99, p99.9 and slowest, how many took over 20 ms, and what the
index's runs took (on SQLite, FTS5 merges its segments inside them). Code
without that loop (the index filled by triggers inside each insert) is
measured the same way: the A/B of issue 28's fourth sitting.
"""

import argparse
import sys
import time
from datetime import datetime, timezone

from bench.figures import percentile, print_figures

OTHER_ORG = 2
PRODUCTS = ["widgets", "gaskets", "pallets", "bearings", "valves", "cables", "pumps", "filters"]
INTERVAL = 0.25


def _figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50, p99, p999 = (percentile(ordered, share) for share in (0.5, 0.99, 0.999))
    return f"p50 {p50:.1f}, p99 {p99:.1f}, p99.9 {p999:.1f}, max {ordered[-1]:.1f} ms"


async def measure(url: str, count: int, gap_ms: float) -> dict[str, str]:
    from twisted.internet import reactor, task

    from mailingest.handoff.events import MESSAGE_EVENTS
    from mailingest.storage.store import open_store

    store = open_store(url, MESSAGE_EVENTS)
    figures = {}
    started = time.perf_counter()
    applied = await store.migrate()
    figures["migration"] = f"{applied or 'none'} in {time.perf_counter() - started:.1f} s"
    started = time.perf_counter()
    await store.build_indexes()
    figures["search index built (what migrations left)"] = f"{time.perf_counter() - started:.1f} s"
    keeping = getattr(store, "index_search", None)
    runs: list[float] = []

    async def keep() -> None:
        began = time.perf_counter()
        await keeping()
        runs.append((time.perf_counter() - began) * 1000)

    loop = None
    if keeping is not None:
        loop = task.LoopingCall(_run, keep)
        loop.start(INTERVAL)
    inserts = []
    stamp = time.time()
    try:
        for n in range(count):
            row = {
                "org_id": OTHER_ORG, "source": "smtp", "source_message_id": f"<latency-{stamp}-{n}@mail.customer.example>",
                "mail_from": f"buyer{n % 997}@customer{n % 700}.example", "rcpt_to": "orders+org2@example.com",
                "subject": f"Purchase order {stamp:.0f}{n} for {PRODUCTS[n % len(PRODUCTS)]}",
                "raw_key": f"raw/latency/{stamp}-{n}", "raw_size": 2048, "raw_sha256": "ef" * 32,
                "received_at": datetime.now(timezone.utc),
            }
            began = time.perf_counter()
            await store.insert_messages([row])
            inserts.append((time.perf_counter() - began) * 1000)
            await task.deferLater(reactor, gap_ms / 1000, lambda: None)
        if loop is not None:
            loop.stop()
            await keep()
        last = f"Purchase order {stamp:.0f}{count - 1} for"
        found = await store.search_messages(OTHER_ORG, text=last, limit=5)
    finally:
        await store.close()
    figures[f"{count} message inserts, one at a time"] = _figures(inserts)
    figures["inserts over 20 ms"] = str(sum(1 for took in inserts if took > 20))
    figures["search index runs (every 0.25 s)"] = f"{len(runs)}: {_figures(runs)}" if runs else "none (the index is filled inside each insert)"
    figures["the last message found by its subject"] = "yes" if found else "NO"
    return figures


def _run(fn):
    """The LoopingCall's call: a Deferred it waits for before the next."""
    from twisted.internet import defer

    return defer.ensureDeferred(fn())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.insert_latency", description=__doc__.strip().splitlines()[0])
    parser.add_argument("database", help="a database bench.scale loaded, e.g. sqlite:///DIR/scale-1000000.db")
    parser.add_argument("--count", type=int, default=2000, help="messages stored [default: 2000]")
    parser.add_argument("--gap", type=float, default=0.0, help="milliseconds between two inserts [default: 0]")
    args = parser.parse_args(argv)
    return print_figures(measure, args.database, args.count, args.gap)


if __name__ == "__main__":
    sys.exit(main())
