"""
The benchmark run: which rounds, in which order, and the report at the end.

Rounds alternate between targets (smtp-sink, aiosmtpd, mailingest, smtp-sink,
...) rather than running all of one target then all of the next, so a slow
drift of the machine (page cache, thermal, a neighbour) lands on every target
alike. The exit status says whether every accepted message was kept, not
whether a speed target was met: a benchmark is not a test.
"""

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from bench import disk_probe, report, rounds
from bench.backends import Backend
from bench.targets import Target, TargetError, targets, tool

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = "1k,100k,10m"
INSTALL_HINT = (
    "smtp-source and smtp-sink come with Postfix: "
    "apt-get install postfix && postfix stop (Debian/Ubuntu; add them to PATH or leave them in /usr/sbin)"
)


@dataclass(frozen=True)
class SizePlan:
    size: int
    messages: int
    sessions: int


@dataclass(frozen=True)
class Plan:
    sizes: list[SizePlan]
    rounds: int
    drain_messages: int
    drain_size: int = 100 * KiB
    drain_connections: int = 10
    big_messages: int = 4
    big_size: int = 50 * MiB
    sustained_messages: int = 30000
    sustained_size: int = KiB
    sustained_sessions: int = 20


def parse_size(text: str) -> int:
    """C{1k}, C{100KiB}, C{10m}, C{2048}: binary units, as smtp-source's -l takes bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1k, 100k, 10m")
    scale = {"": 1, "k": KiB, "m": MiB}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def size_plan(size: int, quick: bool) -> SizePlan:
    """
    20 sessions for small messages (the issue's 1 KiB case), fewer for large
    ones; about 100 MiB per round (10 MiB with --quick), between 30 and 10000
    messages, so a round lasts seconds at every size.
    """
    sessions = 20 if size <= 64 * KiB else 10 if size <= MiB else 4
    budget, floor, cap = (10 * MiB, 4, 1000) if quick else (100 * MiB, 30, 10000)
    return SizePlan(size, min(cap, max(floor, budget // size)), sessions)


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark mailingest against smtp-sink and an aiosmtpd baseline (see bench/README.md).",
    )
    parser.add_argument("--quick", action="store_true", help="few messages and one round: a smoke run under a minute")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes for smtp-source [{DEFAULT_SIZES}]")
    parser.add_argument("--rounds", type=int, help="rounds per size and target; medians are reported [3, --quick: 1]")
    parser.add_argument("--postgres", metavar="DSN", help="also run mailingest on PostgreSQL (a fresh database per round is created on this server)")
    parser.add_argument("--s3", metavar="s3://BUCKET[/PREFIX]", help="also run mailingest on S3 storage (existing bucket; AWS_* credentials)")
    parser.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for --s3 (MinIO, Ceph...)")
    parser.add_argument(
        "--sustained", type=int, metavar="N",
        help="messages of the one long 1 KiB round per mailingest target, whose count of stored messages must match; 0 skips it [30000, --quick: 3000]",
    )
    parser.add_argument("--clamd", metavar="ENDPOINT", help="mailingest scans with this clamd (--clamd of the daemon) [off]")
    parser.add_argument("--rspamd", metavar="URL", help="mailingest asks this rspamd for spam verdicts (--rspamd of the daemon) [off]")
    parser.add_argument("--processes", default="1", help="mailingest --processes values to compare, e.g. 1,2,auto [1]")
    parser.add_argument("--workdir", help="where to create the run's scratch directory [system temp dir]")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (server logs, stored data)")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.processes = [p.strip() for p in args.processes.split(",") if p.strip()]
    if any(p != "auto" and not (p.isdigit() and int(p) >= 1) for p in args.processes):
        parser.error("--processes takes counts of at least 1 or 'auto', e.g. 1,2,auto")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.sustained is None:
        args.sustained = 3000 if args.quick else 30000
    if args.sustained < 0:
        parser.error("--sustained must be 0 or more")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    return Plan(
        sizes=[size_plan(size, args.quick) for size in args.sizes],
        rounds=args.rounds,
        drain_messages=60 if args.quick else 300,
        sustained_messages=args.sustained,
    )


def backends_of(args: argparse.Namespace) -> list[Backend]:
    scanners = {"clamd": args.clamd, "rspamd": args.rspamd}
    chosen = [Backend(**scanners)]
    if args.postgres or args.s3:
        chosen.append(Backend(postgres=args.postgres, s3=args.s3, s3_endpoint=args.s3_endpoint, **scanners))
    return chosen


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _postfix_version() -> str:
    if not shutil.which("dpkg-query"):
        return "unknown"
    found = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, text=True)
    return found.stdout if found.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def _filesystem(path: str) -> str:
    """The file system type under C{path}: fsync on tmpfs is free, which flatters every durable target."""
    path, best, kind = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                _, mountpoint, fstype = line.split()[:3]
                inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
                if inside and len(mountpoint) >= len(best):
                    best, kind = mountpoint, fstype
    except OSError:
        pass
    return kind


def notes(argv: list[str], plan: Plan, workdir: str, file_costs: list[float]) -> list[str]:
    """What a reader needs to compare this run with another."""
    sizes = ", ".join(f"{report.human_size(p.size)} × {p.messages} over {p.sessions} sessions" for p in plan.sizes)
    return [
        f"`{shlex.join(['python', '-m', 'bench', *argv])}` on {platform.node()}: {os.cpu_count()} × {_cpu_model()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}, mailingest {_version('mailingest')}, "
        f"Twisted {_version('Twisted')}, aiosmtpd {_version('aiosmtpd')}, postfix (smtp-source) {_postfix_version()}; "
        f"data under {workdir} ({_filesystem(workdir)}).",
        "",
        f"smtp-source -d (connections reused): {sizes}; {plan.rounds} round(s) per size, targets alternating; "
        "medians shown, peak RSS is the highest VmHWM over the rounds, stored/sent sums the rounds "
        "(smtp-sink: received, it keeps nothing). Sizes and MiB/s count smtp-source's payload (-l), not its headers.",
        "",
        "Creating a 1 KiB file in the data directory cost the kernel "
        + " µs at the start, ".join(f"{cost:,.0f}" for cost in file_costs)
        + f" µs{' at the end' if len(file_costs) > 1 else ''} ({disk_probe.FILES:,} files): every durable target "
        "creates a file per message, so its kernel CPU per message moves with this figure; compare runs where it is alike.",
    ]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Run:
    """Carries out a plan, collecting samples; prints a line per round as it goes."""

    def __init__(self, plan: Plan, chosen: list[Target], workdir: str):
        self.plan = plan
        self.targets = chosen
        self.workdir = workdir
        self.samples: list[rounds.ThroughputSample] = []
        self.drains: list[rounds.DrainSample] = []
        self.bigs: list[rounds.BigSample] = []
        self.sustained_samples: list[rounds.ThroughputSample] = []

    def _directory(self, label: str) -> str:
        done = len(self.samples) + len(self.drains) + len(self.bigs) + len(self.sustained_samples)
        return rounds.round_directory(self.workdir, f"{done:03d} {label}")

    def throughput(self) -> None:
        for sizing in self.plan.sizes:
            size = report.human_size(sizing.size)
            for n in range(1, self.plan.rounds + 1):
                for target in self.targets:
                    directory = self._directory(f"{size} {target.name} r{n}")
                    s = rounds.throughput(target, directory, sizing.size, sizing.messages, sizing.sessions)
                    self.samples.append(s)
                    queued = "" if s.queued_at_end is None else f", extraction queue at end {s.queued_at_end}"
                    progress(
                        f"[{size} round {n}/{self.plan.rounds}] {target.name}: {s.sent}/{sizing.messages} sent in "
                        f"{s.seconds:.2f} s, {s.msg_per_s:,.0f} msg/s, {s.mb_per_s:,.1f} MiB/s, stored {s.stored}, "
                        f"peak RSS {s.peak_rss_mb:,.0f} MiB{queued}" + "".join(f"\n    error: {e}" for e in s.errors)
                    )

    def extraction(self) -> None:
        for target in (t for t in self.targets if t.role == "mailingest"):
            for n in range(1, self.plan.rounds + 1):
                s = rounds.drain(
                    target, self._directory(f"drain {target.name} r{n}"),
                    self.plan.drain_messages, self.plan.drain_size, self.plan.drain_connections,
                )
                self.drains.append(s)
                progress(
                    f"[drain round {n}/{self.plan.rounds}] {target.name}: {s.sent} PDF messages in {s.send_seconds:.2f} s, "
                    f"{s.queued_at_end} queued at load end, empty after {s.drain_seconds:.2f} s; "
                    f"parsed {s.parsed}, failed {s.failed}, documents {s.documents}"
                )

    def large(self) -> None:
        for target in (t for t in self.targets if t.role == "mailingest"):
            s = rounds.big(target, self._directory(f"big {target.name}"), self.plan.big_messages, self.plan.big_size)
            self.bigs.append(s)
            progress(
                f"[{s.messages} × {report.human_size(s.size)}] {target.name}: {s.sent} sent in {s.seconds:.1f} s, "
                f"peak RSS {s.peak_rss_received_mb:,.0f} MiB received, {s.peak_rss_extracted_mb:,.0f} MiB extracted, "
                f"parser worker {s.workers_peak_rss_mb:,.0f} MiB"
            )

    def sustained(self) -> None:
        """One long round per mailingest target: every message smtp-source saw accepted must be stored."""
        plan = self.plan
        if not plan.sustained_messages:
            return
        for target in (t for t in self.targets if t.role == "mailingest"):
            directory = self._directory(f"sustained {target.name}")
            s = rounds.throughput(target, directory, plan.sustained_size, plan.sustained_messages, plan.sustained_sessions)
            self.sustained_samples.append(s)
            progress(
                f"[{s.sent:,} × {report.human_size(s.size)}] {target.name}: {s.msg_per_s:,.0f} msg/s, stored {s.stored}"
                + "".join(f"\n    error: {e}" for e in s.errors)
            )

    @property
    def complete(self) -> bool:
        """Every message the load tools saw accepted was kept, and no round saw an error."""
        throughput_ok = all(s.stored == s.sent and not s.errors for s in self.samples + self.sustained_samples)
        drains_ok = all(s.stored == s.sent == s.messages and not s.errors for s in self.drains)
        bigs_ok = all(s.stored == s.sent == s.messages and not s.errors for s in self.bigs)
        return throughput_ok and drains_ok and bigs_ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = arguments(argv)
    try:
        for program in ("smtp-source", "smtp-sink"):
            tool(program)
    except TargetError:
        print(f"bench: {INSTALL_HINT}", file=sys.stderr)
        return 2
    plan = plan_of(args)
    workdir = tempfile.mkdtemp(prefix="mailingest-bench-", dir=args.workdir)
    run = Run(plan, targets(backends_of(args), args.processes), workdir)
    file_costs = [disk_probe.file_creation_us(workdir)]
    started = time.monotonic()
    failure = None
    try:
        run.throughput()
        run.extraction()
        run.large()
        run.sustained()
    except (TargetError, OSError, subprocess.CalledProcessError) as e:
        failure = e
    finally:
        file_costs.append(disk_probe.file_creation_us(workdir))
        title = f"mailingest benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')}, {time.monotonic() - started:.0f} s)"
        print(report.render(title, notes(argv, plan, workdir, file_costs), run.samples, run.drains, run.bigs, run.sustained_samples))
        if args.keep or failure is not None:
            progress(f"bench: scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        print(f"bench: stopped early: {failure}", file=sys.stderr)
        return 1
    if not run.complete:
        print("bench: some accepted messages were not stored, or a round had errors (see ⚠ above)", file=sys.stderr)
        return 1
    return 0
