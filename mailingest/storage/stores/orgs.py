"""The organisations role: organisations and their API tokens (the admin command's and the API's)."""

from zope.interface import implementer

from mailingest.errors import NoSuchOrg, OrgExists
from mailingest.interfaces import IOrgStore
from mailingest.storage.stores.base import ORG_SELECT, StoreBase, org_row


@implementer(IOrgStore)
class OrgStore(StoreBase):
    def add_org(self, slug, name):
        return self._run(self._add_org, slug.lower(), name)

    async def _add_org(self, txn, slug, name):
        await txn.execute(ORG_SELECT + " WHERE slug = ?", (slug,))
        if txn.fetchone() is not None:
            raise OrgExists(f"organisation {slug!r} already exists")
        await txn.execute(
            "INSERT INTO organization (slug, name, active, created_at)"
            " VALUES (?, ?, ?, ?) RETURNING id, slug, name, active, created_at",
            (slug, name, True, self._now()),
        )
        return org_row(txn.fetchone())

    def list_orgs(self):
        return self._run(self._list_orgs)

    async def _list_orgs(self, txn):
        await txn.execute(ORG_SELECT + " ORDER BY slug")
        return [org_row(row) for row in txn.fetchall()]

    def set_org_active(self, slug, active):
        return self._run(self._set_org_active, slug.lower(), active)

    async def _set_org_active(self, txn, slug, active):
        await txn.execute(
            "UPDATE organization SET active = ? WHERE slug = ?"
            " RETURNING id, slug, name, active, created_at",
            (bool(active), slug),
        )
        row = txn.fetchone()
        if row is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return org_row(row)

    async def _require_org_txn(self, txn, slug):
        await txn.execute(ORG_SELECT + " WHERE slug = ?", (slug,))
        org = txn.fetchone()
        if org is None:
            raise NoSuchOrg(f"no organisation {slug!r}")
        return org

    def add_token(self, slug, sha256):
        return self._run(self._add_token, slug.lower(), sha256)

    async def _add_token(self, txn, slug, sha256):
        org = await self._require_org_txn(txn, slug)
        await txn.execute(
            "INSERT INTO api_token (org_id, sha256, created_at) VALUES (?, ?, ?) RETURNING id",
            (org["id"], sha256, self._now()),
        )
        return txn.fetchone()["id"]

    def revoke_tokens(self, slug):
        return self._run(self._revoke_tokens, slug.lower())

    async def _revoke_tokens(self, txn, slug):
        org = await self._require_org_txn(txn, slug)
        await txn.execute(
            "UPDATE api_token SET revoked_at = ? WHERE org_id = ? AND revoked_at IS NULL RETURNING id",
            (self._now(), org["id"]),
        )
        return len(txn.fetchall())

    def token_org(self, sha256):
        """The organisation (id, slug) of a live token by its hash, or None."""
        return self._run(self._token_org, sha256)

    async def _token_org(self, txn, sha256):
        await txn.execute(
            "SELECT o.id, o.slug FROM api_token t JOIN organization o ON o.id = t.org_id"
            " WHERE t.sha256 = ? AND t.revoked_at IS NULL",
            (sha256,),
        )
        return txn.fetchone()
