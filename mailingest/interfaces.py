"""
The ports of mailingest: what the SMTP side and the extraction service need from
storage, and what the SMTP protocol needs from a message beyond Twisted's
C{IMessage}.

Every method that touches a database or object storage returns a Deferred, so
each port can be implemented on a thread pool (SQLite, local disk) or natively
asynchronous (txpostgres, treq) without the callers knowing which.
"""

from typing import NamedTuple

from zope.interface import Attribute, Interface
from twisted.mail.smtp import IMessage


class BlobInfo(NamedTuple):
    """One stored blob as a listing shows it; C{mtime} is in seconds since the epoch."""

    key: str
    size: int
    mtime: float


class Duplicate(int):
    """The id of the row already holding an inserted message: same Message-ID, same content."""


class Collision(int):
    """The id of a new row stored under a suffixed Message-ID: a different message held the message's own."""


class IBlobStore(Interface):
    """
    Object storage for raw messages and extracted documents.

    Keys are built by mailingest from ids and hashes only (never from
    user-controlled text) and use C{/} as separator.
    """

    scratch_dir = Attribute(
        "A local directory on the blobs' own file system for spool and work files, so that"
        " storing one is a hard link, not a copy; None when blobs are not local files."
    )

    def put_file(key: str, path: str, sha256: str, size: int):
        """
        Store the whole content of the local file C{path} under C{key}.

        C{sha256} (hex) and C{size} describe that content, as the caller
        computed it while writing the file. What is stored is verified
        against both wherever the bytes pass through the store anyway: an
        upload (the service checks the signed sha256), a copy (hashed while
        copying). A hard link, where the file is already on the store's file
        system (see C{scratch_dir}), is the caller's very file: only its size
        is checked, as re-reading it to hash it would cost more than storing
        it. A mismatch fails with L{mailingest.errors.StorageError}. The
        Deferred fires only once the blob is durable; on failure nothing
        readable is left under C{key}.
        """

    def put_bytes(key: str, data: bytes, sha256: str):
        """
        Store C{data} under C{key}, as L{put_file} does: a small message
        received in memory is stored without a spool file. C{data} is
        verified against C{sha256}.
        """

    def local_path(key: str):
        """
        The path of a local file holding the blob under C{key}, for readers that
        can open it in place (extraction parses raw messages so, without a
        copy), or None when blobs are not local files.
        """

    def read_to(key: str, fileobj):
        """
        Write the blob stored under C{key} into the binary file object
        C{fileobj}, in chunks. Fails with L{mailingest.errors.BlobNotFound}
        when there is no such blob.
        """

    def delete(key: str):
        """
        Remove the blob under C{key}; deleting a missing blob succeeds.
        """

    def list_keys(prefix: str):
        """
        The blobs whose keys start with C{prefix} (a key prefix ending in
        C{/}, such as C{raw/}), as an asynchronous iterator of pages: lists
        of L{BlobInfo}. For the blob sweeper, which must not hold a whole
        bucket's listing in memory.
        """

    def remove_temporaries(before: float, dry_run: bool = False):
        """
        Delete the temporary files of writes that never finished (a crash
        mid-write) last modified before C{before} (seconds since the epoch);
        fire with (count, bytes) of what was (or, with C{dry_run}, would be)
        removed. A store that leaves none fires with (0, 0).
        """

    def check():
        """
        Fire with None when the store answers, fail otherwise (readiness).
        """

    def close():
        """
        Release connections and threads; fires when done.
        """


class IStoreRole(Interface):
    """
    What every store role shares. Rows are returned as plain dicts keyed by
    the column names of the README's Data section. Text is stored the same
    way on every engine: a NUL or a lone surrogate in any value written
    becomes U+FFFD.
    """

    exclusive = Attribute(
        "True when one daemon at a time uses this database (SQLite: one daemon per file): the"
        " claims it finds at start-up are its own previous run's, which it may release at once."
        " False when daemons share it (PostgreSQL): another daemon's claims run out with their lease."
    )


class IClosable(Interface):
    """What its owner closes: a store, or the parent's answer to an intake process's store calls."""

    def close():
        """
        Release connections; fires when done.
        """


class ISchemaStore(IStoreRole, IClosable):
    """The schema and the database's life: for the daemon's start-up, readiness and the admin command."""

    def migrate():
        """
        Create or upgrade the schema; fires with the list of applied versions.
        Fails when the database can be read but not written (a read-only
        file, a standby server): nothing could be stored.
        """

    def build_indexes(progress=None, keep_going=None):
        """
        Build what migrations leave to be built online (the search index),
        without holding the write lock for long; fires when done or stopped.
        """

    def index_search(keep_going=None):
        """
        Bring a search index the store keeps itself (SQLite's, a file of its
        own) up to date with the messages stored, changed or gone since;
        fires when it is (at once where the database keeps it), or earlier
        once C{keep_going()} is false between two of its transactions.
        """

    def check():
        """
        Fire with None when the database answers and takes writes (it writes
        nothing), fail otherwise (readiness).
        """


class IIntakeStore(Interface):
    """What the SMTP side needs: which organisations take mail, and storing messages. The parent process answers it for the intake processes."""

    def active_orgs():
        """
        Fire with a dict mapping each active organisation's slug to its id.
        """

    def get_org(slug: str):
        """
        Fire with the organisation row for C{slug} (case-insensitive) or None.
        """

    def insert_messages(rows):
        """
        Insert several C{inbound_message} rows (dicts without C{id}) in one
        transaction. A row whose (org_id, source, source_message_id) is taken
        is a duplicate when its C{content_sha256} matches the holder's (or
        either has none) and is skipped; otherwise it is stored under the
        source_message_id suffixed with C{#collision-} and 12 hex digits of
        its digest, flagged C{message_id_collision}. Fires with a list,
        parallel to C{rows}, of row ids: an C{int} for a new row, a
        L{Duplicate} (the holder's id) or a L{Collision}.
        """

    def raw_key_in_use(key: str):
        """
        Fire with True when a committed message row refers to the raw blob C{key}.
        """


class IBlobReferences(Interface):
    """What the blob sweeper asks before it deletes a blob."""

    def referenced_keys(keys):
        """
        Fire with the set of those blob C{keys} that a row refers to (the
        C{raw_key} of a message not incinerated or the C{storage_key} of a
        document not deleted): what the blob sweeper must keep.
        """


class IOrgStore(IStoreRole):
    """Organisations and their API tokens: the admin command's and the API's."""

    def add_org(slug: str, name: str):
        """
        Create an active organisation; fails with L{mailingest.errors.OrgExists}.
        """

    def list_orgs():
        """
        Fire with every organisation, ordered by slug.
        """

    def set_org_active(slug: str, active: bool):
        """
        Enable or disable an organisation; fails with
        L{mailingest.errors.NoSuchOrg}.
        """

    def add_token(slug: str, sha256: str):
        """
        Record an API token of the organisation by its hash; fires with its id. L{mailingest.errors.NoSuchOrg}.
        """

    def revoke_tokens(slug: str):
        """
        Revoke every live token of the organisation; fires with how many. L{mailingest.errors.NoSuchOrg}.
        """

    def token_org(sha256: str):
        """
        Fire with the organisation (id, slug) of a live token by its hash, or None.
        """


class IDomainRoutes(Interface):
    """The verified custom domains, as the SMTP side routes by them (the parent process answers it for the intake processes)."""

    def routed_domains(known_version=None):
        """
        Fire with (version, domains): C{version} of the routing table, and
        C{domains} None when it is still C{known_version}, else a list of
        dicts (C{domain}, C{org_id}, C{slug}, C{local_parts}, a list, empty
        for any) of every verified domain.
        """


class IDomainStore(IStoreRole):
    """Organisations' custom domains and their verification: the admin command's, the API's and the domain checker's."""

    def add_domain(slug: str, domain: str, token: str, local_parts=()):
        """
        Give organisation C{slug} the domain C{domain} (its stored form), pending
        verification by C{token}; fires with its row. L{mailingest.errors.NoSuchOrg},
        L{mailingest.errors.DomainTaken}.
        """

    def get_domain(domain: str):
        """Fire with the domain's row (with C{org_slug}), or None."""

    def get_domain_by_id(domain_id: int):
        """Fire with the domain's row by its id, or None."""

    def list_domains(org_slug=None, org_id=None):
        """Fire with the domains (of one organisation, by slug or id), ordered by domain."""

    def remove_domain(domain: str):
        """Remove a domain: its mail is refused from the next refresh on. L{mailingest.errors.NoSuchDomain}."""

    def due_domains(now, limit: int = 100):
        """Fire with the domains whose next check is due at C{now} (a datetime), the most overdue first."""

    def record_check(domain: str, status: str, next_check_at, error=None, txt_missing_since=None):
        """Record a check's outcome (status, when to check next, why it failed); fires with the row. L{mailingest.errors.NoSuchDomain}."""


class IExtractionQueue(IStoreRole):
    """The extraction queue: claims, outcomes, retries, reprocessing and status history."""

    def on_received(callback):
        """
        Call C{callback()} whenever a daemon sharing this database stores a
        message (best effort: listeners still poll). Fires once listening.
        """

    def claim(lease_seconds: float, limit: int = 1, per_org: int | None = None, skip_orgs=()):
        """
        Claim up to C{limit} of the oldest messages due for extraction: status
        C{received}, due (C{next_attempt_at} passed) and not claimed by a live
        lease. Fires with their rows (possibly none). With C{per_org} (what the
        extraction service does), the organisations take turns instead, at most
        C{per_org} of one, none of C{skip_orgs}: read from the due index, its
        cost is that of the organisations with mail waiting, while the oldest
        first across all of them sorts every received message. The claims last
        C{lease_seconds}. On a database shared by daemons each claim is also
        held by this daemon's database session (see L{unlock_claims}): a
        claim whose session ended (its daemon died) is taken over at once;
        the lease stays the backstop for a daemon that lives but stopped
        renewing.
        """

    def unlock_claims(message_ids):
        """
        Let go of this daemon's session hold on the claims of C{message_ids}
        once their outcome is recorded or released (nothing to do where
        claims have no session hold: SQLite).
        """

    def renew_claims(message_ids, lease_seconds: float):
        """
        Extend the claims on messages still being extracted by C{lease_seconds}
        from now, so no other daemon takes them over.
        """

    def release_claims(message_ids=None):
        """
        Release the claims on C{message_ids}, or on every message: for a daemon
        that knows it is the only one using this database, at start-up after a
        crash.
        """

    def mark_parsed(message_id: int, documents=(), warnings: str | None = None, verdicts=None, content=None):
        """
        Record the message's documents (dicts with the C{document} columns but
        C{id}, C{inbound_message_id} and C{created_at}, plus C{ordinal}), its
        C{warnings} (the parts it skipped), its sender C{verdicts} (a dict
        of C{VERDICT_COLUMNS}, or None) and its C{content} verdicts (a dict of
        C{CONTENT_COLUMNS}, or None) and move it to C{parsed}, in one
        transaction. A document already recorded for the same (message,
        ordinal) is updated in place (same id and blob key), and those past
        the new count are removed, so extracting again (C{reprocess} under
        new rules) never duplicates.
        """

    def mark_failed(message_id: int, error: str, attempts: int, verdicts=None):
        """
        Move a message to C{failed} with the reason (and its sender
        C{verdicts}, if any) and release its claim.
        """

    def schedule_retry(message_id: int, error: str, attempts: int, delay: float):
        """
        Keep a message C{received}, record the error and attempts, and make it
        due again after C{delay} seconds.
        """

    def reprocess(message_id: int):
        """
        Queue one message for extraction again (status C{received}, attempts
        reset). Fires with the message row; fails with
        L{mailingest.errors.NoSuchMessage}. Documents already extracted stay:
        extraction is idempotent and does not duplicate them.
        """

    def reprocess_failed(org_slug=None):
        """
        Queue every C{failed} message (of one organisation) again; fires with
        how many were queued.
        """

    def status_history(message_id: int):
        """
        Fire with a message's status changes, oldest first: (status, error, at).
        """


class IQuarantineStore(IStoreRole):
    """Sender and content verdicts, each organisation's sender and content policy, quarantine and release."""

    def mark_quarantined(message_id: int, reason: str, verdicts=None, documents=None, content=None):
        """
        Move a message that breaks its organisation's sender policy to
        C{quarantined} with the reason and its C{verdicts}; its documents are
        not extracted until L{release}. One that breaks its content policy
        comes with its C{documents} (as for C{mark_parsed}) and C{content}
        verdicts, kept to be shown. The one place this status is set.
        """

    def release(message_id: int):
        """
        Queue a C{quarantined} message for extraction past its policy; the
        message row. L{NoSuchMessage}, or L{NotQuarantined} for any other status.
        """

    def set_sender_policy(slug: str, allow_domains=None, require=None):
        """
        Set an organisation's sender policy (None keeps a part as it is): the
        organisation row with C{sender_allow_domains} and C{sender_require}.
        """

    def set_content_policy(slug: str, on_virus=None, spam_threshold=None, unscanned=None, no_spam_threshold=False):
        """
        Set an organisation's content policy (None keeps a part as it is;
        C{no_spam_threshold} clears the threshold): the organisation row with
        its sender and content policy (C{on_virus}, C{spam_threshold}, C{unscanned}).
        """

    def allow_infected(message_id: int):
        """
        Record an admin's release of a message's infected documents (they may
        then be downloaded); the message row, or L{NoSuchMessage}.
        """


class IOutboxStore(IStoreRole):
    """The webhook outbox: receivers, the events status changes write, their attempts."""

    def on_event(callback):
        """
        Call C{callback()} when this store, or any daemon sharing the database, may have written an event. Fires once listening.
        """

    def set_webhook(slug: str, url: str, secret: str):
        """
        Set the organisation's receiver (its failures forgotten). L{mailingest.errors.NoSuchOrg}.
        """

    def remove_webhook(slug: str):
        """
        Remove the organisation's receiver; fires with whether it had one. L{mailingest.errors.NoSuchOrg}.
        """

    def get_webhook(slug: str):
        """
        Fire with the organisation's receiver (url, secret, created_at) or None.
        """

    def claim_events(lease_seconds: float, limit: int = 8, per_org: int = 4):
        """
        Claim due events, each with its webhook, message and documents, in order per message and in turns across organisations.
        """

    def event_delivered(event_id: int, http_status: int):
        """
        Record a delivery; the receiver's failures start afresh.
        """

    def event_failed(event_id: int, http_status, error: str, delay):
        """
        Record a failed attempt, retried after C{delay} seconds or dead (None); fires with the receiver's failures in a row, or None when not counted.
        """

    def pause_receiver(org_id: int, seconds: float):
        """
        Try none of the organisation's events for C{seconds}.
        """

    def count_paused_receivers():
        """
        Fire with how many receivers are paused now.
        """

    def release_event_claims(event_ids=None):
        """
        Give up claims: these events', or (None) every event's.
        """

    def redeliver(event_id: int):
        """
        Send an event again, now, with a fresh retry horizon; fires with the event. L{mailingest.errors.NoSuchEvent}.
        """

    def count_events(status: str = "pending", org_id=None):
        """
        Fire with the number of events in C{status} (of one organisation).
        """


class IReadStore(IStoreRole):
    """The read model the API, the console and the admin command page through."""

    def list_messages(org_slug=None, status=None, limit: int = 50):
        """
        Fire with messages, newest first by id, each with an extra C{org_slug}.
        """

    def get_message(message_id: int):
        """
        Fire with one message row (with C{org_slug}) or None.
        """

    def count_messages(status=None, org_id=None):
        """
        Fire with the number of messages, optionally only those in C{status}
        and of one organisation.
        """

    def list_documents(org_slug=None, message_id=None, limit=None):
        """
        Fire with documents (each with an extra C{org_slug}), newest first.
        """

    def get_document(document_id: int):
        """
        Fire with one document row (with C{org_slug}) or None.
        """

    def page_messages(org_id=None, status=None, since=None, before_id=None, limit: int = 50):
        """
        Fire with messages newest first, those after C{before_id} (the API's cursor): by id, or with
        C{since} by received time then id.
        """

    def org_summaries(since, org_id=None):
        """
        Fire with each organisation (or one) with its messages by status since C{since} and its last message time.
        """

    def message_events(message_id: int):
        """
        Fire with a message's webhook events, oldest first.
        """

    def get_event(event_id: int):
        """
        Fire with one webhook event (with C{org_slug}) or None.
        """

    def list_events(org_slug=None, status=None, limit: int = 50):
        """
        Fire with webhook events, newest first.
        """


class ISearchStore(IStoreRole):
    """The console's search of an organisation's messages, whose cost is bounded whatever the text."""

    def search_messages(org_id: int, status=None, since=None, until=None, sender=None, text=None, before_id=None, limit: int = 50):
        """
        Fire with one page of an organisation's messages, newest first, each with its number of documents:
        by id, or for a date range without a sender or an indexed text, by received time then id. The page is a
        L{mailingest.storage.stores.search.SearchRows}: a text search that stopped short of a full page, to bound
        what it costs, says how far back it looked (its C{searched_to}, the cursor to go on from).
        """


class IRetentionStore(IStoreRole):
    """
    Retention periods, incineration, documents deleted past their period,
    erasure, and the queue of blobs to delete once their rows are marked
    (see L{mailingest.storage.stores.retention}). Every delete checks the
    legal holds in the transaction that marks its rows.
    """

    def set_retention(slug: str, raw=..., documents=...):
        """
        Set the organisation's raw and documents periods in seconds (None:
        keep forever; C{...}: leave as it is); fires with the organisation's
        id, slug and both periods. L{mailingest.errors.NoSuchOrg}.
        """

    def incinerate_due(limit: int = 100):
        """
        Incinerate up to C{limit} parsed, unheld messages past their raw
        period in one transaction (tombstone, history, audit, event, blobs
        queued); fires with a dict (id, org_id, bytes, reason, keys: the blob
        keys it queued) per message.
        """

    def delete_due_documents(limit: int = 100):
        """
        Mark up to C{limit} unheld documents past their period deleted in one
        transaction (audit, blobs queued); fires with (count, bytes).
        """

    def erase_message(message_id: int, actor: str):
        """
        Erase a message: raw copy and documents queued for deletion, personal
        fields replaced, tombstone kept. Fires with the erased row (and
        C{bytes}, C{keys}); L{mailingest.errors.NoSuchMessage},
        L{mailingest.errors.MessageHeld}, L{mailingest.errors.NotErasable}.
        """

    def erase_sender(slug: str, sender: str, actor: str, limit: int = 100):
        """
        Erase up to C{limit} of the organisation's messages from C{sender};
        fires with (erased, refused): call again until nothing is erased.
        """

    def pending_purges(limit: int = 100):
        """
        Fire with up to C{limit} queued blob keys (rows marked, blobs perhaps still there).
        """

    def purged(keys):
        """
        Take C{keys}, whose blobs are deleted, off the queue.
        """


class IHoldStore(IStoreRole):
    """Legal holds and the audit trail of deletions and hold changes."""

    def add_hold(slug: str, reason: str, actor: str, message_id=None, sender=None):
        """
        Hold a message, a sender's messages or (neither given) the whole
        organisation; fires with the hold row. L{mailingest.errors.NoSuchOrg},
        L{mailingest.errors.NoSuchMessage}.
        """

    def remove_hold(hold_id: int, actor: str):
        """
        End a hold; fires with it. L{mailingest.errors.NoSuchHold}.
        """

    def list_holds(org_slug=None, include_removed: bool = False):
        """
        Fire with the holds (each with C{org_slug}), oldest first.
        """

    def list_audit(org_id=None, message_id=None, before_id=None, limit: int = 50):
        """
        Fire with audit rows (who, what, when, sha256), newest first, those below C{before_id}.
        """


class IWebhookEvents(Interface):
    """
    What the webhook side decides of the events a status change writes to
    the outbox (in that change's transaction): which changes raise one, its
    type and its id.
    """

    def event_type(status: str):
        """The type of the event a change to C{status} raises, or None when it raises none."""

    def new_event_id():
        """A new event's id, unique across daemons."""


class IStore(
    ISchemaStore, IOrgStore, IIntakeStore, IBlobReferences, IExtractionQueue, IQuarantineStore, IOutboxStore, IReadStore,
    ISearchStore, IRetentionStore, IHoldStore, IDomainStore, IDomainRoutes,
):
    """Every store role on one database: what C{--database} opens (L{mailingest.storage.store.Store})."""


class IIngestMessage(IMessage):
    """
    Twisted's C{IMessage} (one transaction's message, fed by the protocol),
    with the data in bulk: our protocol reads DATA in whole buffers and hands
    them to C{write}, not a call per line. C{lineReceived} takes one line
    (without its line end): the protocol's trace header, the first thing a
    message receives (Twisted's C{SMTP.do_DATA} writes C{receivedHeader}'s
    result first). A message that provides only Twisted's C{IMessage} is
    adapted (L{mailingest.smtp.transfer.LineMessage}) and fed line by line.

    C{write} and C{lineReceived} raise L{twisted.mail.smtp.SMTPServerError}
    when the message cannot be taken (header section too large, no room to
    spool it): the protocol reads the rest of DATA, discards it and sends
    that reply. C{eomReceived} fires once the message is durable, with an
    L{IDeliveryOutcome} for the reply to name where it is kept, or fails
    with an C{SMTPServerError} carrying the reply (451).
    """

    def write(chunk: bytes):
        """Take the next bytes of the message as sent (dot-stuffing undone)."""


class IDeliveryOutcome(Interface):
    """What a message's C{eomReceived} fires with: where the message is kept, for the 250 reply."""

    ids = Attribute(
        "The ids of the rows holding the message, one per organisation in recipient order"
        " (for a duplicate, the row already holding it)."
    )


class ISMTPDelivery(Interface):
    """
    Delivery as the SMTP side is given it. Each connection gets its own
    Twisted C{IMessageDeliveryFactory}, as a cred realm gives each login its
    own avatar: its deliveries read the connection's facts (a
    L{mailingest.delivery.session.Session}, which the protocol fills in as
    the dialogue goes on) for the trace header and the message's envelope.
    """

    def deliveryFactory(session):
        """The C{IMessageDeliveryFactory} of the connection whose facts are C{session}."""


class IContentScanner(Interface):
    """
    A message's content scanned (clamd, rspamd) within its budget: in the scan
    process (L{mailingest.scanning.scanner.ContentScanner}), and the daemon's
    side of that process (L{mailingest.scanning.scans.ScanProcess}).
    """

    def scan(message, raw_path, documents, sender):
        """
        The L{mailingest.scanning.verdicts.ContentVerdicts} of C{message} (its
        row) stored at C{raw_path}, with its extracted C{documents} (paths, in
        order) and its sender checks' columns C{sender}: a coroutine.
        """
