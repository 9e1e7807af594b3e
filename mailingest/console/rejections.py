"""
Rejections over the last hour for the console's status page: the same
counters C{/metrics} exports, sampled into a small ring, so the page shows a
difference over an hour instead of totals since the daemon started.
"""

from collections import deque

from twisted.internet.interfaces import IReactorTime

from mailingest.ops import metrics

SAMPLE_SECONDS = 60.0
WINDOW_SECONDS = 3600.0


def rejected_totals() -> dict[str, float]:
    """The current C{mailingest_rejected_total} by reason (with C{--processes}, the intake processes' too)."""
    totals = {}
    for family in metrics.families(metrics.REJECTED):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals[sample.labels["reason"]] = sample.value
    return totals


class RejectionHistory:
    """Samples taken every L{SAMPLE_SECONDS}; an hour of them and one more."""

    def __init__(self, clock: IReactorTime, read=rejected_totals):
        self.clock = clock
        self.read = read
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(WINDOW_SECONDS / SAMPLE_SECONDS) + 1)

    def sample(self) -> None:
        self.samples.append((self.clock.seconds(), self.read()))

    def last_hour(self) -> dict[str, int]:
        """Rejections by reason since the oldest sample of the last hour (all of them, if younger)."""
        now = self.clock.seconds()
        base: dict[str, float] = {}
        for taken, totals in self.samples:
            if now - taken <= WINDOW_SECONDS:
                base = totals
                break
        current = self.read()
        return {reason: int(value - base.get(reason, 0)) for reason, value in sorted(current.items()) if value - base.get(reason, 0) > 0}
