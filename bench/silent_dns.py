"""
One silent DNS server against every organisation's extraction: C{--count}
mails from C{a@yN.silent.example} (a domain whose nameservers never answer)
to one organisation, sent at once, then one ordinary message to another
organisation. Prints how long that message took from its 250 to C{parsed},
and how long the silent ones took to drain.

    python -m bench.silent_dns [--count 60] [--one-domain] [--postgres DSN]

With C{--one-domain} every mail comes from C{a@y0.silent.example}.

Runs C{twistd mailingest} (bench.targets.Mailingest, SQLite and local disk
unless --postgres) with the default C{--dns-budget} of 5 s, its DNS server
being bench.dns_stub with C{silent.example} silent.
"""

import argparse
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

from bench.backends import Backend
from bench.targets import DOMAIN, HOST, RECIPIENT, SENDER, Mailingest, tool
from bench.webhook_latency import parsed_times

OTHER_ORG = "other"
SILENT_ZONE = "silent.example"


class SilentDnsMailingest(Mailingest):
    dns_args = ("--silent-zone", SILENT_ZONE)


def send(port: int, mail_from: str, rcpt: str, message_id: str) -> float:
    """One message on its own connection; the time.time() of its 250."""
    data = (
        f"From: {mail_from}\r\nTo: {rcpt}\r\nSubject: order\r\nMessage-ID: {message_id}\r\n\r\n"
        "Please find our order.\r\n"
    )
    with smtplib.SMTP(HOST, port, timeout=60) as client:
        client.sendmail(mail_from, [rcpt], data)
    return time.time()


def send_silent(port: int, count: int, domains: int, connections: int = 10) -> None:
    """C{count} mails from C{a@yN.silent.example} (N below C{domains}), over C{connections} connections at once."""

    def session(first: int) -> None:
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            for n in range(first, count, connections):
                mail_from = f"a@y{n % domains}.{SILENT_ZONE}"
                client.sendmail(
                    mail_from,
                    [RECIPIENT],
                    f"From: {mail_from}\r\nTo: {RECIPIENT}\r\nSubject: n{n}\r\nMessage-ID: <s{n}@x>\r\n\r\nhi\r\n",
                )

    threads = [threading.Thread(target=session, args=(n,)) for n in range(min(connections, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_parsed(server: Mailingest, message_ids: list[str], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        parsed = parsed_times(server.database.url)
        if all(m in parsed for m in message_ids) or time.monotonic() > deadline:
            return parsed
        time.sleep(0.1)


def add_orgs(server: Mailingest, directory: str, orgs: list[str]) -> None:
    for org in orgs:
        subprocess.run(
            [tool("mailingest"), "--database", server.database.url, "org", "add", org],
            cwd=directory, check=True, stdout=subprocess.DEVNULL,
        )


def report(parsed: dict[str, float], replied: float, started: float, flood_ids: list[str], flood: str, timeout: float) -> int:
    """
    The other organisation's message, 250 to parsed, and when the flood
    (C{flood_ids}, called C{flood}) was parsed; 1 when the other was not.
    """
    if "<other@bench.test>" not in parsed:
        print(f"the other organisation's message: not parsed within {timeout:.0f} s")
        return 1
    print(f"the other organisation's message: 250 -> parsed in {parsed['<other@bench.test>'] - replied:.2f} s")
    done = [parsed[m] for m in flood_ids if m in parsed]
    if len(done) == len(flood_ids):
        print(f"{flood}: all parsed {max(done) - started:.1f} s after the first was sent")
    else:
        print(f"{flood}: {len(done)}/{len(flood_ids)} parsed within {timeout:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.silent_dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=60, help="mails from the silent domain [default: 60]")
    parser.add_argument("--one-domain", action="store_true", help="every mail from the same silent domain")
    parser.add_argument("--postgres", metavar="DSN", help="a PostgreSQL server to create the database on")
    parser.add_argument("--timeout", type=float, default=400.0, help="how long to wait for parsed [default: 400]")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="mailingest-bench-")
    with SilentDnsMailingest(directory, Backend(postgres=args.postgres)) as server:
        add_orgs(server, directory, [OTHER_ORG])
        started = time.time()
        send_silent(server.port, args.count, 1 if args.one_domain else args.count)
        sent = time.time() - started
        replied = send(server.port, SENDER, f"orders+{OTHER_ORG}@{DOMAIN}", "<other@bench.test>")
        silent_ids = [f"<s{n}@x>" for n in range(args.count)]
        parsed = wait_parsed(server, ["<other@bench.test>", *silent_ids], args.timeout)
    sender = f"a@y0.{SILENT_ZONE}" if args.one_domain else f"a@yN.{SILENT_ZONE}"
    print(f"{args.count} mails from {sender} sent in {sent:.1f} s")
    return report(parsed, replied, started, silent_ids, "the silent domain's mails", args.timeout)


if __name__ == "__main__":
    sys.exit(main())
