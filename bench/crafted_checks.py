"""
CPU of the sender checks of crafted messages, each the worst of its kind that
the SMTP intake accepts (a header section within 256 KiB), against a normal
signed message: what one sender can make the shared sender check process
spend. Each message is checked in this process as the check process checks it
(L{mailingest.extraction.checker.verify}), from cached DNS answers of
bench.dns_stub, which publishes the bench domain's DKIM key.

    python -m bench.crafted_checks [--only NAME ...]
"""

import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.targets import DOMAIN, REPO

SENDER = f"load@{DOMAIN}"
TOP = f"From: {SENDER}\r\nTo: orders@{DOMAIN}\r\nSubject: crafted\r\nDate: Mon, 7 Dec 2026 01:00:00 +0000\r\n".encode()
HEADER_ROOM = 256 * 1024 - 4096  # what the intake accepts, less the signatures' own fields


def keys() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")


def signed(message: bytes, private: bytes, count: int = 1, names: list[bytes] | None = None) -> bytes:
    """
    C{message} under C{count} signatures whose body hash is right; with
    C{names}, each signature's h= lists them (its b= is then wrong: the
    header hash is computed before that is found).
    """
    fields = []
    for _ in range(count):
        field = dkim.sign(message, b"sel", DOMAIN.encode(), private, canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject"])
        if names is not None:
            field = field.replace(b"h=from : to : subject", b"h=" + b":".join(names))
            assert b"h=" + names[0] in field
        fields.append(field)
    return b"".join(fields) + message


def arc_sets(message: bytes, private: bytes, count: int) -> bytes:
    """C{count} ARC sets whose message signatures have the right body hash (their b= and seals are wrong)."""
    body_hash = re.search(rb"bh=([^;]+);", signed(message, private)).group(1)
    fields = []
    for i in range(count, 0, -1):
        fields.append(
            b"ARC-Seal: i=%d; a=rsa-sha256; cv=%s; d=%s; s=sel; b=AAAA\r\n" % (i, b"pass" if i > 1 else b"none", DOMAIN.encode())
            + b"ARC-Message-Signature: i=%d; a=rsa-sha256; c=relaxed/relaxed; d=%s; s=sel; h=from; bh=%s; b=AAAA\r\n"
            % (i, DOMAIN.encode(), body_hash)
            + b"ARC-Authentication-Results: i=%d; %s; dkim=pass\r\n" % (i, DOMAIN.encode())
        )
    return b"".join(fields) + message


def cases(private: bytes) -> dict[str, Callable[[], bytes]]:
    """Each case's builder: only the cases asked for are built (three are 10 MiB)."""
    body = b"\r\n" + b"x" * 1000 + b"\r\n"
    one_byte_fields = b"a:\r\n" * (HEADER_ROOM // 4)
    folded = b"X-Folded: a\r\n" + b" \r\n" * (HEADER_ROOM // 3)
    absent = [b"x%d" % i for i in range(10000)]
    return {
        "normal, signed": lambda: signed(TOP + body, private),
        "65,000 fields": lambda: TOP + one_byte_fields + body,
        "one field folded 86,000 times": lambda: TOP + folded + body,
        "10 signatures over 65,000 fields": lambda: signed(TOP + b"a:\r\n" * (HEADER_ROOM // 4 - 1500) + body, private, 10),
        "h= of 10,000 absent names, 45,000 fields": lambda: signed(
            TOP + b"a:\r\n" * ((HEADER_ROOM - 70000) // 4) + body, private, 1, absent
        ),
        "h= of 35,000 absent names (folded), 990 fields": lambda: signed(
            TOP + b"a:\r\n" * 985 + body, private, 1,
            [b":\r\n ".join(b":".join(b"x%d" % i for i in range(n, n + 10)) for n in range(0, 35000, 10))],
        ),
        "10 signatures, 10 MiB body of short lines": lambda: signed(TOP + b"\r\n" + b"a\r\n" * (10 * 1024 * 1024 // 3), private, 10),
        "50 ARC sets, 10 MiB body": lambda: arc_sets(TOP + b"\r\n" + b"a\r\n" * (10 * 1024 * 1024 // 3), private, 50),
        "a 120 KiB line without a colon": lambda: TOP + b"a" * (120 * 1024) + b"\r\n" + body,
        "b= holding a run of 200,000 spaces": lambda: re.sub(
            rb"(\s)b=", rb"\1b=A" + b" " * 200000 + b"!", signed(TOP + body, private), count=1
        ),
        "signed body holding a run of 100,000 spaces": lambda: signed(TOP + b"\r\n" + b" " * 100000 + b"x \r\n", private),
        "b= of 240 KiB, runs of 64 spaces": lambda: re.sub(
            rb"(\s)b=", rb"\1b=" + (b"A" + b" " * 64) * 3780 + b"!", signed(TOP + body, private), count=1
        ),
        "z= holding \" b=A\" and folds 3,700 times": lambda: re.sub(
            rb"(\s)b=", b"z=" + (b" b=A" + b" \r\n " * 15) * 3700 + rb";\1b=", signed(TOP + body, private), count=1
        ),
    }


def cpu_per_check(path: str, port: int, rounds: int) -> float:
    from mailingest.extraction.checker import verify

    request = {
        "raw_path": path, "resolver": ["127.0.0.1", port], "client_ip": "127.0.0.1", "helo": f"host.{DOMAIN}",
        "mail_from": SENDER, "authserv_id": "mailingest.bench", "budget": 5.0,
    }
    verify(request)  # the DNS answers cached, as for a sender checked a moment ago
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        verify(request)
        best = min(best, time.thread_time() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crafted_checks")
    parser.add_argument("--only", action="append", help="a case whose name starts so")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    private, record = keys()
    dns = subprocess.Popen([sys.executable, "-m", "bench.dns_stub", "--dkim-key", record], stdout=subprocess.PIPE, cwd=REPO)
    try:
        port = int(dns.stdout.readline())
        with tempfile.TemporaryDirectory() as directory:
            print(f"| message | size | check CPU ms (best of {args.rounds}) |\n| --- | ---: | ---: |")
            for name, build in cases(private).items():
                if args.only and not any(name.startswith(o) for o in args.only):
                    continue
                message = build()
                path = os.path.join(directory, "m.eml")
                with open(path, "wb") as f:
                    f.write(message)
                spent = cpu_per_check(path, port, args.rounds)
                print(f"| {name} | {len(message) / 1024:,.0f} KiB | {spent * 1000:,.2f} |", flush=True)
    finally:
        dns.terminate()


if __name__ == "__main__":
    main()
