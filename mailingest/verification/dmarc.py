"""
DMARC (RFC 7489): the From: header's domain, its policy record (or its
organisational domain's, found with the public suffix list), and identifier
alignment against the SPF and DKIM passes.
"""

import email.utils
import re
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from mailingest.verification.resolver import BudgetResolver, DnsRecordTooLarge, DnsTemporaryError
from mailingest.verification.results import Check, Signature

# Only the first From: fields and this much of each are read.
MAX_FROM_BYTES = 2048


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """The registered domain (RFC 7489 3.2): C{mail.customer.co.uk} -> C{customer.co.uk}."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str | None, b: str | None, strict: bool) -> bool:
    if not a or not b:
        return False
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else organisational_domain(a) == organisational_domain(b)


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM = re.compile(rb"^from[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def header_from_domains(message: bytes) -> list[str]:
    """The domains of the From: field(s) in the header section (one expected)."""
    end = _HEADER_END.search(message)
    header = message if end is None else message[: end.start() + 1]
    domains = []
    for match in _FROM.finditer(header):
        value = match.group(1)[:MAX_FROM_BYTES].decode("utf-8", "replace")
        for _, address in email.utils.getaddresses([" ".join(value.split())]):
            domain = address.rpartition("@")[2].strip().lower().rstrip(".")
            if domain and "@" in address:
                domains.append(domain)
    return domains


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
    message: bytes, spf: Check, signatures: list[Signature], resolver: BudgetResolver
) -> tuple[Check, str | None]:
    """The DMARC result for the From: domain, and the policy that applies (p=, or sp= for a subdomain)."""
    domains = set(header_from_domains(message))
    if not domains:
        return Check("none", None, "no From: domain"), None
    if len(domains) > 1:
        return Check("permerror", None, "several From: domains"), None
    (domain,) = domains
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
