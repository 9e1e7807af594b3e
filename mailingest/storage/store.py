"""
The one store over SQLite and PostgreSQL, composed of its roles.

Every query is written once, in the module of its role
(L{mailingest.storage.stores}: how the roles share a transaction is told
there); the engine (L{mailingest.storage.engines}) supplies the connection
pool, the placeholder style and the few clauses the two databases spell
differently. Callers name the role they need (L{mailingest.interfaces}):
the daemon opens one L{Store} and hands each part of itself that store as
the role it uses.
"""

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailingest.interfaces import IStore, IWebhookEvents

from mailingest.storage.engines import IEngine, create_engine
from mailingest.storage.stores.domains import DomainStore
from mailingest.storage.stores.intake import IntakeStore
from mailingest.storage.stores.message_search import MessageSearchStore
from mailingest.storage.stores.orgs import OrgStore
from mailingest.storage.stores.outbox import OutboxStore
from mailingest.storage.stores.quarantine import VERDICT_COLUMNS, QuarantineStore
from mailingest.storage.stores.queue import ExtractionQueueStore
from mailingest.storage.stores.reads import ReadStore
from mailingest.storage.stores.holds import HoldStore
from mailingest.storage.stores.retention import RetentionStore
from mailingest.storage.statuses import EVENT_STATUSES, MESSAGE_STATUSES
from mailingest.storage.stores.schema import SchemaStore, migrations

__all__ = ["Store", "open_store", "migrations", "VERDICT_COLUMNS", "MESSAGE_STATUSES", "EVENT_STATUSES"]


@implementer(IStore)
class Store(
    SchemaStore, OrgStore, IntakeStore, ExtractionQueueStore, QuarantineStore, OutboxStore, ReadStore, MessageSearchStore,
    RetentionStore, HoldStore, DomainStore,
):
    """
    Every role on one engine: what C{--database} opens. C{events} says which
    status changes write an event to the outbox (the webhook side's
    L{mailingest.handoff.events.MESSAGE_EVENTS}).
    """

    def __init__(self, engine: IEngine, events: IWebhookEvents, clock: IReactorTime | None = None):
        super().__init__(engine, events, clock)


def open_store(url: str, events: IWebhookEvents) -> Store:
    """The store on the database of C{--database}."""
    return Store(create_engine(url), events)
