"""The benchmarks' figures: percentiles of timed samples, and a measure of the store run under a reactor and printed as a two-column table."""

import time
from collections.abc import Awaitable, Callable


def percentile(ordered: list[float], share: float) -> float:
    """The sample at C{share} (0.5, 0.99) of C{ordered}, sorted: the nearest rank, no interpolation."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """The p50, p99 and largest of C{samples}."""
    ordered = sorted(samples)
    return percentile(ordered, 0.5), percentile(ordered, 0.99), ordered[-1]


async def timed(call: Callable[[], Awaitable[object]], repeat: int) -> list[float]:
    """C{call()} awaited C{repeat} times, one after another: each one's time in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def print_figures(measure: Callable[..., Awaitable[dict[str, str]]], *args) -> int:
    """Run C{measure(*args)} (a coroutine function giving named figures) in a reactor; print them; the exit status."""
    from twisted.internet import defer, task

    figures: dict[str, str] = {}

    async def run():
        figures.update(await measure(*args))

    try:
        task.react(lambda reactor: defer.ensureDeferred(run()))
    except SystemExit as e:
        if e.code:
            return e.code
    print("| measure | figure |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value} |")
    return 0
