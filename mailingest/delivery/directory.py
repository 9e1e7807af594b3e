"""
Which organisations are active, and which custom domains are verified: the
cache behind every RCPT TO.
"""

from twisted.internet import defer
from twisted.logger import Logger

from mailingest.interfaces import IDomainRoutes, IIntakeStore
from mailingest.periodic import PeriodicService

log = Logger(namespace="mailingest.delivery")


class OrgDirectory(PeriodicService):
    """
    Which organisations are active, answered without a database round trip for
    known ones. The cache is refreshed every C{refresh} seconds (so disabling
    takes effect within that), a slug missing from it is looked up at once (so
    a new organisation is never refused), and the last good list keeps serving
    while the database is down.

    The verified custom domains are refreshed on the same loop, but re-read
    only when the store's routing table version moved: a domain added,
    verified, suspended or removed takes effect within C{refresh} seconds,
    and 10,000 of them cost one small query per refresh. A domain missing
    from the cache is not looked up: unknown domains are refused without a
    database round trip, however many a client tries.
    """

    at_start = True

    def __init__(self, store: "IIntakeStore | IDomainRoutes", refresh: float = 2.0, clock=None):
        super().__init__(refresh, clock)
        self.store = store
        self._active: dict[str, int] = {}
        self._domains: dict[str, dict] = {}
        self._domains_version: int | None = None

    async def run(self) -> None:
        await self.refresh()

    @defer.inlineCallbacks
    def refresh(self):
        try:
            self._active = yield self.store.active_orgs()
        except Exception as e:
            log.warn("organisation list refresh failed: {error}", error=str(e))
        try:
            version, domains = yield self.store.routed_domains(self._domains_version)
        except Exception as e:
            log.warn("custom domain list refresh failed: {error}", error=str(e))
            return
        if domains is not None:
            self._domains = {d["domain"]: d for d in domains}
            self._domains_version = version

    def domain(self, key: str) -> dict | None:
        """The verified custom domain C{key} (its stored form): C{org_id}, C{slug}, C{local_parts}; else None."""
        return self._domains.get(key)

    def lookup(self, slug: str) -> defer.Deferred:
        """Fire with the organisation id when C{slug} is active, else None."""
        if slug in self._active:
            return defer.succeed(self._active[slug])
        return self.store.get_org(slug).addCallback(self._found, slug)

    def _found(self, org, slug):
        if org is None or not org["active"]:
            return None
        self._active[slug] = org["id"]
        return org["id"]
