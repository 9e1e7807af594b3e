"""
What every store role shares: the engine, the clock, and the one
transaction helper through which every interaction runs (an C{async def}
taking a L{StorableTransaction}).
"""

import re
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailingest.storage.engines import IDatabaseTransaction, IEngine

MESSAGE_COLUMNS = (
    "id, org_id, source, source_message_id, mail_from, rcpt_to, subject, raw_key,"
    " raw_size, raw_sha256, status, attempts, last_error, received_at, parsed_at,"
    " content_sha256, message_id_collision"
    ", client_ip, helo, tls, spf, spf_domain, dkim, dkim_domain, dmarc, dmarc_domain,"
    " dmarc_policy, arc, arc_domain, authentication_results, quarantine_reason, released_at"
    ", warnings, rcpt_domain"
    ", virus, virus_detail, spam_action, spam_score, spam_required, spam_symbols, spam_detail, unscanned,"
    " infected_allowed_at, incinerated_at, incinerated_reason"
)


def select_with_org(table: str, alias: str, columns: str) -> str:
    """SELECT C{columns} of C{table} (as C{alias}) with its organisation's slug as C{org_slug}."""
    listed = ", ".join(f"{alias}.{column.strip()}" for column in columns.split(","))
    return f"SELECT {listed}, o.slug AS org_slug FROM {table} {alias} JOIN organization o ON o.id = {alias}.org_id"


MESSAGE_SELECT = select_with_org("inbound_message", "m", MESSAGE_COLUMNS)
ORG_SELECT = "SELECT id, slug, name, active, created_at FROM organization"
EVENT_COLUMNS = (
    "id, event_id, event_type, org_id, inbound_message_id, message_status, message_error,"
    " status, attempts, last_status, last_error, created_at, retry_from, next_attempt_at, delivered_at"
)
EVENT_SELECT = select_with_org("webhook_event", "e", EVENT_COLUMNS)

# Other daemons sharing the database are told of new messages on this channel.
RECEIVED_CHANNEL = "mailingest_received"
# ... and of new webhook events on this one.
EVENTS_CHANNEL = "mailingest_events"

# PostgreSQL refuses NUL in text; neither driver can encode a lone surrogate.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value):
    """A text value as both databases hold it: each NUL or lone surrogate becomes U+FFFD."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    return value


@implementer(IDatabaseTransaction)
class StorableTransaction:
    """
    The one place where text meets the database: every value bound to a
    statement goes through L{storable}, so sender-controlled text (a Subject
    decoding to NUL, a Content-Type with one) is stored the same on both
    engines instead of failing on PostgreSQL only.
    """

    def __init__(self, txn):
        self._txn = txn
        self.fetchall = txn.fetchall
        self.fetchone = txn.fetchone

    def execute(self, sql: str, args: tuple = ()):
        return self._txn.execute(sql, tuple(storable(value) for value in args))

    def read_within(self, seconds: float, sql: str, args: tuple = ()):
        return self._txn.read_within(seconds, sql, tuple(storable(value) for value in args))


def _storable_interaction(txn, fn: Callable[..., Coroutine], *args, **kwargs) -> defer.Deferred:
    # Engines run interactions that return Deferreds; ours are coroutines.
    return defer.Deferred.fromCoroutine(fn(StorableTransaction(txn), *args, **kwargs))


def org_row(row: dict | None) -> dict | None:
    if row is not None:
        row["active"] = bool(row["active"])
    return row


def message_row(row: dict | None) -> dict | None:
    if row is not None:
        row["message_id_collision"] = bool(row["message_id_collision"])
    return row


def conditions(**equal) -> tuple[str, tuple]:
    """A WHERE clause (or nothing) of C{column = ?} for each column given a value other than None."""
    given = {column: value for column, value in equal.items() if value is not None}
    return (" WHERE " + " AND ".join(f"{column} = ?" for column in given) if given else ""), tuple(given.values())


def marks(values) -> str:
    """One C{?} per value, for an C{IN (...)} list."""
    return ", ".join("?" for _ in values)


class StoreBase:
    """
    The engine and the clock every role runs on. C{clock} is an
    L{IReactorTime} like everywhere else in the package; rows are stamped
    with its C{seconds()} as UTC datetimes.
    """

    def __init__(self, engine: IEngine, clock: IReactorTime | None = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.engine = engine
        self.exclusive = engine.exclusive
        self.clock = clock

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.engine!r}>"

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def _run(self, fn: Callable[..., Coroutine], *args, **kwargs) -> defer.Deferred:
        """Run the coroutine function C{fn(txn, *args, **kwargs)} in one transaction."""
        return self.engine.interaction(_storable_interaction, fn, *args, **kwargs)

    def _read(self, fn: Callable[..., Coroutine], *args, **kwargs) -> defer.Deferred:
        """For the read model: a read-only transaction no write waits behind (see L{IEngine.reading})."""
        return self.engine.reading(_storable_interaction, fn, *args, **kwargs)

    def _index(self, fn: Callable[..., Coroutine], *args, **kwargs) -> defer.Deferred:
        """On SQLite: a transaction of the search index's own file (see the engine's C{search_index})."""
        return self.engine.search_index(_storable_interaction, fn, *args, **kwargs)

    def _background(self, fn: Callable[..., Coroutine], *args, **kwargs) -> defer.Deferred:
        """For work nobody waits on: it gives way to message inserts (see the SQLite engine)."""
        return self.engine.background(_storable_interaction, fn, *args, **kwargs)

    def _claiming(self, fn: Callable[..., Coroutine], *args: Any) -> defer.Deferred:
        """An interaction that claims work or lets go of claims (see L{IEngine.claiming})."""
        return self.engine.claiming(_storable_interaction, fn, *args)

    async def _record_status_txn(self, txn, message_ids, status, error=None):
        """A history row per message whose status changed, in the transaction of the change (every role that changes one)."""
        now = self._now()
        for message_id in message_ids:
            await txn.execute(
                "INSERT INTO message_status_history (inbound_message_id, status, error, at) VALUES (?, ?, ?, ?)",
                (message_id, status, error, now),
            )
