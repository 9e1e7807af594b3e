"""
The webhook outbox role: each organisation's receiver, the events a status
change writes (in that change's transaction, see L{_write_event_txn}),
their claims, attempts, pauses and redelivery.
"""

from datetime import timedelta

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailingest.errors import NoSuchEvent
from mailingest.interfaces import IOutboxStore, IWebhookEvents
from mailingest.storage.engines import IEngine
from mailingest.storage.stores.base import EVENT_SELECT, EVENTS_CHANNEL, StoreBase, conditions

@implementer(IOutboxStore)
class OutboxStore(StoreBase):
    def __init__(self, engine: IEngine, events: IWebhookEvents, clock: IReactorTime | None = None):
        super().__init__(engine, clock)
        # Which status changes raise an event, and its id: the webhook's business (L{mailingest.handoff.events}).
        self.events = events
        self._event_listeners = []

    def on_event(self, callback) -> defer.Deferred:
        """Call C{callback()} when this store, or any daemon sharing the database, may have written an event."""
        self._event_listeners.append(callback)
        return self.engine.listen(EVENTS_CHANNEL, lambda payload: callback())

    def _events_written(self, wrote: bool) -> None:
        """After a status change: wake the webhook senders if it wrote an event (most organisations have no webhook)."""
        if wrote:
            for callback in self._event_listeners:
                callback()

    async def _write_event_txn(self, txn, message_id, status, error, event_status=None):
        """
        The event of a status change, in its transaction: only for
        organisations with a webhook. Whether it wrote one. C{event_status}
        names the change when the status alone does not (an erasure is an
        incineration that raises C{message.erased}).
        """
        event_type = self.events.event_type(event_status or status)
        if event_type is None:
            return False
        now = self._now()
        await txn.execute(
            "INSERT INTO webhook_event (event_id, event_type, org_id, inbound_message_id,"
            " message_status, message_error, status, attempts, created_at, retry_from, next_attempt_at)"
            " SELECT ?, ?, m.org_id, m.id, ?, ?, 'pending', 0, ?, ?, ?"
            " FROM inbound_message m JOIN org_webhook w ON w.org_id = m.org_id WHERE m.id = ?"
            " RETURNING id",
            (self.events.new_event_id(), event_type, status, error, now, now, now, message_id),
        )
        if not txn.fetchall():
            return False
        await self.engine.notify(txn, EVENTS_CHANNEL)
        return True

    def set_webhook(self, slug, url, secret):
        return self._run(self._set_webhook, slug.lower(), url, secret)

    async def _set_webhook(self, txn, slug, url, secret):
        org = await self._require_org_txn(txn, slug)
        await txn.execute(
            "INSERT INTO org_webhook (org_id, url, secret, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (org_id) DO UPDATE SET url = excluded.url, secret = excluded.secret,"
            " failures = 0, paused_until = NULL",
            (org["id"], url, secret, self._now()),
        )

    def remove_webhook(self, slug):
        return self._run(self._remove_webhook, slug.lower())

    async def _remove_webhook(self, txn, slug):
        org = await self._require_org_txn(txn, slug)
        await txn.execute("DELETE FROM org_webhook WHERE org_id = ? RETURNING org_id", (org["id"],))
        return bool(txn.fetchall())

    def get_webhook(self, slug):
        return self._run(self._get_webhook, slug.lower())

    async def _get_webhook(self, txn, slug):
        await txn.execute(
            "SELECT w.url, w.secret, w.created_at FROM org_webhook w JOIN organization o ON o.id = w.org_id"
            " WHERE o.slug = ?",
            (slug,),
        )
        return txn.fetchone()

    def claim_events(self, lease_seconds, limit=8, per_org=4):
        """
        Due events, each with its webhook, message and documents, claimed for
        C{lease_seconds}. An event waits while an earlier event of its message
        is pending: events reach the application in order per message. At most
        C{per_org} events of an organisation are claimed at a time (counting
        those still claimed), taken in turns across organisations, and none
        while its receiver is paused (L{pause_receiver}): one organisation's
        backlog or dead receiver cannot take every attempt.
        """
        return self._background(self._claim_events, lease_seconds, int(limit), int(per_org))

    async def _claim_events(self, txn, lease_seconds, limit, per_org):
        now = self._now()
        # Each organisation's due events numbered by turn; the locking SELECT
        # around it (row locks cannot go with a window function) checks the
        # claim again, for a row another daemon claimed meanwhile.
        await txn.execute(
            "SELECT id FROM webhook_event WHERE (claimed_until IS NULL OR claimed_until < ?) AND id IN ("
            " SELECT id FROM ("
            "  SELECT e.id, e.org_id, e.next_attempt_at,"
            "   ROW_NUMBER() OVER (PARTITION BY e.org_id ORDER BY e.next_attempt_at, e.id) AS turn"
            "  FROM webhook_event e LEFT JOIN org_webhook w ON w.org_id = e.org_id"
            "  WHERE e.status = 'pending' AND e.next_attempt_at <= ? AND (e.claimed_until IS NULL OR e.claimed_until < ?)"
            "  AND (w.paused_until IS NULL OR w.paused_until <= ?)"
            "  AND NOT EXISTS (SELECT 1 FROM webhook_event p WHERE p.inbound_message_id = e.inbound_message_id"
            "  AND p.status = 'pending' AND p.id < e.id)"
            " ) due WHERE turn <= ? - (SELECT COUNT(*) FROM webhook_event c WHERE c.org_id = due.org_id"
            "  AND c.status = 'pending' AND c.claimed_until >= ?)"
            " ORDER BY turn, next_attempt_at, id LIMIT ?"
            ")" + self.engine.skip_locked,
            (now, now, now, now, per_org, now, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        await txn.execute(
            f"UPDATE webhook_event SET claimed_until = ? WHERE id IN ({marks})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        await txn.execute(
            "SELECT e.id, e.event_id, e.event_type, e.message_status, e.message_error, e.attempts,"
            " e.retry_from, e.org_id, o.slug AS org_slug, w.url, w.secret,"
            " m.id AS message_id, m.source_message_id, m.mail_from, m.rcpt_to, m.rcpt_domain, m.subject, m.received_at,"
            " m.virus, m.virus_detail, m.spam_action, m.spam_score, m.spam_required, m.spam_symbols, m.spam_detail,"
            " m.unscanned"
            " FROM webhook_event e JOIN organization o ON o.id = e.org_id"
            " JOIN inbound_message m ON m.id = e.inbound_message_id"
            " LEFT JOIN org_webhook w ON w.org_id = e.org_id"
            f" WHERE e.id IN ({marks}) ORDER BY e.id",
            tuple(ids),
        )
        events = txn.fetchall()
        for event in events:
            # An infected document is never handed over by webhook, nor any of a quarantined message.
            await txn.execute(
                "SELECT id, filename, content_type, size, sha256, virus, virus_detail FROM document"
                " WHERE inbound_message_id = ? AND ? <> 'quarantined' AND (virus IS NULL OR virus <> 'infected')"
                " AND deleted_at IS NULL"
                " ORDER BY ordinal",
                (event["message_id"], event["message_status"]),
            )
            event["documents"] = txn.fetchall()
        return events

    def event_delivered(self, event_id, http_status):
        return self._run(self._event_delivered, int(event_id), http_status)

    async def _event_delivered(self, txn, event_id, http_status):
        await txn.execute(
            "UPDATE webhook_event SET status = 'delivered', attempts = attempts + 1, last_status = ?,"
            " last_error = NULL, delivered_at = ?, claimed_until = NULL WHERE id = ? RETURNING org_id",
            (http_status, self._now(), event_id),
        )
        delivered = txn.fetchone()
        if delivered is not None:
            # The receiver answers again: it starts afresh (a write only when it had failed).
            await txn.execute(
                "UPDATE org_webhook SET failures = 0, paused_until = NULL WHERE org_id = ? AND failures > 0",
                (delivered["org_id"],),
            )

    def event_failed(self, event_id, http_status, error, delay):
        """
        One failed attempt: retried after C{delay} seconds, or C{dead} when
        C{delay} is None. Fires with the failures in a row of the event's
        receiver, this one counted, or None when it is not counted: the
        receiver was paused (the attempt began before the pause) or is gone.
        """
        return self._run(self._event_failed, int(event_id), http_status, error, delay)

    async def _event_failed(self, txn, event_id, http_status, error, delay):
        now = self._now()
        await txn.execute(
            "UPDATE webhook_event SET status = ?, attempts = attempts + 1, last_status = ?,"
            " last_error = ?, next_attempt_at = ?, claimed_until = NULL WHERE id = ? RETURNING org_id",
            (
                "dead" if delay is None else "pending",
                http_status,
                error,
                now if delay is None else now + timedelta(seconds=delay),
                event_id,
            ),
        )
        failed = txn.fetchone()
        if failed is None:
            return None
        await txn.execute(
            "UPDATE org_webhook SET failures = failures + 1"
            " WHERE org_id = ? AND (paused_until IS NULL OR paused_until <= ?) RETURNING failures",
            (failed["org_id"], now),
        )
        counted = txn.fetchone()
        return None if counted is None else counted["failures"]

    def pause_receiver(self, org_id, seconds):
        """Try none of the organisation's events for C{seconds}: its receiver keeps failing."""
        return self._run(self._pause_receiver, int(org_id), float(seconds))

    async def _pause_receiver(self, txn, org_id, seconds):
        await txn.execute(
            "UPDATE org_webhook SET paused_until = ? WHERE org_id = ?",
            (self._now() + timedelta(seconds=seconds), org_id),
        )

    def count_paused_receivers(self):
        return self._background(self._count_paused_receivers)

    async def _count_paused_receivers(self, txn):
        await txn.execute("SELECT COUNT(*) AS n FROM org_webhook WHERE paused_until > ?", (self._now(),))
        return txn.fetchone()["n"]

    def release_event_claims(self, event_ids=None):
        """Give up claims: these events', or (None) every event's."""
        return self._run(self._release_event_claims, None if event_ids is None else [int(i) for i in event_ids])

    async def _release_event_claims(self, txn, event_ids):
        sql, args = "UPDATE webhook_event SET claimed_until = NULL WHERE status = 'pending'", ()
        if event_ids is not None:
            if not event_ids:
                return
            sql += " AND id IN (" + ", ".join("?" for _ in event_ids) + ")"
            args = tuple(event_ids)
        await txn.execute(sql, args)

    def redeliver(self, event_id):
        """Send an event again, now, with a fresh retry horizon (a dead one, or a delivered one the application lost)."""
        return self._run(self._redeliver, int(event_id))

    async def _redeliver(self, txn, event_id):
        now = self._now()
        await txn.execute(
            "UPDATE webhook_event SET status = 'pending', attempts = 0, retry_from = ?, next_attempt_at = ?,"
            " claimed_until = NULL, delivered_at = NULL WHERE id = ? RETURNING id",
            (now, now, event_id),
        )
        if txn.fetchone() is None:
            raise NoSuchEvent(f"no event {event_id}")
        await self.engine.notify(txn, EVENTS_CHANNEL)
        await txn.execute(EVENT_SELECT + " WHERE e.id = ?", (event_id,))
        return txn.fetchone()

    def count_events(self, status="pending", org_id=None):
        return self._background(self._count_events, status, org_id)

    async def _count_events(self, txn, status, org_id):
        where, args = conditions(status=status, org_id=org_id)
        await txn.execute("SELECT COUNT(*) AS n FROM webhook_event" + where, args)
        return txn.fetchone()["n"]
