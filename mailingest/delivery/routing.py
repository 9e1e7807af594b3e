"""
Plus-addressing: which organisation a recipient address is for.

C{orders+acme@ingest.example.com} routes to organisation C{acme}: the tag is
everything after the first C{+} of the local part, compared case-insensitively.
A quoted local part names the same mailbox as its unquoted form.

C{postmaster} (any case, with no tag; RFC 5321 section 4.5.1) routes to the
reserved organisation L{POSTMASTER_SLUG}, made by schema migration 003. That
slug is not a valid one (L{valid_slug}), so no organisation can be created with
it and no plus address reaches it: C{orders+_postmaster@...} is refused.
"""

import re
from dataclasses import dataclass

SLUG = re.compile(r"\A[a-z0-9](?:[a-z0-9._-]{0,62})\Z")
POSTMASTER = "postmaster"
POSTMASTER_SLUG = "_postmaster"
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


@dataclass(frozen=True)
class Route:
    local: str
    slug: str | None
    domain: str
    postmaster: bool = False


def normalise_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def unquote_local(local: str) -> str:
    """The mailbox a local part names: C{"orders+acme"} and C{orders+acme} are the same (RFC 5321 2.4)."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def parse_recipient(local: str, domain: str) -> Route:
    """Split an address into its base local part, organisation tag and domain."""
    local = unquote_local(local)
    if local.lower() == POSTMASTER:
        return Route(local, POSTMASTER_SLUG, normalise_domain(domain), postmaster=True)
    base, plus, tag = local.partition("+")
    slug = tag.strip().lower() if plus else None
    return Route(base, slug or None, normalise_domain(domain))


def valid_slug(slug: str) -> bool:
    """Slugs an organisation may be created with: short, lower-case, URL- and address-safe."""
    return bool(SLUG.match(slug))


def address_text(address) -> str:
    """A C{twisted.mail.smtp.Address} as text; internationalised addresses are UTF-8."""
    raw = address.local + (b"@" + address.domain if address.domain else b"")
    return raw.decode("utf-8", "replace")
