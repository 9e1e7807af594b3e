"""The loop of the daemon's periodic jobs (the blob sweeper, retention, the organisation directory, custom domain checks): one run every interval, the one in progress waited for at stop."""

from twisted.application import service
from twisted.internet import defer, task


class PeriodicService(service.Service):
    """
    Calls L{run} every C{interval} seconds (the first time at once when
    C{at_start}, else one interval after start). A run in progress is waited
    for at stop; it checks C{self.running} between its steps to end early.
    """

    at_start = False

    def __init__(self, interval: float, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.interval = interval
        self.clock = clock
        self._loop = None
        self._current = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.run_once)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=self.at_start)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._current is not None:
            return self._current

    def run_once(self) -> defer.Deferred:
        self._current = defer.ensureDeferred(self._guarded())
        return self._current

    async def _guarded(self) -> None:
        try:
            await self.run()
        finally:
            self._current = None

    async def run(self) -> None:
        raise NotImplementedError
