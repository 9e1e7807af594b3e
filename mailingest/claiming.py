"""
Workers that take claimed work from the database until none is due: the
loop the extraction service (messages) and the webhook sender (events) share.
"""

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet import defer


class ClaimWorkers:
    """
    One worker per free slot, each claiming a batch with C{claim()} and
    handing it to C{handle(batch, slot)} until a claim comes back empty, while
    C{running()}. L{wake} starts a worker in every free slot; a wake while a
    worker is claiming makes it claim once more on an empty answer, so work
    written meanwhile does not wait for the next poll. A claim that fails ends
    its worker (C{failed(error)} reports it); the next wake tries again.
    """

    def __init__(
        self,
        slots: Sequence[Any],
        claim: Callable[[], Awaitable[list]],
        handle: Callable[[list, Any], Awaitable[None]],
        failed: Callable[[Exception], None],
        running: Callable[[], bool],
    ):
        self._free = list(slots)
        self._claim = claim
        self._handle = handle
        self._failed = failed
        self._running = running
        self._working: list[defer.Deferred] = []
        self._woken = False

    def wake(self) -> None:
        if not self._running():
            return
        self._woken = True
        for _ in range(len(self._free)):
            slot = self._free.pop()
            d = defer.ensureDeferred(self._work(slot))
            self._working.append(d)
            d.addBoth(self._done, d, slot)

    def _done(self, result, d: defer.Deferred, slot) -> None:
        self._working.remove(d)
        self._free.append(slot)

    async def _work(self, slot) -> None:
        while self._running():
            self._woken = False
            try:
                batch = await self._claim()
            except Exception as e:
                self._failed(e)
                return
            if not batch:
                if self._woken:
                    continue
                return
            await self._handle(batch, slot)

    def in_hand(self, timeout: float, clock) -> defer.Deferred:
        """Fires when the batches in hand are done with, or after C{timeout} seconds."""
        d = defer.DeferredList(list(self._working))
        d.addTimeout(timeout, clock, onTimeoutCancel=lambda *_: None)
        return d
