"""The sender role: the sender checks' verdicts, each organisation's sender policy, quarantine and release."""

from zope.interface import implementer

from mailingest.errors import NoSuchMessage, NoSuchOrg, NotQuarantined
from mailingest.interfaces import IQuarantineStore
from mailingest.storage.stores.base import MESSAGE_SELECT, StoreBase, message_row, org_row

# What the sender checks give (L{mailingest.verification.results.verdict_columns}).
VERDICT_COLUMNS = (
    "spf", "spf_domain", "dkim", "dkim_domain", "dmarc", "dmarc_domain", "dmarc_policy",
    "arc", "arc_domain", "authentication_results",
)

# What scanning records per message (L{mailingest.scanning.verdicts.ContentVerdicts.columns}).
CONTENT_COLUMNS = (
    "virus", "virus_detail", "spam_action", "spam_score", "spam_required", "spam_symbols", "spam_detail", "unscanned",
)
_POLICY_COLUMNS = "id, slug, name, active, created_at, sender_allow_domains, sender_require, on_virus, spam_threshold, unscanned"


@implementer(IQuarantineStore)
class QuarantineStore(StoreBase):
    async def _record_verdicts_txn(self, txn, message_id, verdicts):
        """Store the sender checks' columns (L{VERDICT_COLUMNS}); None: nothing to record."""
        if verdicts is None:
            return
        assignments = ", ".join(f"{name} = ?" for name in VERDICT_COLUMNS)
        await txn.execute(
            f"UPDATE inbound_message SET {assignments} WHERE id = ?",
            (*(verdicts.get(name) for name in VERDICT_COLUMNS), message_id),
        )

    def mark_quarantined(self, message_id, reason, verdicts=None, documents=None, content=None):
        quarantining = self._run(self._mark_quarantined, int(message_id), reason, verdicts, documents, content)
        return quarantining.addCallback(self._events_written)

    async def _mark_quarantined(self, txn, message_id, reason, verdicts, documents=None, content=None):
        """
        The one status change to C{quarantined}: what else must happen with
        it (an event for the application, say) belongs in this transaction.
        A content quarantine keeps the documents and the scanners' verdicts.
        """
        await self._record_verdicts_txn(txn, message_id, verdicts)
        if documents is not None:
            await self._store_documents_txn(txn, message_id, documents)
        if content is not None:
            assignments = ", ".join(f"{name} = ?" for name in CONTENT_COLUMNS)
            await txn.execute(
                f"UPDATE inbound_message SET {assignments} WHERE id = ?",
                (*(content.get(name) for name in CONTENT_COLUMNS), message_id),
            )
        await txn.execute(
            "UPDATE inbound_message SET status = 'quarantined', quarantine_reason = ?,"
            " last_error = NULL, attempts = attempts + 1, claimed_until = NULL WHERE id = ?",
            (reason, message_id),
        )
        await self._record_status_txn(txn, [message_id], "quarantined", reason)
        return (await self._write_event_txn(txn, message_id, "quarantined", reason))

    def release(self, message_id):
        return self._run(self._release, int(message_id))

    async def _release(self, txn, message_id):
        """Queue a quarantined message for extraction, past its policy (its verdicts are kept)."""
        now = self._now()
        await txn.execute(
            "UPDATE inbound_message SET status = 'received', released_at = ?, attempts = 0,"
            " next_attempt_at = ?, claimed_until = NULL WHERE id = ? AND status = 'quarantined' RETURNING id",
            (now, now, message_id),
        )
        if txn.fetchone() is None:
            await txn.execute("SELECT status FROM inbound_message WHERE id = ?", (message_id,))
            row = txn.fetchone()
            if row is None:
                raise NoSuchMessage(f"no message {message_id}")
            raise NotQuarantined(f"message {message_id} is {row['status']}, not quarantined")
        await self._record_status_txn(txn, [message_id], "received")
        await txn.execute(MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return message_row(txn.fetchone())

    def set_sender_policy(self, slug, allow_domains=None, require=None):
        return self._run(self._set_sender_policy, slug.lower(), allow_domains, require)

    async def _set_sender_policy(self, txn, slug, allow_domains, require):
        """Change what is given (None: keep); the organisation with its policy."""
        if allow_domains is not None:
            await txn.execute(
                "UPDATE organization SET sender_allow_domains = ? WHERE slug = ?",
                (" ".join(allow_domains), slug),
            )
        if require is not None:
            await txn.execute("UPDATE organization SET sender_require = ? WHERE slug = ?", (require, slug))
        return (await self._policy_row_txn(txn, slug))

    async def _policy_row_txn(self, txn, slug):
        await txn.execute(f"SELECT {_POLICY_COLUMNS} FROM organization WHERE slug = ?", (slug,))
        row = txn.fetchone()
        if row is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return org_row(row)

    def set_content_policy(self, slug, on_virus=None, spam_threshold=None, unscanned=None, no_spam_threshold=False):
        return self._run(self._set_content_policy, slug.lower(), on_virus, spam_threshold, unscanned, no_spam_threshold)

    async def _set_content_policy(self, txn, slug, on_virus, spam_threshold, unscanned, no_spam_threshold):
        """Change what is given (None: keep; C{no_spam_threshold}: clear it); the organisation with its policy."""
        changes = {"on_virus": on_virus, "spam_threshold": spam_threshold, "unscanned": unscanned}
        given = {name: value for name, value in changes.items() if value is not None}
        if no_spam_threshold:
            given["spam_threshold"] = None
        if given:
            assignments = ", ".join(f"{name} = ?" for name in given)
            await txn.execute(f"UPDATE organization SET {assignments} WHERE slug = ?", (*given.values(), slug))
        return (await self._policy_row_txn(txn, slug))

    def allow_infected(self, message_id):
        return self._run(self._allow_infected, int(message_id))

    async def _allow_infected(self, txn, message_id):
        """An admin's word that the message's infected documents (and raw copy) may be handed over."""
        await txn.execute(
            "UPDATE inbound_message SET infected_allowed_at = ? WHERE id = ? RETURNING id", (self._now(), message_id)
        )
        if txn.fetchone() is None:
            raise NoSuchMessage(f"no message {message_id}")
        await self._record_status_txn(txn, [message_id], "infected-allowed")
        await txn.execute(MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return message_row(txn.fetchone())
