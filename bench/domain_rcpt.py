"""
Does a routing table of 10,000 verified custom domains slow RCPT TO (issue 27)?

  python -m bench.domain_rcpt [--domains 10000] [--rounds 4] [--rcpts 4000]

Back-to-back A/B: rounds alternate between a daemon whose database holds no
custom domain (A) and one holding C{--domains} verified ones (B), each round
on fresh storage (the embedded backend, as an operator runs it with
twistd). In each round one client sends C{--rcpts} RCPTs to
C{orders+bench@bench.test} (the plus address, on both) and, on B, as many to
C{orders@dN.example} (a custom domain), in transactions of 50 (MAIL, 50 RCPT,
RSET), and the time of each RCPT's round trip is taken. The report gives the
median and 99th percentile per RCPT and RCPT per second, medians over the
rounds. The domains are written straight into the round's SQLite file before
the daemon starts, as verified.
"""

import argparse
import os
import smtplib
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from bench.backends import Backend
from bench.targets import DOMAIN, HOST, ORG, Mailingest

PER_TRANSACTION = 50


class MailingestWithDomains(Mailingest):
    """The benchmark's daemon with C{count} verified custom domains of its organisation, C{d0.example}..."""

    def __init__(self, directory: str, count: int):
        super().__init__(directory, Backend())
        self.count = count

    @property
    def name(self) -> str:
        return f"mailingest, {self.count} custom domains"

    def prepare(self) -> None:
        super().prepare()
        if not self.count:
            return
        now = datetime.now(timezone.utc).isoformat()
        with sqlite3.connect(self.database.path) as db:
            (org_id,) = db.execute("SELECT id FROM organization WHERE slug = ?", (ORG,)).fetchone()
            db.executemany(
                "INSERT INTO org_domain (org_id, domain, token, status, created_at, verified_at, next_check_at)"
                " VALUES (?, ?, 'bench', 'verified', ?, ?, '9999-12-31T00:00:00+00:00')",
                [(org_id, f"d{n}.example", now, now) for n in range(self.count)],
            )
            db.execute("UPDATE org_domain_version SET version = version + 1")


def rcpt_times(port: int, addresses: list[str]) -> list[float]:
    """Seconds of each RCPT's round trip, in transactions of L{PER_TRANSACTION}."""
    times = []
    client = smtplib.SMTP(HOST, port, timeout=30)
    try:
        client.ehlo("bench.client")
        for start in range(0, len(addresses), PER_TRANSACTION):
            code, reply = client.mail("sender@bench.client")
            assert code == 250, reply
            for address in addresses[start:start + PER_TRANSACTION]:
                began = time.perf_counter()
                code, reply = client.rcpt(address)
                times.append(time.perf_counter() - began)
                assert code == 250, (address, code, reply)
            client.rset()
    finally:
        client.quit()
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6,
        "per_s": len(ordered) / sum(ordered),
    }


def refresh_queries(path: str, repeat: int = 20) -> dict:
    """Milliseconds of the directory's refresh queries on the round's database (the store's SQL): the version check, and the full reload when it moved."""
    with sqlite3.connect(path) as db:
        began = time.perf_counter()
        for _ in range(repeat):
            db.execute("SELECT version FROM org_domain_version WHERE id = 1").fetchone()
        check = (time.perf_counter() - began) / repeat
        began = time.perf_counter()
        for _ in range(repeat):
            rows = db.execute(
                "SELECT d.domain, d.org_id, o.slug, d.local_parts FROM org_domain d"
                " JOIN organization o ON o.id = d.org_id WHERE d.status = 'verified'"
            ).fetchall()
        reload = (time.perf_counter() - began) / repeat
    return {"version_check_ms": check * 1000, "reload_ms": reload * 1000, "rows": len(rows)}


class _TableStore:
    """The SMTP side's store as the organisation cache reads it: one organisation, C{count} verified domains."""

    def __init__(self, count: int):
        self.count = count

    def active_orgs(self):
        from twisted.internet import defer

        return defer.succeed({ORG: 1})

    def routed_domains(self, known_version=None):
        from twisted.internet import defer

        domains = [{"domain": f"d{n}.example", "org_id": 1, "slug": ORG, "local_parts": []} for n in range(self.count)]
        return defer.succeed((1, domains))


def route_cost(count: int, calls: int = 50000) -> dict[str, float]:
    """Microseconds of CPU per C{Ingest.route} in this process (no network): the plus address, and a custom domain."""
    from twisted.mail import smtp

    from mailingest.delivery.directory import OrgDirectory
    from mailingest.delivery.ingest import Ingest

    directory = OrgDirectory(_TableStore(count))
    directory.refresh()
    ingest = Ingest(None, None, directory, [DOMAIN], "mailingest.bench", tempfile.gettempdir())
    users = {"plus": smtp.User(f"orders+{ORG}@{DOMAIN}".encode(), None, None, None)}
    if count:
        users["custom"] = smtp.User(f"orders@d{count // 2}.example".encode(), None, None, None)
    results = {}
    for name, user in users.items():
        began = time.process_time()
        for _ in range(calls):
            ingest.route(user)
        results[name] = (time.process_time() - began) / calls * 1e6
    return results


def one_round(count: int, rcpts: int, parent: str) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(dir=parent) as directory:
        with MailingestWithDomains(directory, count) as server:
            # The directory loads the table at start and refreshes it every 2 s: let it.
            time.sleep(3)
            results = {"plus": summary(rcpt_times(server.port, [f"orders+{ORG}@{DOMAIN}"] * rcpts))}
            if count:
                custom = [f"orders@d{(n * 7919) % count}.example" for n in range(rcpts)]
                results["custom"] = summary(rcpt_times(server.port, custom))
                results["refresh"] = refresh_queries(server.database.path)
            server.check_alive()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.domain_rcpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per side (A and B alternate)")
    parser.add_argument("--rcpts", type=int, default=4000, help="RCPTs per measurement")
    args = parser.parse_args(argv)
    parent = tempfile.mkdtemp(prefix="bench-domain-rcpt-")
    rounds: dict[str, list[dict]] = {"A plus address, no custom domains": [], "B plus address, with custom domains": [], "B custom domain": []}
    refreshes = []
    for n in range(args.rounds):
        for count in (0, args.domains):
            result = one_round(count, args.rcpts, parent)
            if count:
                rounds["B plus address, with custom domains"].append(result["plus"])
                rounds["B custom domain"].append(result["custom"])
                refreshes.append(result["refresh"])
            else:
                rounds["A plus address, no custom domains"].append(result["plus"])
            print(f"round {n + 1} {'B' if count else 'A'}: {result}", file=sys.stderr)
    print(f"RCPT round trips, {args.rcpts} per measurement, {args.rounds} rounds per side, B = {args.domains} verified custom domains")
    print()
    print("| RCPT | median µs | p99 µs | RCPT/s | rounds (median µs) |")
    print("| --- | --- | --- | --- | --- |")
    for name, samples in rounds.items():
        medians = [s["median_us"] for s in samples]
        print(
            f"| {name} | {statistics.median(medians):.0f} | {statistics.median(s['p99_us'] for s in samples):.0f}"
            f" | {statistics.median(s['per_s'] for s in samples):.0f} | {', '.join(f'{m:.0f}' for m in medians)} |"
        )
    print()
    micro = {count: [route_cost(count) for _ in range(5)] for count in (0, args.domains)}
    plus_a = statistics.median(r["plus"] for r in micro[0])
    plus_b = statistics.median(r["plus"] for r in micro[args.domains])
    custom_b = statistics.median(r["custom"] for r in micro[args.domains])
    print(
        f"CPU per RCPT routing decision in-process (Ingest.route, no network, median of 5 x 50,000): plus address"
        f" {plus_a:.1f} µs without custom domains, {plus_b:.1f} µs with {args.domains}; custom domain {custom_b:.1f} µs."
    )
    if refreshes:
        print()
        print(
            f"The directory's refresh with {refreshes[0]['rows']} verified domains (SQLite, the store's queries, medians):"
            f" version check {statistics.median(r['version_check_ms'] for r in refreshes):.3f} ms every 2 s;"
            f" full reload {statistics.median(r['reload_ms'] for r in refreshes):.1f} ms, only when a domain changed."
        )
    os.rmdir(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
