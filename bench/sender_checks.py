"""
CPU of the sender checks of one 1 KiB message from the bench's sender (SPF
pass, DMARC pass, no DKIM or ARC), against bench.dns_stub: in this process
(C{verify}, what the checks themselves cost) and through a sender check
process as the daemon runs it (requests in bursts of BURST, what the process,
its threads and its pipe add).

    python -m bench.sender_checks [BURST]      (default 4, a claim's worth)
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.targets import DOMAIN, REPO, cpu_seconds

MESSAGE = (
    f"From: load@{DOMAIN}\r\nTo: orders+bench@{DOMAIN}\r\nDate: Mon, 7 Dec 2026 01:00:00 +0000\r\n"
    "Message-Id: <1.2.3@host>\r\nSubject: test\r\n\r\n"
).encode() + b"x" * 1000 + b"\r\n"


def request(raw: str, port: int) -> dict:
    return {
        "raw_path": raw, "resolver": ["127.0.0.1", port], "client_ip": "127.0.0.1", "helo": f"host.{DOMAIN}",
        "mail_from": f"load@{DOMAIN}", "authserv_id": "mailingest.bench", "budget": 5.0,
    }


def in_process(req: dict) -> float:
    from mailingest.extraction.checker import verify

    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(1000):
            verify(req)
        best = min(best, (time.thread_time() - started) / 1000)
    return best


def through_the_process(req: dict, burst: int, count: int = 3000) -> float:
    checker = subprocess.Popen(
        [sys.executable, "-m", "mailingest.extraction.checker", "16", str(1 << 30)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    line = lambda n: (json.dumps({"id": n, "verify": req}) + "\n").encode()
    for n in range(50):  # warm: imports, caches
        checker.stdin.write(line(n))
    checker.stdin.flush()
    for _ in range(50):
        checker.stdout.readline()
    started = cpu_seconds(checker.pid)
    for n in range(0, count, burst):
        for k in range(burst):
            checker.stdin.write(line(n + k))
        checker.stdin.flush()
        for _ in range(burst):
            checker.stdout.readline()
    spent = cpu_seconds(checker.pid) - started
    checker.stdin.close()
    checker.wait()
    return spent / count


def main() -> None:
    burst = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    dns = subprocess.Popen([sys.executable, "-m", "bench.dns_stub"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        port = int(dns.stdout.readline())
        with tempfile.TemporaryDirectory() as directory:
            raw = os.path.join(directory, "m.eml")
            with open(raw, "wb") as f:
                f.write(MESSAGE)
            req = request(raw, port)
            print(f"verify, in this process: {in_process(req) * 1e6:.0f} µs CPU per message (best of 5 x 1,000)")
            print(f"through a sender check process, bursts of {burst}: {through_the_process(req, burst) * 1e6:.0f} µs CPU per message")
    finally:
        dns.terminate()


if __name__ == "__main__":
    main()
