"""
Claiming received messages for extraction: the organisations in turn, read
from the due index (migration 016), each claim a lease and, on PostgreSQL, a
session lock of the claiming connection.
"""

from datetime import timedelta

from twisted.internet import defer

from mailingest.storage.stores.base import MESSAGE_SELECT, StoreBase, marks, message_row

# A claimed message comes with its organisation's sender and content policy.
_CLAIM_SELECT = MESSAGE_SELECT.replace(
    " FROM inbound_message",
    ", o.sender_allow_domains, o.sender_require, o.on_virus, o.spam_threshold, o.unscanned AS unscanned_policy FROM inbound_message",
    1,
)
# The due index: received messages by organisation, then due time.
_DUE_INDEX = "inbound_message_org_due"

# On PostgreSQL a claim is also a session-level advisory lock (this first key,
# the message id modulo 2^31 the second) held on the engine's claiming
# connection: when a daemon dies its session ends, the server drops its locks,
# and its messages are claimed again at once instead of when their lease runs out.
CLAIM_LOCKS = 1835100524
_CLAIM_LOCK_KEY = "(id % 2147483648)::int"
_HELD_CLAIM_LOCKS = (
    "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND classid = ?"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class MessageClaims(StoreBase):
    """The claims of the extraction queue (L{mailingest.interfaces.IExtractionQueue})."""

    def claim(self, lease_seconds, limit=1, per_org=None, skip_orgs=()):
        """
        Up to C{limit} due messages claimed for C{lease_seconds}. With
        C{per_org}, at most that many of one organisation, the organisations
        taking turns (each one's first due message, then each one's second...),
        and none of the organisations in C{skip_orgs} (ids, e.g. those whose
        messages the caller already has in hand): one organisation's backlog
        cannot fill the batch while another's message waits.
        """
        return self._claiming(self._claim, lease_seconds, int(limit), per_org, [int(o) for o in skip_orgs])

    async def _claim(self, txn, lease_seconds, limit, per_org=None, skip_orgs=()):
        due = "status = 'received' AND next_attempt_at <= ?"
        if per_org is not None or skip_orgs:
            turns = await self._turns(txn, limit, per_org, skip_orgs)
            if not turns:
                return []
            due += " AND id IN (" + ", ".join(str(int(i)) for i in turns) + ")"
        ids = await self._lease(txn, due, lease_seconds, limit)
        if not ids:
            return []
        await txn.execute(_CLAIM_SELECT + f" WHERE m.id IN ({marks(ids)}) ORDER BY m.id", tuple(ids))
        return [message_row(row) for row in txn.fetchall()]

    async def _turns(self, txn, limit, per_org, skip_orgs):
        """
        The ids of the due, unclaimed messages to claim next, organisations in
        turn (see L{claim}). Its cost is that of the organisations with
        received mail, not of their backlog: the organisations are found by
        skipping through the due index (C{orgs}), and each one's first
        C{per_org} due messages are read from it, the K-th by a probe of its
        own (C{turn} K; neither engine has one spelling of a per-row LIMIT),
        the later turns only while the first gives fewer than C{limit}.
        """
        now = self._now()
        free, free_args = self._free(now)
        per_org = limit if per_org is None else min(int(per_org), limit)
        skip = ""
        if skip_orgs:
            skip = f" AND org_id NOT IN ({marks(skip_orgs)})"
        due_index = "inbound_message m" + self.engine.indexed_by.format(_DUE_INDEX)
        next_org = (
            f"SELECT m.org_id FROM {due_index} WHERE m.status = 'received'{{after}}"
            " ORDER BY m.org_id, m.next_attempt_at, m.id LIMIT 1"
        )
        probe = (
            f"SELECT (SELECT m.id FROM {due_index} WHERE m.status = 'received' AND m.org_id = orgs.org_id"
            f" AND m.next_attempt_at <= ? AND ({free}) ORDER BY m.next_attempt_at, m.id LIMIT 1 OFFSET {{turn}})"
            f" AS id, {{turn}} AS turn FROM orgs WHERE org_id IS NOT NULL{skip}"
        )
        probe_args = (now, *free_args, *skip_orgs)
        # A later turn is read only when the first one has fewer than C{limit}: else it is never reached.
        later = [probe.format(turn=turn) + " AND (SELECT COUNT(id) FROM first_turn) < ?" for turn in range(1, per_org)]
        await txn.execute(
            "WITH RECURSIVE orgs(org_id) AS ("
            f" SELECT ({next_org.format(after='')})"
            f" UNION ALL SELECT ({next_org.format(after=' AND m.org_id > orgs.org_id')})"
            " FROM orgs WHERE orgs.org_id IS NOT NULL),"
            f" first_turn AS ({probe.format(turn=0)}),"
            " picked AS (" + " UNION ALL ".join(["SELECT id, turn FROM first_turn", *later]) + ")"
            " SELECT id FROM picked WHERE id IS NOT NULL ORDER BY turn,"
            " (SELECT e.next_attempt_at FROM inbound_message e WHERE e.id = picked.id), id LIMIT ?",
            (*probe_args, *[a for _ in later for a in (*probe_args, limit)], limit),
        )
        return [row["id"] for row in txn.fetchall()]

    def _free(self, now):
        """The condition (and its arguments) of a message no live claim holds."""
        free = "claimed_until IS NULL OR claimed_until < ?"
        args = [now]
        if self.engine.session_locks:
            free += f" OR {_CLAIM_LOCK_KEY} NOT IN ({_HELD_CLAIM_LOCKS})"
            args.append(CLAIM_LOCKS)
        return free, args

    async def _lease(self, txn, due, lease_seconds, limit):
        """
        The ids of up to C{limit} messages that are C{due} (a condition on the
        current time, one C{?}) and unclaimed, now claimed for
        C{lease_seconds}; messages another daemon is claiming are skipped. On
        an engine with session locks each claim is also a session-level lock
        on the claiming connection, and a live lease whose lock no session
        holds is a dead daemon's.
        """
        now = self._now()
        free, args = self._free(now)
        await txn.execute(
            f"SELECT id FROM inbound_message e WHERE {due} AND ({free})"
            " ORDER BY next_attempt_at, id LIMIT ?" + self.engine.skip_locked,
            (now, *args, limit),
        )
        ids = [row["id"] for row in txn.fetchall()]
        if not ids:
            return ids
        if self.engine.session_locks:
            # Held until the outcome is recorded (unlock_claims). A lock another
            # session still holds means that daemon recorded the outcome and has
            # not let go yet, or its lease ran out: the lease decides, as before.
            await txn.execute(
                f"SELECT pg_try_advisory_lock(?, {_CLAIM_LOCK_KEY}) AS locked FROM inbound_message WHERE id IN ({marks(ids)})",
                (CLAIM_LOCKS, *ids),
            )
        await txn.execute(
            f"UPDATE inbound_message SET claimed_until = ? WHERE id IN ({marks(ids)})",
            (now + timedelta(seconds=lease_seconds), *ids),
        )
        return ids

    def unlock_claims(self, message_ids):
        if not self.engine.session_locks or not message_ids:
            return defer.succeed(None)
        return self._claiming(self._unlock_claims, [int(i) for i in message_ids])

    async def _unlock_claims(self, txn, message_ids):
        marks = ", ".join("(?)" for _ in message_ids)
        await txn.execute(
            f"SELECT pg_advisory_unlock(?, {_CLAIM_LOCK_KEY}) AS unlocked FROM (VALUES {marks}) AS claimed (id)",
            (CLAIM_LOCKS, *message_ids),
        )

    def renew_claims(self, message_ids, lease_seconds):
        return self._background(self._set_claims, list(message_ids), lease_seconds)

    def release_claims(self, message_ids=None):
        return self._run(self._set_claims, message_ids, None)

    async def _set_claims(self, txn, message_ids, lease_seconds):
        until = None if lease_seconds is None else self._now() + timedelta(seconds=lease_seconds)
        sql = "UPDATE inbound_message SET claimed_until = ? WHERE status = 'received'"
        args = [until]
        if message_ids is not None:
            if not message_ids:
                return
            sql += f" AND id IN ({marks(message_ids)})"
            args += [int(i) for i in message_ids]
        await txn.execute(sql, tuple(args))
