"""
What extraction makes of a corpus, before and after a change, in one table per run.

    python -m bench.extraction_table [--corpus DIR] [--base REV]

Each folder of C{--corpus} (default: tests/samples) is a set, plus C{tnef}: the
winmail.dat samples of L{tests.tnef_builder}, each sent as the attachment of a
message. Every file is given to L{extract_attachments} directly (no daemon),
once with this tree's code and once with C{--base}'s (default C{main}),
exported with C{git archive} into a temporary folder and imported from there.
Per set: messages, documents, parsed, failed, messages with warnings, and the
parts skipped (undecodable, named in the warnings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_MESSAGES = ("LICENSE", "README.md")
COLUMNS = ("set", "messages", "documents", "parsed", "failed", "warnings", "skipped parts")


def write_tnef_messages(folder: str) -> None:
    """The TNEF samples, each as the winmail.dat of an Outlook-like message."""
    sys.path.insert(0, ROOT)
    from tests.tnef_builder import samples

    for name, data in samples().items():
        from email.message import EmailMessage

        msg = EmailMessage()
        msg["From"] = "buyer@example.net"
        msg["To"] = "orders+acme@example.com"
        msg["Subject"] = f"TNEF sample {name}"
        msg.set_content("Please see the attached order.\n")
        msg.add_attachment(data, maintype="application", subtype="ms-tnef", filename="winmail.dat")
        with open(os.path.join(folder, name + ".eml"), "wb") as f:
            f.write(msg.as_bytes())


def measure(sets: dict[str, str]) -> dict[str, dict[str, int]]:
    """Run the extraction of the C{mailingest} on sys.path over every file of every set."""
    from mailingest.extraction.attachments import UnparseableMessage, extract_attachments

    table = {}
    for name, folder in sets.items():
        row = dict.fromkeys(COLUMNS[1:], 0)
        paths = (os.path.join(top, f) for top, _, files in os.walk(folder) for f in files if f not in NOT_MESSAGES)
        for path in sorted(paths):
            row["messages"] += 1
            with tempfile.TemporaryDirectory() as out:
                try:
                    result = extract_attachments(path, out)
                except UnparseableMessage:
                    row["failed"] += 1
                    continue
            row["parsed"] += 1
            row["documents"] += len(result.attachments)
            row["warnings"] += any(w != "no attachments" for w in result.warnings)
            row["skipped parts"] += len(getattr(result, "skipped", []))
        table[name] = row
    return table


def export(rev: str, into: str) -> None:
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "mailingest"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)


def print_table(title: str, table: dict[str, dict[str, int]]) -> None:
    print(f"\n{title}")
    print(" | ".join(COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    totals = dict.fromkeys(COLUMNS[1:], 0)
    for name, row in table.items():
        print(" | ".join([name] + [str(row[c]) for c in COLUMNS[1:]]))
        for c in COLUMNS[1:]:
            totals[c] += row[c]
    print(" | ".join(["all"] + [str(totals[c]) for c in COLUMNS[1:]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--corpus", default=os.path.join(ROOT, "tests", "samples"), metavar="DIR")
    parser.add_argument("--base", default="main", metavar="REV", help="the code to compare with [main]")
    parser.add_argument("--measure", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        import mailingest

        print(json.dumps({"code": os.path.dirname(mailingest.__file__), "sets": measure(json.loads(args.measure))}))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        tnef = os.path.join(scratch, "tnef")
        os.makedirs(tnef)
        write_tnef_messages(tnef)
        sets = {
            name: os.path.join(args.corpus, name)
            for name in sorted(os.listdir(args.corpus))
            if os.path.isdir(os.path.join(args.corpus, name))
        }
        sets["tnef"] = tnef
        base = os.path.join(scratch, "base")
        os.makedirs(base)
        export(args.base, base)
        tables = {}
        for label, path in ((f"before ({args.base})", base), ("after (this tree)", ROOT)):
            # Run as a script, so that PYTHONPATH decides which mailingest is imported.
            run = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(sets)],
                env={**os.environ, "PYTHONPATH": path},
                check=True,
                stdout=subprocess.PIPE,
            )
            tables[label] = json.loads(run.stdout)
    for label, measured in tables.items():
        print_table(f"{label}: {measured['code']}", measured["sets"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
