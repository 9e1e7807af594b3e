"""Running one measure of the store under a reactor, and printing its figures as a two-column table."""

from collections.abc import Awaitable, Callable


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
