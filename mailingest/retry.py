"""
The one way mailingest tries again: a L{Backoff} policy (how long to wait
before each retry) and L{retry} (call, and on failure wait and call again for
as long as the caller's C{should_retry} agrees).

Time is kept by the C{clock} given (the reactor, or a L{twisted.internet.task.Clock}
in tests), so every retrying loop is tested without sleeping. No jitter: the
delays are the ones the README promises.

This module imports nothing of mailingest: every layer may use it.
"""

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """
    Wait C{initial} seconds before the first retry, C{factor} times longer
    before each next one, never more than C{maximum}.
    """

    initial: float
    factor: float = 2.0
    maximum: float = float("inf")

    def delay(self, retry: int) -> float:
        """The wait before retry number C{retry} (1 for the first)."""
        return min(self.initial * self.factor ** (retry - 1), self.maximum)

    def delays(self) -> Iterator[float]:
        """The waits before the first, second, ... retry."""
        retry = 1
        while True:
            yield self.delay(retry)
            retry += 1


async def retry(
    call: Callable[[], Awaitable[T] | T],
    policy: Backoff,
    should_retry: Callable[[Exception, int, float], bool],
    clock: IReactorTime,
) -> T:
    """
    The result of C{call()}, calling it again after each failure while
    C{should_retry(error, retry, delay)} says so: C{retry} is the number of the
    retry it would be (1 for the first), C{delay} the wait before it; it is
    also the place to log the failure. The last error is raised when it
    declines. Cancelling the Deferred of this coroutine stops the waiting.
    """
    delays = policy.delays()
    retries = 0
    while True:
        try:
            return await defer.maybeDeferred(call)
        except defer.CancelledError:
            raise
        except Exception as error:
            retries += 1
            delay = next(delays)
            if not should_retry(error, retries, delay):
                raise
        await task.deferLater(clock, delay, lambda: None)
