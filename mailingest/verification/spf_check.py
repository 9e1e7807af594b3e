"""SPF (RFC 7208) with pyspf, its DNS asked through our L{BudgetResolver}."""

import contextlib
import ipaddress
import re
import threading

import spf

from mailingest.verification.resolver import BudgetResolver, DnsRecordTooLarge, DnsTemporaryError
from mailingest.verification.results import Check


# A label of more than 63 characters (RFC 1035 2.3.4) after a dot: pyspf
# finds such a domain invalid, but its pattern for the top label takes time
# quadratic in the label's length first (4,000 characters: 0.2 s).
_LONG_LABEL = re.compile(rb"\.[0-9A-Za-z]{64}")
_SPF_RECORD = re.compile(rb"v=spf1(?: |$)", re.IGNORECASE)


def _spf_records(resolver: BudgetResolver, name: str) -> list[bytes]:
    records = resolver.txt(name)
    for record in records:
        if _SPF_RECORD.match(record) and _LONG_LABEL.search(record):
            raise spf.PermError(f"SPF record of {name} with a label longer than 63 characters")
    return records


def _lookup(resolver: BudgetResolver):
    """pyspf's DNSLookup signature: [((name, type), value)], TempError when DNS fails."""

    def lookup(name, qtype, strict=True, timeout=None):
        try:
            if qtype in ("TXT", "SPF"):
                return [((name, qtype), (record,)) for record in _spf_records(resolver, name)]
            answers = []
            for record in resolver.query(name, qtype):
                if qtype in ("A", "AAAA"):
                    answers.append(((name, qtype), record.address))
                elif qtype == "MX":
                    answers.append(((name, qtype), (record.preference, record.exchange)))
                elif qtype == "PTR":
                    answers.append(((name, qtype), record.target.to_text(True)))
            return answers
        except DnsTemporaryError as e:
            raise spf.TempError(str(e)) from None
        except DnsRecordTooLarge as e:
            raise spf.PermError(str(e)) from None

    return lookup


# pyspf has no resolver hook, only its module's C{DNSLookup}, which all
# threads share: ours sends each thread's lookups to that thread's check.
_checking = threading.local()
_pyspf_lookup = spf.DNSLookup


def _thread_lookup(name, qtype, strict=True, timeout=None):
    lookup = getattr(_checking, "lookup", None) or _pyspf_lookup
    return lookup(name, qtype, strict, timeout)


spf.DNSLookup = _thread_lookup


@contextlib.contextmanager
def _dns_through(resolver: BudgetResolver):
    """This thread's SPF lookups go to C{resolver} for one check."""
    _checking.lookup = _lookup(resolver)
    try:
        yield
    finally:
        _checking.lookup = None


class _Query(spf.query):
    """
    pyspf's query with RFC 7208 5.5's rule for C{ptr} (and the C{p} macro),
    which pyspf turns into temperror: a DNS error on the PTR lookup matches
    nothing, one on the address lookup of a PTR name skips that name. Our
    budget running out is still temperror: the check did not finish.
    """

    def __init__(self, resolver: BudgetResolver, **kwargs):
        super().__init__(**kwargs)
        self._resolver = resolver
        self._validating_ptrs = False

    def validated_ptrs(self):
        self._validating_ptrs = True
        try:
            return super().validated_ptrs()
        finally:
            self._validating_ptrs = False

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        try:
            return super().dns(name, qtype, cnames=cnames, ignore_void=ignore_void)
        except spf.TempError:
            if not self._validating_ptrs or self._resolver.remaining() <= 0:
                raise
            return []


def client_ip(peer: str | None) -> str | None:
    """The client address as SPF reads it (an IPv4-mapped IPv6 address as IPv4); None if not an IP."""
    try:
        address = ipaddress.ip_address((peer or "").strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def check_spf(peer: str | None, mail_from: str, helo: str, resolver: BudgetResolver) -> Check:
    """
    The MAIL FROM identity, or postmaster@HELO for the null sender
    (RFC 7208 2.4); the domain recorded is the one pyspf checked. pyspf stops
    at 10 DNS-querying terms (permerror) and follows includes only as far as
    that, so a loop ends there too.
    """
    ip = client_ip(peer)
    query = _Query(resolver, i=ip or "", s=mail_from, h=helo, timeout=max(resolver.remaining(), 0.001), querytime=0)
    domain = query.o or None
    if ip is None:
        return Check("none", domain, "no client IP address")
    if not domain:
        return Check("none", None, "no sender domain and no HELO name")
    if resolver.remaining() <= 0:
        return Check("temperror", domain, "DNS time budget exhausted")
    try:
        with _dns_through(resolver):
            result, _, explanation = query.check()
    except Exception as e:
        return Check("permerror", domain, f"SPF check failed: {type(e).__name__}")
    return Check(result, domain, explanation if result != "pass" else "")
