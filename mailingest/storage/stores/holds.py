"""
The legal hold role: holds on a message, a sender or a whole organisation,
which every delete path checks in the transaction that marks its rows
(L{mailingest.storage.stores.retention.held}), and the audit trail every
incineration, erasure and hold change writes in its own transaction.
"""

from zope.interface import implementer

from mailingest.errors import NoSuchHold, NoSuchMessage
from mailingest.interfaces import IHoldStore
from mailingest.storage.stores.base import StoreBase, select_with_org

HOLD_COLUMNS = "id, org_id, scope, inbound_message_id, sender, reason, created_by, created_at, removed_by, removed_at"
AUDIT_COLUMNS = "id, at, actor, action, org_id, inbound_message_id, document_id, hold_id, reason, sha256"
_HOLD_SELECT = select_with_org("legal_hold", "h", HOLD_COLUMNS)
_AUDIT_SELECT = select_with_org("audit_log", "a", AUDIT_COLUMNS)


@implementer(IHoldStore)
class HoldStore(StoreBase):
    async def _audit_txn(self, txn, actor, action, org_id, reason, sha256=None, message_id=None, document_id=None, hold_id=None):
        """One audit row, in the transaction of what it records."""
        await txn.execute(
            "INSERT INTO audit_log (at, actor, action, org_id, inbound_message_id, document_id, hold_id, reason, sha256)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self._now(), actor, action, org_id, message_id, document_id, hold_id, reason, sha256),
        )

    def add_hold(self, slug, reason, actor, message_id=None, sender=None):
        """
        Hold one message (C{message_id}), every message from C{sender}, or
        (neither) every message of the organisation; fires with the hold.
        """
        return self._run(self._add_hold, slug.lower(), reason, actor, message_id, sender)

    async def _add_hold(self, txn, slug, reason, actor, message_id, sender):
        org = await self._require_org_txn(txn, slug)
        scope = "message" if message_id is not None else "sender" if sender is not None else "organization"
        if message_id is not None:
            await txn.execute("SELECT id FROM inbound_message WHERE id = ? AND org_id = ?", (int(message_id), org["id"]))
            if txn.fetchone() is None:
                raise NoSuchMessage(f"no message {message_id} in organisation {slug!r}")
        await txn.execute(
            "INSERT INTO legal_hold (org_id, scope, inbound_message_id, sender, reason, created_by, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (org["id"], scope, message_id, None if sender is None else sender.lower(), reason, actor, self._now()),
        )
        hold_id = txn.fetchone()["id"]
        await self._audit_txn(txn, actor, "hold_add", org["id"], reason, message_id=message_id, hold_id=hold_id)
        return (await self._hold_txn(txn, hold_id))

    async def _hold_txn(self, txn, hold_id):
        await txn.execute(_HOLD_SELECT + " WHERE h.id = ?", (hold_id,))
        return txn.fetchone()

    def remove_hold(self, hold_id, actor):
        return self._run(self._remove_hold, int(hold_id), actor)

    async def _remove_hold(self, txn, hold_id, actor):
        await txn.execute(
            "UPDATE legal_hold SET removed_at = ?, removed_by = ? WHERE id = ? AND removed_at IS NULL"
            " RETURNING org_id, inbound_message_id, reason",
            (self._now(), actor, hold_id),
        )
        row = txn.fetchone()
        if row is None:
            raise NoSuchHold(f"no legal hold {hold_id} in force")
        await self._audit_txn(txn, actor, "hold_remove", row["org_id"], row["reason"], message_id=row["inbound_message_id"], hold_id=hold_id)
        return (await self._hold_txn(txn, hold_id))

    def list_holds(self, org_slug=None, include_removed=False):
        return self._run(self._list_holds, org_slug, include_removed)

    async def _list_holds(self, txn, org_slug, include_removed):
        where, args = [], []
        if org_slug is not None:
            where.append("o.slug = ?")
            args.append(org_slug.lower())
        if not include_removed:
            where.append("h.removed_at IS NULL")
        sql = _HOLD_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY h.id"
        await txn.execute(sql, tuple(args))
        return txn.fetchall()

    def list_audit(self, org_id=None, message_id=None, before_id=None, limit=50):
        return self._run(self._list_audit, org_id, message_id, before_id, int(limit))

    async def _list_audit(self, txn, org_id, message_id, before_id, limit):
        where, args = [], []
        for condition, value in (("a.org_id = ?", org_id), ("a.inbound_message_id = ?", message_id), ("a.id < ?", before_id)):
            if value is not None:
                where.append(condition)
                args.append(int(value))
        sql = _AUDIT_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.id DESC LIMIT ?"
        await txn.execute(sql, (*args, limit))
        return txn.fetchall()
