"""
Webhook delivery latency: how long after a message is parsed its event
reaches the application, with mail arriving at a steady rate.

    python -m bench.webhook_latency [--rate 100] [--seconds 10] [--postgres DSN]

Runs C{twistd mailingest} on 127.0.0.1 (SQLite and local disk unless
--postgres), a threaded HTTP receiver in this process, and a paced SMTP
sender. Latency is the receiver's arrival time minus the message's
C{parsed_at} (same machine, same clock); end to end is arrival minus the
250 reply to DATA. Prints p50/p99/max of both and the achieved rates.

    python -m bench.webhook_latency --hostile [--wait 120]

Fairness instead (issue 22): 40 mails to an organisation whose receiver
accepts connections and never answers, 200 to one whose receiver port
refuses, then a mail to a healthy organisation every 5 s; prints how long
each healthy event took from C{parsed_at} to the receiver (or that it did not
arrive within C{--wait} seconds).
"""

import argparse
import json
import os
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.figures import percentiles

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver(BaseHTTPRequestHandler):
    arrivals: dict[str, float] = {}

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        arrived = time.time()
        Receiver.arrivals.setdefault(json.loads(body)["message"]["message_id_header"], arrived)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


class Silent:
    """A receiver that accepts connections and never answers."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            connection, _ = self.socket.accept()
            self.held.append(connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}/hooks"


def send(port: int, org: str, count: int, tag: str, replied: dict[str, float], rate: float | None = None) -> None:
    """C{count} mails to C{org} on one connection, C{rate} a second (or as fast as they go); Message-IDs <tag-N@bench.test>."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.ehlo("bench.test")
    start = time.monotonic()
    for n in range(count):
        pause = start + n / rate - time.monotonic() if rate else 0
        if pause > 0:
            time.sleep(pause)
        message_id = f"<{tag}-{n}@bench.test>"
        data = (
            f"From: buyer@bench.test\r\nTo: orders+{org}@example.com\r\nSubject: order {n}\r\n"
            f"Message-ID: {message_id}\r\n\r\nPlease find our order.\r\n"
        )
        client.sendmail("buyer@bench.test", [f"orders+{org}@example.com"], data)
        replied[message_id] = time.time()
    client.quit()


def in_ms(values: list[float]) -> str:
    p50, p99, top = percentiles(values)
    return f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {top * 1000:.0f} ms"


def parsed_times(database: str) -> dict[str, float]:
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database[len("sqlite:///"):]) as db:
            rows = db.execute("SELECT source_message_id, parsed_at FROM inbound_message WHERE parsed_at IS NOT NULL").fetchall()
        return {mid: datetime.fromisoformat(at).timestamp() for mid, at in rows}
    import psycopg2

    with psycopg2.connect(database) as db, db.cursor() as cursor:
        cursor.execute("SELECT source_message_id, parsed_at FROM inbound_message WHERE parsed_at IS NOT NULL")
        return {mid: at.timestamp() for mid, at in cursor.fetchall()}


def start_daemon(directory: str, env: dict[str, str], webhooks: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A migrated database, one organisation per C{webhooks} entry (slug: URL), and the daemon listening."""
    commands = [["migrate"]]
    for slug, url in webhooks.items():
        commands += [["org", "add", slug], ["org", "webhook", slug, "--url", url]]
    for command in commands:
        subprocess.run([os.path.join(BIN, "mailingest"), *command], env=env, cwd=directory, check=True, capture_output=True)
    port = free_port()
    log = open(os.path.join(directory, "daemon.log"), "wb")
    daemon = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "mailingest", "--smtp", f"tcp:{port}:interface=127.0.0.1",
         "--http", "none", "--log-format", "json"],
        env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return daemon, port
        except OSError:
            if time.monotonic() > deadline or daemon.poll() is not None:
                daemon.kill()
                raise SystemExit(f"the daemon did not start; see {directory}/daemon.log")
            time.sleep(0.1)


def steady(port: int, args: argparse.Namespace, database: str) -> int:
    count = int(args.rate * args.seconds)
    # Two paced connections, so one slow reply does not hold the rate back.
    senders = 2
    replied: dict[str, float] = {}
    threads = [
        threading.Thread(target=send, args=(port, "acme", count // senders, f"latency-{n}", replied, args.rate / senders))
        for n in range(senders)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sending = time.monotonic() - started
    total = len(replied)
    deadline = time.monotonic() + 60
    while len(Receiver.arrivals) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    parsed = parsed_times(database)
    arrivals = Receiver.arrivals
    print(f"sent {total} messages in {sending:.1f} s ({total / sending:.0f}/s); {len(arrivals)} events received")
    print("parsed -> receiver:  " + in_ms([arrivals[m] - parsed[m] for m in arrivals if m in parsed]))
    print("250 reply -> receiver: " + in_ms([arrivals[m] - replied[m] for m in arrivals if m in replied]))
    return 0 if len(arrivals) == total else 1


def hostile(port: int, args: argparse.Namespace, database: str) -> int:
    replied: dict[str, float] = {}
    send(port, "hang", 40, "hang", replied)
    send(port, "refused", 200, "refused", replied)
    healthy = []
    started = time.monotonic()
    for n in range(args.healthy):
        time.sleep(max(0.0, started + n * 5.0 - time.monotonic()))
        send(port, "acme", 1, f"healthy{n}", replied)
        healthy.append(f"<healthy{n}-0@bench.test>")
    deadline = time.monotonic() + args.wait
    while not all(m in Receiver.arrivals for m in healthy) and time.monotonic() < deadline:
        time.sleep(0.1)
    parsed = parsed_times(database)
    delays = []
    for m in healthy:
        if m in Receiver.arrivals and m in parsed:
            delays.append(Receiver.arrivals[m] - parsed[m])
            print(f"{m}: parsed -> receiver {delays[-1]:.2f} s")
        else:
            print(f"{m}: not delivered {args.wait:g} s after the last healthy mail was sent")
    if delays:
        print(f"healthy organisation: {len(delays)}/{len(healthy)} delivered, max {max(delays):.2f} s")
    return 0 if len(delays) == len(healthy) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second [default: 100]")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send [default: 10]")
    parser.add_argument("--postgres", metavar="DSN", help="an empty PostgreSQL database instead of SQLite")
    parser.add_argument("--hostile", action="store_true", help="a silent and a refusing receiver beside a healthy one")
    parser.add_argument("--healthy", type=int, default=12, help="--hostile: healthy mails, one every 5 s [default: 12]")
    parser.add_argument("--wait", type=float, default=60.0, help="--hostile: seconds to wait for the last healthy event [default: 60]")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="mailingest-bench-")
    database = args.postgres or "sqlite:///" + os.path.join(directory, "mailingest.db")
    env = dict(os.environ, MAILINGEST_DATABASE=database, MAILINGEST_STORAGE="file:" + os.path.join(directory, "blobs"),
               MAILINGEST_WEBHOOK_ALLOW_HTTP="yes", MAILINGEST_WEBHOOK_ALLOW_PRIVATE="yes", MAILINGEST_DOMAIN="example.com")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    webhooks = {"acme": f"http://127.0.0.1:{server.server_address[1]}/hooks"}
    if args.hostile:
        webhooks.update(hang=Silent().url, refused=f"http://127.0.0.1:{free_port()}/hooks")
    daemon, port = start_daemon(directory, env, webhooks)
    try:
        return (hostile if args.hostile else steady)(port, args, database)
    finally:
        daemon.terminate()
        daemon.wait(30)
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
