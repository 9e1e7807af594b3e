"""
The custom domains role (issue 27): each organisation's own domains, their
verification state, and the routing table the SMTP side reads.

Domains are given here already in their one stored form
(L{mailingest.delivery.domains.domain_key}); the table's UNIQUE column then
makes a domain belong to at most one organisation in every form. Every change
that alters routing bumps C{org_domain_version}, which the SMTP side polls
instead of re-reading thousands of domains every refresh.
"""

from zope.interface import implementer

from mailingest.errors import DomainTaken, NoSuchDomain
from mailingest.interfaces import IDomainRoutes, IDomainStore
from mailingest.storage.stores.base import StoreBase, conditions, select_with_org

DOMAIN_COLUMNS = (
    "id, org_id, domain, token, local_parts, status, created_at, checked_at, verified_at,"
    " txt_missing_since, next_check_at, last_error"
)
DOMAIN_SELECT = select_with_org("org_domain", "d", DOMAIN_COLUMNS)


def _local_parts(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def domain_row(row: dict | None) -> dict | None:
    if row is not None:
        row["local_parts"] = _local_parts(row["local_parts"])
    return row


@implementer(IDomainStore, IDomainRoutes)
class DomainStore(StoreBase):
    async def _bump_version_txn(self, txn) -> None:
        await txn.execute("UPDATE org_domain_version SET version = version + 1 WHERE id = 1")

    def add_domain(self, slug, domain, token, local_parts=()):
        return self._run(self._add_domain, slug.lower(), domain, token, ",".join(local_parts))

    async def _add_domain(self, txn, slug, domain, token, local_parts):
        org = await self._require_org_txn(txn, slug)
        await txn.execute("SELECT id FROM org_domain WHERE domain = ?", (domain,))
        if txn.fetchone() is not None:
            raise DomainTaken(f"domain {domain} is already an organisation's")
        now = self._now()
        await txn.execute(
            "INSERT INTO org_domain (org_id, domain, token, local_parts, status, created_at, next_check_at)"
            " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
            (org["id"], domain, token, local_parts, now, now),
        )
        await self._bump_version_txn(txn)
        return await self._get_domain(txn, domain)

    def get_domain(self, domain):
        return self._run(self._get_domain, domain)

    async def _get_domain(self, txn, domain):
        await txn.execute(DOMAIN_SELECT + " WHERE d.domain = ?", (domain,))
        return domain_row(txn.fetchone())

    def get_domain_by_id(self, domain_id):
        return self._run(self._get_domain_by_id, domain_id)

    async def _get_domain_by_id(self, txn, domain_id):
        await txn.execute(DOMAIN_SELECT + " WHERE d.id = ?", (domain_id,))
        return domain_row(txn.fetchone())

    def list_domains(self, org_slug=None, org_id=None):
        return self._run(self._list_domains, org_slug.lower() if org_slug else None, org_id)

    async def _list_domains(self, txn, slug, org_id):
        where, args = conditions(**{"o.slug": slug, "d.org_id": org_id})
        await txn.execute(DOMAIN_SELECT + where + " ORDER BY d.domain", args)
        return [domain_row(row) for row in txn.fetchall()]

    def remove_domain(self, domain):
        return self._run(self._remove_domain, domain)

    async def _remove_domain(self, txn, domain):
        await txn.execute("DELETE FROM org_domain WHERE domain = ? RETURNING id", (domain,))
        if txn.fetchone() is None:
            raise NoSuchDomain(f"no organisation has the domain {domain}")
        await self._bump_version_txn(txn)

    def due_domains(self, now, limit=100):
        return self._background(self._due_domains, now, limit)

    async def _due_domains(self, txn, now, limit):
        await txn.execute(DOMAIN_SELECT + " WHERE d.next_check_at <= ? ORDER BY d.next_check_at LIMIT ?", (now, limit))
        return [domain_row(row) for row in txn.fetchall()]

    def record_check(self, domain, status, next_check_at, error=None, txt_missing_since=None):
        return self._run(self._record_check, domain, status, next_check_at, error, txt_missing_since)

    async def _record_check(self, txn, domain, status, next_check_at, error, txt_missing_since):
        now = self._now()
        await txn.execute("SELECT status FROM org_domain WHERE domain = ?", (domain,))
        before = txn.fetchone()
        if before is None:
            raise NoSuchDomain(f"no organisation has the domain {domain}")
        verified = " verified_at = ?," if status == "verified" and before["status"] != "verified" else ""
        await txn.execute(
            f"UPDATE org_domain SET status = ?, checked_at = ?,{verified} next_check_at = ?, last_error = ?,"
            " txt_missing_since = ? WHERE domain = ?",
            (status, now, *((now,) if verified else ()), next_check_at, error, txt_missing_since, domain),
        )
        if status != before["status"]:
            await self._bump_version_txn(txn)
        return await self._get_domain(txn, domain)

    def routed_domains(self, known_version=None):
        return self._background(self._routed_domains, known_version)

    async def _routed_domains(self, txn, known_version):
        await txn.execute("SELECT version FROM org_domain_version WHERE id = 1")
        version = txn.fetchone()["version"]
        if version == known_version:
            return version, None
        await txn.execute(
            "SELECT d.domain, d.org_id, o.slug, d.local_parts FROM org_domain d"
            " JOIN organization o ON o.id = d.org_id WHERE d.status = 'verified'"
        )
        return version, [domain_row(row) for row in txn.fetchall()]
