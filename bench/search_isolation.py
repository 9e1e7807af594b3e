"""
C{python -m bench.search_isolation DATABASE_URL}: what one organisation's
slow searches cost everyone else, through the store the daemon uses.

On a database C{python -m bench.scale --work DIR --keep} loaded (the big
organisation is 1, the other one 2), it times a message insert (intake's
transaction) and the other organisation's first API page, one after the
other, first quiet, then while the big organisation runs C{--searches}
searches of C{--text} at once, over and over (a console with several tabs).
Prints the p50 and p99 of each, and what one search took meanwhile.
"""

import argparse
import sys
import time
from datetime import datetime, timezone

from bench.figures import percentiles, print_figures

BIG_ORG, OTHER_ORG = 1, 2


def _summary(samples: list[float]) -> str:
    p50, p99, _ = percentiles(samples)
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


async def measure(url: str, text: str, searches: int, count: int) -> dict[str, str]:
    from twisted.internet import defer, reactor, task

    from mailingest.handoff.events import MESSAGE_EVENTS
    from mailingest.storage.store import open_store

    store = open_store(url, MESSAGE_EVENTS)
    await store.migrate()

    async def probe(tag: str) -> tuple[list[float], list[float]]:
        inserts, pages = [], []
        for n in range(count):
            row = {
                "org_id": OTHER_ORG, "source": "smtp", "source_message_id": f"<isolation-{tag}-{n}-{time.time()}@bench>",
                "mail_from": "buyer@customer.example", "rcpt_to": "orders@example.com", "subject": "isolation",
                "raw_key": f"raw/isolation/{tag}-{n}-{time.time()}", "raw_size": 10, "raw_sha256": "ef" * 32,
                "received_at": datetime.now(timezone.utc),
            }
            started = time.perf_counter()
            await store.insert_messages([row])
            inserts.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await store.page_messages(org_id=OTHER_ORG, limit=51)
            pages.append((time.perf_counter() - started) * 1000)
            await task.deferLater(reactor, 0.01, lambda: None)
        return inserts, pages

    stop, took = False, []

    async def searcher() -> None:
        while not stop:
            started = time.perf_counter()
            await store.search_messages(BIG_ORG, text=text, limit=51)
            took.append((time.perf_counter() - started) * 1000)

    try:
        quiet = await probe("quiet")
        running = [defer.ensureDeferred(searcher()) for _ in range(searches)]
        busy = await probe("busy")
        stop = True
        await defer.gatherResults(running)
    finally:
        await store.close()
    return {
        "message insert, quiet": _summary(quiet[0]),
        "other organisation's API page, quiet": _summary(quiet[1]),
        f"message insert, {searches} searches of {text!r} running": _summary(busy[0]),
        f"other organisation's API page, {searches} searches running": _summary(busy[1]),
        "one search, as its caller waits for it": _summary(took),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search_isolation", description=__doc__.strip().splitlines()[0])
    parser.add_argument("database", help="a database bench.scale loaded, e.g. sqlite:///DIR/scale-1000000.db")
    parser.add_argument("--text", default="order for", help="what the big organisation searches for [default: 'order for']")
    parser.add_argument("--searches", type=int, default=4, help="searches running at once [default: 4]")
    parser.add_argument("--count", type=int, default=60, help="inserts and pages timed in each phase [default: 60]")
    args = parser.parse_args(argv)
    return print_figures(measure, args.database, args.text, args.searches, args.count)


if __name__ == "__main__":
    sys.exit(main())
