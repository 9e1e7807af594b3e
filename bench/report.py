"""
The results as one markdown report: the throughput table, the extraction
drain and large-message lines, and the issue's targets checked against them.

Per size and target the table shows the median of the rounds (msg/s, MB/s),
the ratios of those medians, the highest peak RSS seen and the totals of
stored and sent messages over all rounds.
"""

import math
from collections.abc import Sequence
from statistics import median

from bench.rounds import BigSample, DrainSample, ThroughputSample

MiB = 1 << 20
# Issue 29: 1 KiB at 1.5 times the faster of aiosmtpd and the Postfix queue,
# in at most 1.1 ms of CPU per message all done; 10 MiB at 1.5 times smtp-sink.
TARGET_VS_BASELINE_1K = 1.5
TARGET_CPU_MS_1K = 1.1
TARGET_VS_SINK_10M = 1.5
TARGET_RSS_MB = 150  # the "150 MB", checked as 150 * 10**6 bytes, the stricter reading
TARGET_DRAIN_SECONDS = 2.0


def human_size(size: int) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def _ratio(value: float, reference: float | None) -> str:
    return "—" if not reference else f"{value / reference:.2f}×"


def _seconds(value: float) -> str:
    return "timed out" if math.isinf(value) else f"{value:.2f} s"


class Row:
    """One (size, target) line of the table: the medians of its rounds."""

    def __init__(self, samples: Sequence[ThroughputSample]):
        first = samples[0]
        self.size, self.sessions, self.target, self.role = first.size, first.sessions, first.target, first.role
        self.msg_per_s = median(s.msg_per_s for s in samples)
        self.mb_per_s = median(s.mb_per_s for s in samples)
        self.peak_rss_mb = max(s.peak_rss_mb for s in samples)
        self.cpu_ms_per_message = median(s.cpu_ms_per_message for s in samples)
        self.done_cpu_ms_per_message = median(s.done_cpu_ms_per_message for s in samples)
        self.system_ms_per_message = median(s.system_ms_per_message for s in samples)
        self.sent = sum(s.sent for s in samples)
        self.stored = sum(s.stored for s in samples)
        self.errors = [e for s in samples for e in s.errors]
        self.rounds = len(samples)

    @property
    def complete(self) -> bool:
        return self.stored == self.sent and not self.errors


def rows_of(samples: Sequence[ThroughputSample]) -> list[Row]:
    groups: dict[tuple[int, str], list[ThroughputSample]] = {}
    for sample in samples:
        groups.setdefault((sample.size, sample.target), []).append(sample)
    return [Row(group) for group in groups.values()]


def _reference(rows: Sequence[Row], size: int, role: str) -> float | None:
    for row in rows:
        if row.size == size and row.role == role:
            return row.msg_per_s
    return None


def throughput_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| size | sessions | target | msg/s | MiB/s | ratio vs aiosmtpd | ratio vs sink | CPU ms/msg | of which kernel | CPU ms/msg, all done | peak RSS MiB | stored/sent |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        kept = f"{row.stored}/{row.sent}" + ("" if row.complete else " ⚠")
        lines.append(
            f"| {human_size(row.size)} | {row.sessions} | {row.target} | {row.msg_per_s:,.0f} "
            f"| {row.mb_per_s:,.1f} | {_ratio(row.msg_per_s, _reference(rows, row.size, 'baseline'))} "
            f"| {_ratio(row.msg_per_s, _reference(rows, row.size, 'sink'))} | {row.cpu_ms_per_message:,.2f} "
            f"| {row.system_ms_per_message:,.2f} "
            f"| {row.done_cpu_ms_per_message:,.2f} | {row.peak_rss_mb:,.0f} | {kept} |"
        )
    return lines


def drain_lines(samples: Sequence[DrainSample]) -> list[str]:
    lines = []
    for target in dict.fromkeys(s.target for s in samples):
        mine = [s for s in samples if s.target == target]
        first = mine[0]
        rate = median(s.sent / s.send_seconds for s in mine)
        drained = [s.queued_at_end / s.drain_seconds for s in mine if s.queued_at_end and s.drain_seconds > 0]
        extraction = f", then extracted at {median(drained):,.0f} msg/s" if drained else ""
        lines.append(
            f"- Extraction drain, {target}: {first.messages} × {human_size(first.size)} messages with one PDF each per round, "
            f"{len(mine)} round(s): queue empty **{_seconds(median(s.drain_seconds for s in mine))}** after the "
            f"last 250 (median; worst {_seconds(max(s.drain_seconds for s in mine))}); still queued at load end: "
            f"{', '.join(str(s.queued_at_end) for s in mine)}; received at {rate:,.0f} msg/s{extraction}; "
            f"stored/sent {sum(s.stored for s in mine)}/{sum(s.sent for s in mine)}, "
            f"parsed {sum(s.parsed for s in mine)}, failed {sum(s.failed for s in mine)}, "
            f"documents {sum(s.documents for s in mine)}; peak RSS {max(s.peak_rss_mb for s in mine):,.0f} MiB."
            + _errors(e for s in mine for e in s.errors)
        )
    return lines


def big_lines(samples: Sequence[BigSample]) -> list[str]:
    return [
        f"- {s.messages} × {human_size(s.size)} at once, {s.target}: all received in {s.seconds:.1f} s, "
        f"stored/sent {s.stored}/{s.sent}; peak RSS **{s.peak_rss_received_mb:,.0f} MiB** after receiving, "
        f"{s.peak_rss_extracted_mb:,.0f} MiB once extracted ({_seconds(s.extracted_seconds)} after the last 250); "
        f"the parser worker peaked at {s.workers_peak_rss_mb:,.0f} MiB."
        + _errors(s.errors)
        for s in samples
    ]


def _errors(errors) -> str:
    errors = list(errors)
    return f" ⚠ {len(errors)} error(s), first: {errors[0]}" if errors else ""


def _verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def sustained_lines(sustained: Sequence[ThroughputSample]) -> list[str]:
    return [
        f"- Sustained, {s.target}: {s.asked:,} × {human_size(s.size)} over {s.sessions} sessions in one round, "
        f"{s.msg_per_s:,.0f} msg/s; stored/sent {s.stored}/{s.sent}; peak RSS {s.peak_rss_mb:,.0f} MiB" + _errors(s.errors)
        for s in sustained
    ]


def target_lines(
    rows: Sequence[Row], drains: Sequence[DrainSample], bigs: Sequence[BigSample], sustained: Sequence[ThroughputSample] = ()
) -> list[str]:
    """The issue's targets, for each mailingest backend that was measured."""
    lines = []
    for row in rows:
        if row.role != "mailingest":
            continue
        references = {
            name: rate
            for name, role in (("aiosmtpd", "baseline"), ("the Postfix queue", "queue"))
            if (rate := _reference(rows, row.size, role))
        }
        sink = _reference(rows, row.size, "sink")
        if row.size == 1024 and row.sessions == 20:
            if references:
                faster = max(references, key=references.get)
                ratio = row.msg_per_s / references[faster]
                lines.append(
                    f"- 1 KiB, 20 sessions, {row.target}: {ratio:.2f}× {faster}'s msg/s, the faster baseline "
                    f"(target ≥ {TARGET_VS_BASELINE_1K}×): {_verdict(ratio >= TARGET_VS_BASELINE_1K and row.complete)}"
                )
            lines.append(
                f"- 1 KiB, 20 sessions, {row.target}: {row.done_cpu_ms_per_message:.2f} CPU ms per message all done "
                f"(target ≤ {TARGET_CPU_MS_1K}): {_verdict(row.done_cpu_ms_per_message <= TARGET_CPU_MS_1K and row.complete)}"
            )
        if row.size == 10 * MiB and sink:
            ratio = row.msg_per_s / sink
            lines.append(
                f"- 10 MiB, {row.target}: {ratio:.2f}× smtp-sink's MB/s "
                f"(target ≥ {TARGET_VS_SINK_10M}×): {_verdict(ratio >= TARGET_VS_SINK_10M and row.complete)}"
            )
    for s in bigs:
        in_mb = s.peak_rss_received_mb * MiB / 1e6
        lines.append(
            f"- Peak RSS after receiving {s.messages} × {human_size(s.size)} at once, {s.target}: "
            f"{s.peak_rss_received_mb:,.0f} MiB = {in_mb:,.0f} MB (target ≤ {TARGET_RSS_MB} MB): "
            f"{_verdict(in_mb <= TARGET_RSS_MB and s.stored == s.messages)}; after extracting them: "
            f"{s.peak_rss_extracted_mb:,.0f} MiB (parser worker: {s.workers_peak_rss_mb:,.0f} MiB)"
        )
    for s in sustained:
        exact = s.stored == s.sent == s.asked and not s.errors
        lines.append(
            f"- {s.asked:,} × {human_size(s.size)} in one round, {s.target}: stored {s.stored} of {s.sent} "
            f"accepted (target: exactly what was sent): {_verdict(exact)}"
        )
    for target in dict.fromkeys(s.target for s in drains):
        worst = max(s.drain_seconds for s in drains if s.target == target)
        lines.append(
            f"- Extraction keeps up, {target}: queue empty {_seconds(worst)} after the load in the worst "
            f"round (target ≤ {TARGET_DRAIN_SECONDS:g} s): {_verdict(worst <= TARGET_DRAIN_SECONDS)}"
        )
    return lines


def render(
    title: str,
    notes: Sequence[str],
    samples: Sequence[ThroughputSample],
    drains: Sequence[DrainSample],
    bigs: Sequence[BigSample],
    sustained: Sequence[ThroughputSample] = (),
) -> str:
    rows = rows_of(samples)
    parts = [f"## {title}", "", *notes, ""]
    if rows:
        parts += throughput_table(rows) + [""]
    if drains or bigs or sustained:
        parts += drain_lines(drains) + big_lines(bigs) + sustained_lines(sustained) + [""]
    checks = target_lines(rows, drains, bigs, sustained)
    if checks:
        parts += ["Targets (issue):", "", *checks, ""]
    return "\n".join(parts)
