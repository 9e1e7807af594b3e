"""
Webhook delivery latency: how long after a message is parsed its event
reaches the application, with mail arriving at a steady rate.

    python -m bench.webhook_latency [--rate 100] [--seconds 10] [--postgres DSN]

Runs C{twistd mailingest} on 127.0.0.1 (SQLite and local disk unless
--postgres), a threaded HTTP receiver in this process, and a paced SMTP
sender. Latency is the receiver's arrival time minus the message's
C{parsed_at} (same machine, same clock); end to end is arrival minus the
250 reply to DATA. Prints p50/p99/max of both and the achieved rates.
"""

import argparse
import json
import os
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def send_paced(port: int, rate: float, count: int, sender: int, replied: dict[str, float]) -> None:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("bench.test")
    start = time.monotonic()
    for n in range(count):
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        message_id = f"<latency-{sender}-{n}@bench.test>"
        data = (
            f"From: buyer@bench.test\r\nTo: orders+acme@example.com\r\nSubject: order {n}\r\n"
            f"Message-ID: {message_id}\r\n\r\nPlease find our order.\r\n"
        )
        client.sendmail("buyer@bench.test", ["orders+acme@example.com"], data)
        replied[message_id] = time.time()
    client.quit()


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {p[49] * 1000:.0f} ms, p99 {p[98] * 1000:.0f} ms, max {values[-1] * 1000:.0f} ms"


def parsed_times(database: str) -> dict[str, float]:
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database[len("sqlite:///"):]) as db:
            rows = db.execute("SELECT source_message_id, parsed_at FROM inbound_message WHERE parsed_at IS NOT NULL").fetchall()
        return {mid: datetime.fromisoformat(at).timestamp() for mid, at in rows}
    import psycopg2

    with psycopg2.connect(database) as db, db.cursor() as cursor:
        cursor.execute("SELECT source_message_id, parsed_at FROM inbound_message WHERE parsed_at IS NOT NULL")
        return {mid: at.timestamp() for mid, at in cursor.fetchall()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second [default: 100]")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send [default: 10]")
    parser.add_argument("--postgres", metavar="DSN", help="an empty PostgreSQL database instead of SQLite")
    args = parser.parse_args(argv)
    count = int(args.rate * args.seconds)
    directory = tempfile.mkdtemp(prefix="mailingest-bench-")
    database = args.postgres or "sqlite:///" + os.path.join(directory, "mailingest.db")
    env = dict(os.environ, MAILINGEST_DATABASE=database, MAILINGEST_STORAGE="file:" + os.path.join(directory, "blobs"),
               MAILINGEST_WEBHOOK_ALLOW_HTTP="yes", MAILINGEST_WEBHOOK_ALLOW_PRIVATE="yes", MAILINGEST_DOMAIN="example.com")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    for command in (["migrate"], ["org", "add", "acme"], ["org", "webhook", "acme", "--url", url]):
        subprocess.run([os.path.join(BIN, "mailingest"), *command], env=env, cwd=directory, check=True, capture_output=True)

    port = free_port()
    log = open(os.path.join(directory, "daemon.log"), "wb")
    daemon = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "mailingest", "--smtp", f"tcp:{port}:interface=127.0.0.1",
         "--http", "none", "--log-format", "json"],
        env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"the daemon did not start; see {directory}/daemon.log")
                time.sleep(0.1)
        # Two paced connections, so one slow reply does not hold the rate back.
        senders = 2
        replied: dict[str, float] = {}
        threads = [
            threading.Thread(target=send_paced, args=(port, args.rate / senders, count // senders, n, replied))
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
    finally:
        daemon.terminate()
        daemon.wait(30)
        server.shutdown()
    parsed = parsed_times(database)
    arrivals = Receiver.arrivals
    print(f"sent {total} messages in {sending:.1f} s ({total / sending:.0f}/s); {len(arrivals)} events received")
    print("parsed -> receiver:  " + percentiles([arrivals[m] - parsed[m] for m in arrivals if m in parsed]))
    print("250 reply -> receiver: " + percentiles([arrivals[m] - replied[m] for m in arrivals if m in replied]))
    return 0 if len(arrivals) == total else 1


if __name__ == "__main__":
    sys.exit(main())
