"""
Crafted messages against every organisation's sender checks: C{--count}
messages to one organisation, each signed by the bench domain with an C{h=}
of 10,000 names no field has over 45,000 fields (the worst of
bench.crafted_checks), sent at once, then one ordinary message to another
organisation. Prints how long that message took from its 250 to C{parsed},
and how long the crafted ones took to drain.

    python -m bench.crafted_load [--count 8] [--orgs 1] [--postgres DSN]

With C{--orgs N}, the crafted messages go in turn to N organisations (the
check process runs at most 4 of one organisation's at once).

Runs C{twistd mailingest} (bench.targets.Mailingest, SQLite and local disk
unless --postgres), its DNS server being bench.dns_stub publishing the
bench domain's DKIM key.
"""

import argparse
import smtplib
import sys
import tempfile
import threading
import time

from bench.backends import Backend
from bench.crafted_checks import cases, keys
from bench.silent_dns import OTHER_ORG, add_orgs, report, send, wait_parsed
from bench.targets import DOMAIN, HOST, RECIPIENT, SENDER, Mailingest

CASE = "h= of 10,000 absent names, 45,000 fields"


def crafted_org(n: int) -> str:
    return f"crafted{n}"


def send_crafted(port: int, message: bytes, count: int, orgs: int, connections: int = 4) -> None:
    def session(first: int) -> None:
        with smtplib.SMTP(HOST, port, timeout=120) as client:
            for n in range(first, count, connections):
                rcpt = RECIPIENT if orgs == 1 else f"orders+{crafted_org(n % orgs)}@{DOMAIN}"
                client.sendmail(SENDER, [rcpt], message.replace(b"Subject: crafted", b"Message-ID: <c%d@x>" % n))

    threads = [threading.Thread(target=session, args=(n,)) for n in range(min(connections, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crafted_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=8, help="crafted messages [default: 8]")
    parser.add_argument("--orgs", type=int, default=1, help="organisations the crafted messages go to [default: 1]")
    parser.add_argument("--postgres", metavar="DSN", help="a PostgreSQL server to create the database on")
    parser.add_argument("--timeout", type=float, default=600.0, help="how long to wait for parsed [default: 600]")
    args = parser.parse_args(argv)
    private, record = keys()
    message = cases(private)[CASE]()

    class KeyedMailingest(Mailingest):
        dns_args = ("--dkim-key", record)

    directory = tempfile.mkdtemp(prefix="mailingest-bench-")
    with KeyedMailingest(directory, Backend(postgres=args.postgres)) as server:
        add_orgs(server, directory, [OTHER_ORG] + ([crafted_org(n) for n in range(args.orgs)] if args.orgs > 1 else []))
        started = time.time()
        send_crafted(server.port, message, args.count, args.orgs)
        sent = time.time() - started
        time.sleep(1)  # the crafted checks under way
        replied = send(server.port, SENDER, f"orders+{OTHER_ORG}@{DOMAIN}", "<other@bench.test>")
        crafted_ids = [f"<c{n}@x>" for n in range(args.count)]
        parsed = wait_parsed(server, ["<other@bench.test>", *crafted_ids], args.timeout)
    print(f"{args.count} crafted messages ({len(message) // 1024} KiB) to {args.orgs} organisation(s) sent in {sent:.1f} s")
    return report(parsed, replied, started, crafted_ids, "the crafted messages", args.timeout)


if __name__ == "__main__":
    sys.exit(main())
