"""
Plus-addressing: which organisation a recipient address is for.

C{orders+acme@ingest.example.com} routes to organisation C{acme}: the tag is
everything after the first C{+} of the local part, compared case-insensitively.
"""

import re
from dataclasses import dataclass

SLUG = re.compile(r"\A[a-z0-9](?:[a-z0-9._-]{0,62})\Z")


@dataclass(frozen=True)
class Route:
    local: str
    slug: str | None
    domain: str


def normalise_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def parse_recipient(local: str, domain: str) -> Route:
    """Split an address into its base local part, organisation tag and domain."""
    base, plus, tag = local.partition("+")
    slug = tag.strip().lower() if plus else None
    return Route(base, slug or None, normalise_domain(domain))


def valid_slug(slug: str) -> bool:
    """Slugs an organisation may be created with: short, lower-case, URL- and address-safe."""
    return bool(SLUG.match(slug))
