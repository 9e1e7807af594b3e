"""
The store, one role per concern, in the style of Synapse's per-domain stores.

Each module holds one role's class and its SQL: C{schema} (migrations,
readiness), C{orgs} (organisations and API tokens), C{intake} (the SMTP
side: which organisations take mail, inserts, dedup, raw key use),
C{queue} (the extraction queue: claims, outcomes, retries, status
history), C{quarantine} (sender verdicts, policy and quarantine),
C{outbox} (the webhook outbox), C{domains} (custom domains and their
verification), C{reads} (the read model the API,
console and admin command page through) and C{message_search} (the
console's search, bounded in cost). All of them share one engine and
one transaction helper (L{mailingest.storage.stores.base.StoreBase}), and
L{mailingest.storage.store.Store} composes them into the one object the
daemon opens.

How roles share a transaction: an interaction is one transaction, and a
method named C{*_txn} takes the transaction it runs in instead of opening
its own. A change of status (C{queue}'s C{_finish_txn}, C{quarantine}'s
C{_mark_quarantined}) calls C{_record_status_txn} (its history row, on the
shared base) and the outbox's C{_write_event_txn} (its webhook event) with its own C{txn}:
the status, its history and its event commit together or not at all. An
insert (C{intake}) records its C{received} history row the same way. The
roles are mixins of one object for this: a C{*_txn} of another role is
reached on C{self}, never by a second interaction.
"""
