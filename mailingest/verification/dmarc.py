"""
DMARC (RFC 7489): the From: header's domain, its policy record (or its
organisational domain's, found with the public suffix list), and identifier
alignment against the SPF and DKIM passes.
"""

from email import errors, headerregistry
from functools import lru_cache

import dkim
from publicsuffixlist import PublicSuffixList

from mailingest.verification.dkim_reading import UnreadableHeader
from mailingest.verification.resolver import BudgetResolver, DnsRecordTooLarge, DnsTemporaryError
from mailingest.verification.results import Check, Signature

# A From: field longer than this is no sender's address: permerror, unread.
MAX_FROM_BYTES = 2048
_ADDRESSES = headerregistry.HeaderRegistry()
# Defects that leave the address itself certain: obsolete syntax and stray
# bytes (8-bit or control) in the display name; a domain holding them is refused.
_HARMLESS = (errors.ObsoleteHeaderDefect, errors.UndecodableBytesDefect, errors.NonPrintableDefect)


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 3.2): C{mail.customer.co.uk} -> C{customer.co.uk}."""
    return _organisational_domain(domain.lower().rstrip("."))


@lru_cache(maxsize=4096)
def _organisational_domain(domain: str) -> str:
    return _psl().privatesuffix(domain) or domain


def aligned(a: str | None, b: str | None, strict: bool) -> bool:
    if not a or not b:
        return False
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else organisational_domain(a) == organisational_domain(b)


class UnreadableFrom(Exception):
    """A From: field DMARC cannot read one domain from: the result is C{permerror}, never a guess."""


def header_from_domain(headers: list) -> str | None:
    """
    The one domain of the From: field in dkimpy's header list (name, value
    pairs), read with the standard library's strict address parser; None
    when there is no From: field.
    """
    values = [value for name, value in headers if name.lower() == b"from"]
    if not values:
        return None
    if len(values) > 1:
        raise UnreadableFrom("several From: fields")
    return _from_domain(values[0].replace(b"\r\n", b"").strip())


@lru_cache(maxsize=4096)
def _from_domain(value: bytes) -> str:
    """
    The domain of one From: field's value. Remembered: a business's partners
    send from the same few addresses, and the address parser is the largest
    cost of the sender checks (an unreadable value raises, and is not remembered).
    """
    if len(value) > MAX_FROM_BYTES:
        raise UnreadableFrom(f"From: field longer than {MAX_FROM_BYTES} bytes")
    try:
        field = _ADDRESSES("from", value.decode("utf-8", "surrogateescape"))
    except Exception as e:  # the parser's own failures on hostile input
        raise UnreadableFrom(f"From: field cannot be parsed ({type(e).__name__})") from None
    invalid = [d for d in field.defects if not isinstance(d, _HARMLESS)]
    if invalid:
        raise UnreadableFrom(f"From: field cannot be parsed ({invalid[0]})")
    domains = {address.domain.lower().rstrip(".") for address in field.addresses}
    if len(domains) != 1:
        raise UnreadableFrom("several From: domains" if domains else "From: field without an address")
    (domain,) = domains
    # not printable: a control, or a byte that was no UTF-8 (a surrogate escape)
    if not domain or domain.startswith("[") or not domain.isprintable():
        raise UnreadableFrom("From: address without a domain name")
    return domain


def _record(resolver: BudgetResolver, domain: str) -> dict[str, str] | None:
    records = [r for r in resolver.txt(f"_dmarc.{domain}") if r[:8].lower() == b"v=dmarc1"]
    if len(records) != 1:
        return None  # none, or several: RFC 7489 6.6.3 says to act as if none
    tags = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        name, _, value = part.partition("=")
        tags[name.strip().lower()] = value.strip()
    return tags


def check_dmarc(
    message: dkim.DKIM | UnreadableHeader, spf: Check, signatures: list[Signature], resolver: BudgetResolver
) -> tuple[Check, str | None]:
    """
    The DMARC result for the From: domain, and the policy that applies (p=,
    or sp= for a subdomain). C{message} is dkimpy's reading of the message
    (its header list), or why it could not be read (no From: to trust either).
    """
    if isinstance(message, UnreadableHeader):
        return Check("permerror", None, str(message)), None
    try:
        domain = header_from_domain(message.headers)
    except UnreadableFrom as e:
        return Check("permerror", None, str(e)), None
    if domain is None:
        return Check("none", None, "no From: field"), None
    organisation = organisational_domain(domain)
    try:
        record = _record(resolver, domain)
        if record is None and organisation != domain:
            record = _record(resolver, organisation)
    except DnsTemporaryError as e:
        return Check("temperror", domain, str(e)), None
    except DnsRecordTooLarge as e:
        return Check("permerror", domain, str(e)), None
    if record is None:
        return Check("none", domain, "no DMARC record"), None
    policy = record.get("p", "")
    if domain != organisation and "sp" in record:
        policy = record["sp"]
    if policy not in ("none", "quarantine", "reject"):
        return Check("permerror", domain, "DMARC record without a valid p= tag"), None
    dkim_domains = [s.domain for s in signatures if s.result == "pass"]
    strict_dkim, strict_spf = record.get("adkim") == "s", record.get("aspf") == "s"
    if any(aligned(d, domain, strict_dkim) for d in dkim_domains):
        return Check("pass", domain, "aligned DKIM pass"), policy
    if spf.result == "pass" and aligned(spf.domain, domain, strict_spf):
        return Check("pass", domain, "aligned SPF pass"), policy
    return Check("fail", domain, "no aligned SPF or DKIM pass"), policy
