"""
Peak memory of one parser worker on a multipart message of K text parts of 50 KB.

Each message is parsed by a fresh C{python -m mailingest.extraction.worker}, started
as the daemon starts it; its peak RSS (C{VmHWM}) is read after it replied and
before it exits. Two shapes: C{intact}, a well-formed multipart, and
C{reused}, where every part is followed by a C{--boundary--} line (a nested
multipart that reused its parent's boundary, as far as the parser can tell),
which leaves all parts but the first to boundary recovery. C{--8bit} puts one
8-bit byte in every line, which doubles the size of the parser's strings.

    python -m bench.parser_memory [--parts 100,200,300,1000] [--8bit]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.targets import peak_rss_mb
from mailingest.extraction.pool import MEMORY_LIMIT_BYTES, WORKER_ARGV

PART_BYTES = 50 * 1024


def message(parts: int, reused: bool, eight_bit: bool) -> bytes:
    line = (b"Y" * 75 + b"\xe9" if eight_bit else b"Y" * 76) + b"\r\n"
    part = b"--B\r\nContent-Type: text/plain\r\n\r\n" + line * (PART_BYTES // len(line)) + b"\r\n"
    if reused:
        part += b"--B--\r\n"
    head = b"From: load@bench.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    return head + part * parts + b"--B--\r\n"


def measure(directory: str, data: bytes) -> tuple[float, float, dict]:
    """The worker's peak RSS in MiB, the seconds it took, and its reply."""
    raw, out = os.path.join(directory, "raw.eml"), os.path.join(directory, "parts")
    os.makedirs(out, exist_ok=True)
    with open(raw, "wb") as f:
        f.write(data)
    worker = subprocess.Popen([*WORKER_ARGV, str(MEMORY_LIMIT_BYTES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        worker.stdin.write(json.dumps({"raw_path": raw, "out_dir": out}).encode() + b"\n")
        worker.stdin.flush()
        reply = json.loads(worker.stdout.readline())
        seconds = time.monotonic() - started
        peak = reply.get("retire", {}).get("peak", 0) / 2**20 or peak_rss_mb(worker.pid)
    finally:
        worker.stdin.close()
        worker.wait()
    return peak, seconds, reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--parts", default="100,200,300,1000", help="part counts, comma-separated")
    parser.add_argument("--8bit", dest="eight_bit", action="store_true", help="one 8-bit byte in every line")
    options = parser.parse_args()
    print("| shape | parts | message MB | worker peak MiB | seconds | result |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        for reused in (False, True):
            for parts in map(int, options.parts.split(",")):
                data = message(parts, reused, options.eight_bit)
                peak, seconds, reply = measure(directory, data)
                result = reply.get("unparseable") or reply.get("error") or f"{len(reply['warnings'])} warning(s)"
                shape = "reused" if reused else "intact"
                print(f"| {shape} | {parts} | {len(data) / 1e6:.0f} | {peak:,.0f} | {seconds:.2f} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
