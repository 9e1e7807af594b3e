"""
Peak memory of one parser worker on a multipart message of K text parts of 50 KB.

Each message is parsed by a fresh C{python -m mailingest.extraction.worker}, started
as the daemon starts it; its peak RSS (C{VmHWM}) is read after it replied and
before it exits. Two shapes: C{intact}, a well-formed multipart, and
C{reused}, where every part is followed by a C{--boundary--} line (a nested
multipart that reused its parent's boundary, as far as the parser can tell),
which leaves all parts but the first to boundary recovery. C{--8bit} puts one
8-bit byte in every line, which doubles the size of the parser's strings.
C{--base64-mb} adds one message per size given, one base64 attachment written
one character per line (valid base64: line breaks are ignored), the line
shape that costs the parser most per byte.

    python -m bench.parser_memory [--parts 100,200,300,1000] [--8bit] [--base64-mb 12,48]
"""

import argparse
import base64
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


def one_char_lines(size: int) -> bytes:
    """A message of about C{size} bytes: one attachment in base64, one character per line."""
    encoded = base64.b64encode(os.urandom(size // 4))
    # Built in place, so that this process stays small: a worker's peak (ru_maxrss) includes its parent's at fork.
    body = bytearray(len(encoded) * 3)
    body[0::3] = encoded
    body[1::3] = b"\r" * len(encoded)
    body[2::3] = b"\n" * len(encoded)
    body = bytes(body[:-2])
    head = (
        b"From: load@bench.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: application/pdf; name=order.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    return head + body + b"\r\n--B--\r\n"


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
    parser.add_argument("--base64-mb", default="", help="message sizes (MB) of one base64 attachment, one character per line")
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
        for megabytes in filter(None, options.base64_mb.split(",")):
            data = one_char_lines(int(megabytes) * 10**6)
            peak, seconds, reply = measure(directory, data)
            result = reply.get("unparseable") or reply.get("error") or f"{len(reply['attachments'])} document(s)"
            print(f"| base64, 1 char/line | 1 | {len(data) / 1e6:.0f} | {peak:,.0f} | {seconds:.2f} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
