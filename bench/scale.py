"""
C{python -m bench.scale --messages N}: how the reads grow with the store (issue 28).

For each size (10,000 as the baseline, then N) and each engine (SQLite, and
PostgreSQL when reachable), it bulk-loads a year of mail: 1,001
organisations, one holding 20% of the messages, 1.5 documents and 2 status
rows per message. The rows are loaded at the schema before migration 013,
then migration 013 runs and the search index is built, as an existing
installation upgrades (both timed). Then it measures, through the store the
daemon uses (its engine, its queries): the console's search (no match, and
a match), the API's and the console's first and 50th pages, the
organisations page, the admin command (C{messages list --org}, C{--help}) as
processes, and the routine sweep after 1,000 new messages (their blobs put
through the intent journal, 1% orphaned). And the daemon's own path, which
must stay flat: a message stored, a duplicate answered, extraction's claim
and outcome. It prints one table with the growth factor from the baseline
to N.

Blob files are written only for the new messages the sweep looks at
(C{--blob-files} writes the whole store's, 2.55 per message, for a full
sweep measure too: slow, and disk hungry).
"""

import argparse
import hashlib
import io
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from bench.figures import percentiles, timed

ORGS = 1000
BIG_SHARE = 0.20
YEAR = timedelta(days=365)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
START = NOW - YEAR
SENDERS = [f"buyer{n}@customer{n % 700}.example" for n in range(5000)]
PRODUCTS = ["widgets", "gaskets", "pallets", "bearings", "valves", "cables", "pumps", "filters"]
BASELINE = 10_000
SMALL_ORG = 500
REPEAT = 50
POSTGRES = os.environ.get("MAILINGEST_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432")


class _Terms:
    """An engine's schema terms and splitter, without opening it (the loader writes with the plain driver)."""

    def __init__(self, engine_class):
        self.schema_terms = engine_class.schema_terms
        self._class = engine_class

    def script(self, sql):
        return self._class.script(self, sql)


def _rows(count: int, seed: int = 28):
    """(messages, documents, history) as tuples, ids from 1, oldest first."""
    rnd = random.Random(seed)
    big = max(1, int(count * BIG_SHARE))
    step = YEAR / count
    messages, documents, history = [], [], []
    doc_id = 0
    for n in range(1, count + 1):
        org = 1 if n % 5 == 0 and n // 5 <= big else rnd.randint(2, ORGS + 1)
        at = START + step * n
        status = "parsed" if n % 20 else ("failed" if n % 40 else "received")
        # One of the big organisation's customers sends 4% of its mail: a full page of one sender at every size.
        sender = SENDERS[5] if org == 1 and n % 125 == 0 else SENDERS[rnd.randrange(len(SENDERS))]
        subject = f"Purchase order {n} for {PRODUCTS[n % len(PRODUCTS)]}" if n % 7 else None
        stamp = at.isoformat(timespec="microseconds")
        messages.append((
            n, org, "smtp", f"<{n}.{rnd.randrange(1 << 30):x}@mail.customer.example>", sender,
            f"orders+org{org}@example.com", subject, f"raw/{at:%Y/%m/%d}/{n}.eml", 2048, "ab" * 32,
            status, 1, "broken PDF" if status == "failed" else None, stamp, stamp if status == "parsed" else None,
        ))
        for ordinal in range(2 if n % 2 else 1):
            doc_id += 1
            documents.append((doc_id, org, n, ordinal, f"po-{n}-{ordinal}.pdf", "application/pdf", 1024, "cd" * 32, f"documents/{org}/{n}/{ordinal}", stamp))
        history.append((n, "received", None, stamp))
        history.append((n, status, None, stamp))
    return messages, documents, history


MESSAGE_COLUMNS = (
    "id, org_id, source, source_message_id, mail_from, rcpt_to, subject, raw_key, raw_size, raw_sha256,"
    " status, attempts, last_error, received_at, parsed_at"
)
DOCUMENT_COLUMNS = "id, org_id, inbound_message_id, ordinal, filename, content_type, size, sha256, storage_key, created_at"
HISTORY_COLUMNS = "inbound_message_id, status, error, at"


def _org_rows():
    stamp = START.isoformat(timespec="microseconds")
    return [(n, f"org{n}" if n > 1 else "bigcorp", f"Organisation {n}", stamp) for n in range(1, ORGS + 2)]


def _before_013(terms) -> list[str]:
    from mailingest.storage.stores.schema import migrations

    statements = ["CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"]
    for version, name, sql in migrations(terms):
        if version >= 13:
            continue
        statements += terms.script(sql)
        statements.append(f"INSERT INTO schema_version VALUES ({version}, '{name}', '2026-01-01')")
    return statements


def load_sqlite(path: str, count: int) -> float:
    from mailingest.storage.engines.sqlite import SqliteEngine

    for stale in (path, path + "-wal", path + "-shm"):
        if os.path.exists(stale):
            os.unlink(stale)
    started = time.monotonic()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    for statement in _before_013(_Terms(SqliteEngine)):
        conn.execute(statement)
    conn.executemany("INSERT OR IGNORE INTO organization (id, slug, name, created_at) VALUES (?, ?, ?, ?)", _org_rows())
    messages, documents, history = _rows(count)
    conn.executemany(f"INSERT INTO inbound_message ({MESSAGE_COLUMNS}) VALUES ({', '.join('?' * 15)})", messages)
    conn.executemany(f"INSERT INTO document ({DOCUMENT_COLUMNS}) VALUES ({', '.join('?' * 10)})", documents)
    conn.executemany(f"INSERT INTO message_status_history ({HISTORY_COLUMNS}) VALUES (?, ?, ?, ?)", history)
    conn.execute("COMMIT")
    conn.close()
    return time.monotonic() - started


def _copy(cursor, table: str, columns: str, rows) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join("\\N" if v is None else str(v) for v in row) + "\n")
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buffer)


def load_postgresql(url: str, count: int) -> float:
    import psycopg2

    from mailingest.storage.engines.postgresql import PostgresqlEngine

    started = time.monotonic()
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cursor:
        for statement in _before_013(_Terms(PostgresqlEngine)):
            cursor.execute(statement)
        cursor.execute("DELETE FROM organization WHERE id > 0")
        _copy(cursor, "organization", "id, slug, name, created_at", _org_rows())
        messages, documents, history = _rows(count)
        _copy(cursor, "inbound_message", MESSAGE_COLUMNS, messages)
        _copy(cursor, "document", DOCUMENT_COLUMNS, documents)
        _copy(cursor, "message_status_history", HISTORY_COLUMNS, history)
        for table in ("organization", "inbound_message", "document", "message_status_history"):
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    conn.close()
    return time.monotonic() - started


def _postgres_database(name: str) -> str | None:
    try:
        import psycopg2

        conn = psycopg2.connect(POSTGRES + "/postgres", connect_timeout=3)
    except Exception as e:
        print(f"bench.scale: PostgreSQL at {POSTGRES} not reachable ({e}): SQLite only", file=sys.stderr)
        return None
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"{POSTGRES}/{name}"


def _drop_postgres_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(POSTGRES + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


async def _page_50(page) -> int | None:
    """The cursor of page 50, or of the last full page when there are fewer (40 at 10,000 messages)."""
    cursor, full = None, None
    for _ in range(50):
        rows = await page(cursor)
        if len(rows) < 50:
            break
        full = cursor
        if len(rows) < 51:
            break
        cursor = rows[49]["id"]
    return full


def _process_seconds(argv: list[str], cwd: str, repeat: int = 5) -> float:
    """The slowest wall time of C{repeat} runs (the figure the issue bounds)."""
    walls = []
    for _ in range(repeat):
        started = time.monotonic()
        result = subprocess.run(argv, cwd=cwd, capture_output=True)
        walls.append(time.monotonic() - started)
        if result.returncode != 0:
            raise RuntimeError(f"{argv}: {result.stderr.decode()}")
    return statistics.median(walls)


async def measure(url: str, storage_dir: str, count: int) -> dict[str, float]:
    """Every figure of one loaded database, as milliseconds or seconds (the keys say)."""
    from mailingest.handoff.events import MESSAGE_EVENTS
    from mailingest.storage.blobs import open_blobs
    from mailingest.storage.journal import IntentJournal, JournaledBlobs
    from mailingest.storage.store import open_store
    from mailingest.storage.sweeper import sweep_journal

    figures: dict[str, float] = {}
    store = open_store(url, MESSAGE_EVENTS)
    try:
        started = time.monotonic()
        await store.migrate()
        figures["migrations (s, write lock held)"] = time.monotonic() - started
        started = time.monotonic()
        await store.build_indexes()
        figures["search index built (s, in batches / concurrently)"] = time.monotonic() - started

        async def search(text, org=1, limit=51):
            return await store.search_messages(org, text=text, limit=limit)

        for name, text, org, *limit in (
            ("no match", "no such text at all", 1),
            ("one sender domain, 0.14%", "customer17.", 1),
            # The same search for as many rows as the baseline finds in all (3): its growth is the index's, not the answer's.
            ("one sender domain, 0.14%, first 3 rows", "customer17.", 1, 3),
            ("1 in 8", "widgets", 1),
            # What another organisation's mail costs its search: ~0.1% of the messages are its own.
            ("one sender domain, a small organisation", "customer17.", SMALL_ORG),
            # Texts whose every trigram is common (the index hands over most messages), and one too short for it.
            ("everyday words, no match", "order for", 1),
            ("everyday words, no match, 2", "for purchase", 1),
            ("two characters, no match", "zq", 1),
        ):
            p50, p99, _ = percentiles(await timed(lambda: search(text, org, *limit), REPEAT))
            figures[f"console search, {name}: p50 (ms)"], figures[f"console search, {name}: p99 (ms)"] = p50, p99
            rows = await search(text, org, *limit)
            figures[f"console search, {name}: rows returned"] = len(rows)
            # 1 when the search stopped short of a full page to bound its cost ("search older" in the console).
            figures[f"console search, {name}: stopped short"] = int(rows.searched_to is not None)

        month = NOW - timedelta(days=180)
        api_50 = await _page_50(lambda cursor: store.page_messages(org_id=1, before_id=cursor, limit=51))
        console_50 = await _page_50(lambda cursor: store.search_messages(1, before_id=cursor, limit=51))
        for name, call in (
            ("API first page", lambda: store.page_messages(org_id=1, limit=51)),
            ("API page 50", lambda: store.page_messages(org_id=1, before_id=api_50, limit=51)),
            ("API page, status failed", lambda: store.page_messages(org_id=1, status="failed", limit=51)),
            ("console first page", lambda: store.search_messages(1, limit=51)),
            ("console page 50", lambda: store.search_messages(1, before_id=console_50, limit=51)),
            ("console page, one sender", lambda: store.search_messages(1, sender=SENDERS[5], limit=51)),
            ("API page, since 30 days", lambda: store.page_messages(org_id=1, since=NOW - timedelta(days=30), limit=51)),
            ("console page, a month's range", lambda: store.search_messages(1, since=month, until=month + timedelta(days=30), limit=51)),
            ("console page, a month's range and a status", lambda: store.search_messages(
                1, status="failed", since=month, until=month + timedelta(days=30), limit=51)),
            ("console page, a month's range and a sender", lambda: store.search_messages(
                1, sender=SENDERS[5], since=month, until=month + timedelta(days=30), limit=51)),
        ):
            p50, p99, _ = percentiles(await timed(call, REPEAT))
            figures[f"{name}: p50 (ms)"], figures[f"{name}: p99 (ms)"] = p50, p99
            figures[f"{name}: rows returned"] = len(await call())
        today = datetime.combine(NOW.date(), datetime.min.time(), timezone.utc)
        p50, p99, top = percentiles(await timed(lambda: store.org_summaries(today), 20))
        figures["organisations page, 1,001 orgs p50 (ms)"] = p50
        figures["organisations page, 1,001 orgs max (ms)"] = top

        figures.update(await _daemon_path(store))

        # 1,000 new messages, their blobs put through the intent journal (as an hour long past), 10 orphaned.
        blobs = open_blobs("file:" + storage_dir)
        journal = IntentJournal(os.path.join(storage_dir, ".scratch", "gc-journal"), now=lambda: time.time() - 3 * 86400)
        journaled = JournaledBlobs(blobs, journal)
        rows = [{
            "org_id": 1 + n % ORGS, "source": "smtp", "source_message_id": f"<new-{n}@x>", "mail_from": SENDERS[n],
            "rcpt_to": "orders@example.com", "subject": "late", "raw_key": f"raw/2026/12/06/new-{n}.eml",
            "raw_size": 10, "raw_sha256": "ef" * 32, "received_at": NOW,
        } for n in range(1000)]
        for row in rows:
            await journaled.put_bytes(row["raw_key"], b"0123456789", hashlib.sha256(b"0123456789").hexdigest())
        for n in range(10):
            await journaled.put_bytes(f"raw/2026/12/06/orphan-{n}.eml", b"x", hashlib.sha256(b"x").hexdigest())
        await store.insert_messages(rows)
        started = time.monotonic()
        found = await sweep_journal(store, blobs, journal, 0.0)
        figures["routine sweep after 1,000 new messages (s)"] = time.monotonic() - started
        if found.removed != 10:
            raise RuntimeError(f"the routine sweep removed {found.removed} blobs, not the 10 orphans")
        await blobs.close()
    finally:
        await store.close()
    return figures


async def _daemon_path(store, count: int = 200) -> dict[str, float]:
    """
    The daemon's own path at this size, through the store: C{count} messages
    stored one transaction each (as the SMTP side stores them, committed
    before the 250), each again (the duplicate answer the unique index
    gives), and extraction's drain (a claim and a parsed outcome with one
    document, one message at a time, from the front of the backlog).
    """
    from mailingest.extraction.checks import CHECKS_PER_ORG

    run = time.time_ns()
    rows = [{
        "org_id": 1 + n % ORGS, "source": "smtp", "source_message_id": f"<intake-{run}-{n}@x>", "mail_from": SENDERS[n],
        "rcpt_to": "orders@example.com", "subject": f"Purchase order {n} for intake", "raw_key": f"raw/intake/{run}/{n}.eml",
        "raw_size": 10, "raw_sha256": "ef" * 32, "content_sha256": "ab" * 32, "received_at": NOW,
    } for n in range(count)]
    figures: dict[str, float] = {}
    rows_iter = iter(rows)
    samples = await timed(lambda: store.insert_messages([next(rows_iter)]), count)
    figures["intake, one message stored: p50 (ms)"], figures["intake, one message stored: p99 (ms)"], _ = percentiles(samples)
    rows_iter = iter(rows)
    samples = await timed(lambda: store.insert_messages([next(rows_iter)]), count)
    figures["dedup, a duplicate answered: p50 (ms)"], figures["dedup, a duplicate answered: p99 (ms)"], _ = percentiles(samples)

    async def drain_one():
        # As the extraction service claims: the organisations in turn (the due index's path).
        [claimed] = await store.claim(60, 1, CHECKS_PER_ORG)
        document = {"org_id": claimed["org_id"], "ordinal": 0, "filename": "po.pdf", "content_type": "application/pdf", "size": 1024,
                    "sha256": "cd" * 32, "storage_key": f"documents/{claimed['org_id']}/{claimed['id']}/0"}
        await store.mark_parsed(claimed["id"], [document])
        await store.unlock_claims([claimed["id"]])

    samples = await timed(drain_one, count)
    figures["extraction drain, claim + parsed: p50 (ms)"], figures["extraction drain, claim + parsed: p99 (ms)"], _ = percentiles(samples)
    return figures


def _commands(url: str, cwd: str) -> dict[str, float]:
    mailingest = os.path.join(os.path.dirname(sys.executable), "mailingest")
    return {
        "mailingest messages list --org X --limit 50 (s)": _process_seconds(
            [mailingest, "--database", url, "--storage", "file:" + cwd, "messages", "list", "--org", "bigcorp", "--limit", "50"], cwd
        ),
        "mailingest --help (s)": _process_seconds([mailingest, "--help"], cwd),
    }


def _child(args) -> int:
    """Load one database, or measure it (one reactor per process: a child per engine and size and step)."""
    import json

    from twisted.internet import defer, task

    storage_dir = os.path.join(args.work, f"{args.engine}-{args.count}-blobs")
    shutil.rmtree(storage_dir, ignore_errors=True)
    os.makedirs(storage_dir)
    load = None
    if args.engine == "sqlite":
        path = os.path.join(args.work, f"scale-{args.count}.db")
        if not (args.reuse and os.path.exists(path)):
            load = load_sqlite(path, args.count)
        url = "sqlite:///" + path
    elif args.reuse:
        url = f"{POSTGRES}/mailingest_scale_{args.count}"
    else:
        url = _postgres_database(f"mailingest_scale_{args.count}")
        if url is None:
            return 3
        load = load_postgresql(url, args.count)
    if load is not None:
        print(f"bench.scale: {args.engine}, {args.count} messages loaded in {load:.1f} s", file=sys.stderr, flush=True)
    if args.load_only:
        print(json.dumps({"bulk load (s)": load}), flush=True)
        return 0

    async def run():
        figures = {"bulk load (s)": load}
        figures.update(await measure(url, storage_dir, args.count))
        figures.update(_commands(url, storage_dir))
        print(json.dumps(figures), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run()))
    return 0


def main(argv=None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="the size to measure (10,000 is always the baseline)")
    parser.add_argument("--engines", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--work", help="where the databases and blobs go [default: a temporary directory, removed]")
    parser.add_argument("--keep", action="store_true", help="keep the databases and blobs")
    parser.add_argument("--reuse", action="store_true", help="measure the databases a run with --work DIR --keep left, without loading them again")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.engine, args.count = args.child[0], int(args.child[1])
        return _child(args)
    work = args.work or tempfile.mkdtemp(prefix="mailingest-scale-")
    os.makedirs(work, exist_ok=True)
    sizes = sorted({BASELINE, args.messages})
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    table: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for engine in engines:
            for size in sizes:
                # Loaded by one process, measured by a fresh one: the loader's heap does not weigh on the figures.
                steps = [["--reuse"]] if args.reuse else [["--load-only"], ["--reuse"]]
                figures: dict[str, float] = {}
                for step in steps:
                    result = subprocess.run(
                        [sys.executable, "-m", "bench.scale", "--work", work, "--child", engine, str(size), *step],
                        stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    )
                    if result.returncode != 0:
                        break
                    measured = json.loads(result.stdout.decode().strip().splitlines()[-1])
                    figures.update({k: v for k, v in measured.items() if v is not None or k not in figures})
                if result.returncode == 3:
                    break
                if result.returncode != 0:
                    print(f"bench.scale: {engine} at {size} failed", file=sys.stderr)
                    return 1
                table[(engine, size)] = figures
                if engine == "postgresql" and not (args.keep or args.reuse):
                    _drop_postgres_database(f"mailingest_scale_{size}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report(table, sizes, engines))
    return 0


def report(table, sizes, engines) -> str:
    top = sizes[-1]
    shown = [e for e in engines if (e, top) in table]
    head = "| measure |"
    rule = "| --- |"
    for engine in shown:
        head += f" {engine} {BASELINE:,} | {engine} {top:,} | growth |"
        rule += " ---: | ---: | ---: |"
    lines = [head, rule]
    names = list(next(iter(table.values())).keys()) if table else []
    for name in names:
        line = f"| {name} |"
        for engine in shown:
            small, large = table[(engine, BASELINE)].get(name), table[(engine, top)].get(name)
            growth = f"×{large / small:.2f}" if small and large is not None and small > 0 else "-"
            line += f" {_fmt(small)} | {_fmt(large)} | {growth} |"
        lines.append(line)
    load = os.getloadavg()
    lines.append("")
    lines.append(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
