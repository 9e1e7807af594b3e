"""
The intake role, what the SMTP side needs: which organisations take mail,
message inserts (dedup and Message-ID collisions, in group commits) and
which blob keys rows refer to.
"""

from zope.interface import implementer

from mailingest.interfaces import Collision, Duplicate, IBlobReferences, IIntakeStore
from mailingest.storage.group_commit import GroupCommit
from mailingest.storage.stores.base import ORG_SELECT, RECEIVED_CHANNEL, StoreBase, org_row

# Blob keys looked up per statement (twice: messages and documents), well
# under SQLite's and PostgreSQL's limits on bound parameters.
KEY_BATCH = 500


@implementer(IIntakeStore, IBlobReferences)
class IntakeStore(StoreBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inserts = GroupCommit(lambda batches: self._run(self._insert_batches, batches))

    def active_orgs(self):
        return self._background(self._active_orgs)

    async def _active_orgs(self, txn):
        await txn.execute("SELECT id, slug FROM organization WHERE active = ?", (True,))
        return {row["slug"]: row["id"] for row in txn.fetchall()}

    def get_org(self, slug):
        return self._run(self._get_org, slug.lower())

    async def _get_org(self, txn, slug):
        await txn.execute(ORG_SELECT + " WHERE slug = ?", (slug,))
        return org_row(txn.fetchone())

    def insert_messages(self, rows):
        return self._inserts.submit(rows)

    async def _insert_batches(self, txn, batches):
        results = []
        for rows in batches:
            ids = []
            for row in rows:
                ids.append((await self._insert_message_txn(txn, row)))
            results.append(ids)
        if any(not isinstance(row_id, Duplicate) for ids in results for row_id in ids):
            await self.engine.notify(txn, RECEIVED_CHANNEL)
        return results

    async def _insert_message_txn(self, txn, row, collision=False):
        """
        One statement when the Message-ID is new. When it is taken, the row
        holding it decides: same content digest (or none recorded), a
        duplicate; else this message is stored under a suffixed id, itself
        checked the same way, so a retry of it is a duplicate too.
        """
        await txn.execute(
            "INSERT INTO inbound_message (org_id, source, source_message_id,"
            " mail_from, rcpt_to, subject, raw_key, raw_size, raw_sha256, content_sha256,"
            " message_id_collision, status, attempts, received_at, next_attempt_at,"
            " client_ip, helo, tls, rcpt_domain)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', 0, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (org_id, source, source_message_id) DO NOTHING RETURNING id",
            (
                row["org_id"],
                row["source"],
                row["source_message_id"],
                row["mail_from"],
                row["rcpt_to"],
                row["subject"],
                row["raw_key"],
                row["raw_size"],
                row["raw_sha256"],
                row.get("content_sha256"),
                collision,
                row["received_at"],
                row["received_at"],
                row.get("client_ip"),
                row.get("helo"),
                row.get("tls"),
                row.get("rcpt_domain"),
            ),
        )
        inserted = txn.fetchone()
        if inserted is not None:
            await self._record_status_txn(txn, [inserted["id"]], "received")
            return Collision(inserted["id"]) if collision else inserted["id"]
        await txn.execute(
            "SELECT id, content_sha256 FROM inbound_message"
            " WHERE org_id = ? AND source = ? AND source_message_id = ?",
            (row["org_id"], row["source"], row["source_message_id"]),
        )
        holder = txn.fetchone()
        digest = row.get("content_sha256")
        if digest is None or holder["content_sha256"] in (None, digest):
            return Duplicate(holder["id"])
        suffixed = dict(row, source_message_id=f"{row['source_message_id']}#collision-{digest[:12]}")
        return (await self._insert_message_txn(txn, suffixed, collision=True))

    def raw_key_in_use(self, key):
        return self._run(self._raw_key_in_use, key)

    async def _raw_key_in_use(self, txn, key):
        await txn.execute("SELECT 1 AS used FROM inbound_message WHERE raw_key = ? LIMIT 1", (key,))
        return txn.fetchone() is not None

    def referenced_keys(self, keys):
        return self._background(self._referenced_keys, list(keys))

    async def _referenced_keys(self, txn, keys):
        # Incinerated messages and deleted documents refer to nothing: their
        # blobs are retention's to delete, and the sweeper may finish the job.
        found = set()
        for start in range(0, len(keys), KEY_BATCH):
            batch = keys[start:start + KEY_BATCH]
            marks = ", ".join("?" for _ in batch)
            await txn.execute(
                f"SELECT raw_key AS key FROM inbound_message WHERE raw_key IN ({marks}) AND status <> 'incinerated'"
                f" UNION SELECT storage_key AS key FROM document WHERE storage_key IN ({marks}) AND deleted_at IS NULL",
                (*batch, *batch),
            )
            found.update(row["key"] for row in txn.fetchall())
        # A message still to be extracted (a reprocess, a retry) may be
        # putting its documents again right now, before recording them: its
        # document keys count as referenced until it is parsed or failed.
        pending = {}
        for key in keys:
            if key not in found and key.startswith("documents/"):
                parts = key.split("/")
                if len(parts) == 4 and parts[2].isdigit():
                    pending.setdefault(int(parts[2]), []).append(key)
        ids = list(pending)
        for start in range(0, len(ids), KEY_BATCH):
            batch = ids[start:start + KEY_BATCH]
            marks = ", ".join("?" for _ in batch)
            await txn.execute(
                f"SELECT id FROM inbound_message WHERE status = 'received' AND id IN ({marks})", batch
            )
            for row in txn.fetchall():
                found.update(pending[row["id"]])
        return found
