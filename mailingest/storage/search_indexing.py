"""Keeping SQLite's search index, a file of its own, up to date behind intake while the daemon runs."""

from twisted.logger import Logger

from mailingest.interfaces import ISchemaStore
from mailingest.periodic import PeriodicService

log = Logger()

# How often the index looks for messages that came, changed or went: a search
# reads the newest messages it does not hold yet, so this only bounds how
# many those are.
INTERVAL = 0.25


class SearchIndexService(PeriodicService):
    """
    Every L{INTERVAL} seconds, L{ISchemaStore.index_search}: the messages
    stored since the last run go into the index in one transaction of its own
    file (a burst in several), those changed or erased leave it. Nothing on
    PostgreSQL.
    """

    name = "search-index"
    at_start = True

    def __init__(self, store: ISchemaStore, interval: float = INTERVAL, clock=None):
        super().__init__(interval, clock)
        self.store = store
        self._failing = False

    async def run(self) -> None:
        try:
            # A stop waits for one transaction of the index, not for all it has to do (a rewrite: seconds).
            await self.store.index_search(lambda: self.running)
        except Exception as e:
            # Once per spell of failures (a full disk, a broken file): the search reads the newest messages meanwhile.
            if not self._failing:
                log.error("search index: not kept up to date: {error}", error=str(e))
            self._failing = True
        else:
            if self._failing:
                log.info("search index: kept up to date again")
            self._failing = False
