"""
C{python -m bench.search_changes DATABASE_URL}: what a queue of changed
messages costs SQLite's search, and whether a search meanwhile answers as it
does without one.

On a SQLite database C{python -m bench.scale --work DIR --keep} loaded (the
big organisation is 1), it brings the search index up to date, reads each
search's rows and times it, then for each size in C{--changes} queues that
many of the big organisation's newest messages as changed (their subject set
to itself: what an erasure or a retention pass queues, with the text left
as it was, so the answers must not change), times the searches again while
the index has not dealt with them, and times the index catching up. The
database keeps what it had (the queue is emptied as the daemon's loop does).
"""

import argparse
import sys
import time

from bench.figures import percentiles, print_figures, timed

BIG_ORG, SMALL_ORG = 1, 500
SEARCHES = (
    ("one sender domain, 0.14%", "customer17.", BIG_ORG),
    ("1 in 8", "widgets", BIG_ORG),
    ("one sender domain, a small organisation", "customer17.", SMALL_ORG),
    ("no match", "no such text at all", BIG_ORG),
)
REPEAT = 40


def _compared(found: list[int], expected: list[int], stopped_short: bool) -> str:
    """How a page read with changes queued compares with the page read without."""
    if found == expected:
        return ", as without the queue"
    if stopped_short and found == expected[:len(found)]:
        return f", the first {len(found)} of those without the queue, then stopped short (\"search older\")"
    return f", **{sum(id not in found for id in expected)} of the rows without the queue missing**"


async def measure(url: str, sizes: list[int]) -> dict[str, str]:
    from mailingest.handoff.events import MESSAGE_EVENTS
    from mailingest.storage.store import open_store

    store = open_store(url, MESSAGE_EVENTS)
    if store.engine.text_search != "fts5":
        print("bench.search_changes: only SQLite's search index has a queue of changes", file=sys.stderr)
        raise SystemExit(2)
    figures: dict[str, str] = {}

    async def searches(tag: str, expected: dict | None) -> dict:
        answers = {}
        for name, text, org in SEARCHES:
            took = await timed(lambda: store.search_messages(org, text=text, limit=51), REPEAT)
            rows = await store.search_messages(org, text=text, limit=51)
            answers[name] = found = [row["id"] for row in rows]
            p50, p99, _ = percentiles(took)
            figures[f"{tag}: {name}"] = f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(found)} rows" + (
                "" if expected is None else _compared(found, expected[name], rows.searched_to is not None)
            )
        return answers

    def requeue(txn, count):
        return txn.execute(
            "UPDATE inbound_message SET subject = subject WHERE id IN"
            " (SELECT id FROM inbound_message WHERE org_id = ? ORDER BY org_id DESC, id DESC LIMIT ?)",
            (BIG_ORG, count),
        )

    try:
        await store.migrate()
        await store.build_indexes()
        await store.index_search()
        quiet = await searches("nothing queued", None)
        for count in sizes:
            await store.engine.interaction(requeue, count)
            await searches(f"{count:,} queued", quiet)
            started = time.perf_counter()
            await store.index_search()
            figures[f"{count:,} queued: the index deals with them"] = f"{time.perf_counter() - started:.1f} s"
    finally:
        await store.close()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search_changes", description=__doc__.strip().splitlines()[0])
    parser.add_argument("url", metavar="DATABASE_URL", help="sqlite:///DIR/scale-1000000.db, as bench.scale --keep left it")
    parser.add_argument("--changes", default="100,4000,100000", help="queue sizes, comma-separated [default: %(default)s]")
    args = parser.parse_args(argv)
    return print_figures(measure, args.url, [int(size) for size in args.changes.split(",")])


if __name__ == "__main__":
    sys.exit(main())
