"""
One round of each kind of measurement, against a server started for it.

  throughput  smtp-source at one size against any target
  drain       100 KiB messages with a PDF each against mailingest: how long
              the extraction queue takes to empty once the load has ended
  big         four 50 MiB messages at once against mailingest: peak RSS

Every round checks that what the load tool saw accepted was kept.
"""

import os
import re
import time
from dataclasses import dataclass

from bench.load import send_threaded, smtp_source
from bench.messages import large_message, pdf_messages
from bench.targets import Mailingest, Target

POLL_SECONDS = 0.01
DRAIN_TIMEOUT = 120.0
MiB = 1 << 20


@dataclass(frozen=True)
class ThroughputSample:
    size: int
    sessions: int
    target: str
    role: str
    sent: int
    stored: int
    seconds: float
    peak_rss_mb: float
    queued_at_end: int | None
    errors: tuple[str, ...]
    asked: int = 0  # messages the load tool was asked to send
    cpu_seconds: float = 0.0  # the server's CPU time (all its processes) during the load
    done_cpu_seconds: float = 0.0  # the same until it was done with every message (extracted, queue empty)
    system_seconds: float = 0.0  # the kernel's part of cpu_seconds

    @property
    def cpu_ms_per_message(self) -> float:
        return self.cpu_seconds * 1000 / self.sent if self.sent else float("nan")

    @property
    def system_ms_per_message(self) -> float:
        return self.system_seconds * 1000 / self.sent if self.sent else float("nan")

    @property
    def done_cpu_ms_per_message(self) -> float:
        return self.done_cpu_seconds * 1000 / self.sent if self.sent else float("nan")

    @property
    def msg_per_s(self) -> float:
        return self.sent / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.sent * self.size / self.seconds / MiB


@dataclass(frozen=True)
class DrainSample:
    target: str
    messages: int
    size: int
    sent: int
    stored: int
    send_seconds: float
    queued_at_end: int
    drain_seconds: float  # from the last 250 to an empty queue; inf on timeout
    parsed: int
    failed: int
    documents: int
    peak_rss_mb: float
    errors: tuple[str, ...]


@dataclass(frozen=True)
class BigSample:
    target: str
    messages: int
    size: int
    sent: int
    stored: int
    seconds: float
    peak_rss_received_mb: float
    peak_rss_extracted_mb: float
    workers_peak_rss_mb: float
    extracted_seconds: float  # from the last 250 to an empty queue; inf on timeout
    errors: tuple[str, ...]


def throughput(target: Target, directory: str, size: int, messages: int, sessions: int) -> ThroughputSample:
    with target.make(directory) as server:
        user_before, system_before = server.cpu_times()
        cpu_before = user_before + system_before
        load = smtp_source(server.port, size, messages, sessions)
        user, system = server.cpu_times()
        cpu, system = user + system - cpu_before, system - system_before
        server.check_alive()
        queued = server.queued() if isinstance(server, Mailingest) else None
        stored = server.stored()
        peak = server.peak_rss_mb()
        wait_until_done(server, time.monotonic())
        done_cpu = server.cpu_seconds() - cpu_before
    return ThroughputSample(
        size, sessions, target.name, target.role, load.sent, stored, load.seconds, peak, queued, tuple(load.errors), messages, cpu,
        done_cpu, system,
    )


def wait_until_done(server, since: float) -> float:
    """Seconds from C{since} (a monotonic time) until the server has no work left on what it accepted."""
    while server.busy():
        if time.monotonic() - since > DRAIN_TIMEOUT:
            return float("inf")
        time.sleep(POLL_SECONDS)
    return time.monotonic() - since


def drain(target: Target, directory: str, messages: int, size: int, connections: int) -> DrainSample:
    outgoing = pdf_messages(messages, size)
    with target.make(directory) as server:
        assert isinstance(server, Mailingest), "only mailingest extracts"
        load = send_threaded(server.port, outgoing, connections)
        queued = server.queued()
        drained = wait_until_done(server, load.ended_at)
        server.check_alive()
        count = server.count
        return DrainSample(
            target.name,
            messages,
            size,
            load.sent,
            server.stored(),
            load.seconds,
            queued,
            drained,
            count("SELECT COUNT(*) FROM inbound_message WHERE status = 'parsed'"),
            count("SELECT COUNT(*) FROM inbound_message WHERE status = 'failed'"),
            count("SELECT COUNT(*) FROM document"),
            server.peak_rss_mb(),
            tuple(load.errors),
        )


def big(target: Target, directory: str, messages: int, size: int) -> BigSample:
    outgoing = [large_message(size) for _ in range(messages)]
    with target.make(directory) as server:
        assert isinstance(server, Mailingest), "only mailingest extracts"
        load = send_threaded(server.port, outgoing, messages)
        server.check_alive()
        received_peak = server.peak_rss_mb()
        extracted = wait_until_done(server, load.ended_at)
        server.check_alive()
        return BigSample(
            target.name,
            messages,
            size,
            load.sent,
            server.stored(),
            load.seconds,
            received_peak,
            server.peak_rss_mb(),
            server.workers_peak_rss_mb(),
            extracted,
            tuple(load.errors),
        )


def round_directory(workdir: str, label: str) -> str:
    """A fresh directory per round, named so a kept work directory is easy to read."""
    path = os.path.join(workdir, re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_"))
    os.makedirs(path)
    return path
