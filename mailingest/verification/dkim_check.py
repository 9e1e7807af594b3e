"""
DKIM (RFC 6376) and ARC (RFC 8617) with dkimpy, keys asked through our
L{BudgetResolver}.

Bounded for hostile messages: at most L{MAX_SIGNATURES} signatures are
verified (each one hashes the whole body again), the rest are noted and not
verified; a key record above the resolver's size cap is a permerror; every
lookup draws on the message's DNS budget, and no signature is started once
it is spent. dkimpy reads the message, selects signed fields and
canonicalizes bodies with L{mailingest.verification.dkim_reading}'s linear
steps: a crafted header section or body costs what the intake spent on it.
"""

import dkim

from mailingest.verification.dkim_reading import UnreadableHeader, install, long_run, read_fields
from mailingest.verification.resolver import BudgetResolver, DnsRecordTooLarge, DnsTemporaryError
from mailingest.verification.results import Check, Signature

install()

MAX_SIGNATURES = 10
# RFC 8617 5.1.1.1: a chain longer than this is invalid anyway.
MAX_ARC_SETS = 50
# The fields of an ARC set, as dkimpy names them (lower case).
_ARC_FIELDS = dkim.ARC.ARC_HEADERS

# Results ranked for the message's one DKIM verdict: any pass wins; a
# temperror may pass later, so it outranks the failures.
_RANK = ("pass", "temperror", "fail", "permerror", "neutral", "none")


class _KeyLookup:
    """
    dkimpy's C{dnsfunc(name, timeout)}: the TXT record as bytes, or None.
    It remembers what it found: dkimpy reports a key that could not be had
    (no answer, none published, malformed) as a plain failed signature, and
    RFC 6376 calls these temperror and permerror.
    """

    def __init__(self, resolver: BudgetResolver):
        self._resolver = resolver
        self.temporary: str | None = None
        self.permanent: str | None = None

    def __call__(self, name, timeout=None):
        self.temporary = self.permanent = None
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        try:
            records = self._resolver.txt(name)
        except DnsTemporaryError as e:
            self.temporary = str(e)
            raise dkim.DnsTimeoutError(str(e)) from None
        except DnsRecordTooLarge as e:
            self.permanent = str(e)
            raise dkim.KeyFormatError(str(e)) from None
        if not records:
            self.permanent = f"no key published at {name}"
            return None
        try:
            dkim.evaluate_pk(name, records[0])
        except Exception as e:
            self.permanent = f"unusable key at {name}: {e}"
        return records[0]


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def read_message(message: bytes) -> dkim.DKIM | UnreadableHeader:
    """
    dkimpy's verifier of the message, read once (its header list serves DKIM,
    ARC and DMARC alike); when it cannot be read, why: then DKIM and DMARC
    are C{permerror} and ARC C{fail}.
    """
    try:
        headers, body = read_fields(message)
    except UnreadableHeader as e:
        return e
    verifier = dkim.DKIM(minkey=1024)
    verifier.headers, verifier.body = headers, body
    return verifier


def check_dkim(verifier: dkim.DKIM | UnreadableHeader, resolver: BudgetResolver, limit: int = MAX_SIGNATURES) -> tuple[Check, list[Signature]]:
    """
    Every signature's result, and the message's verdict (the best of them).
    Each signature's C{d=} and C{s=} are the fields dkimpy parsed and
    verified, never a reading of our own: a tag C{D=} or a repeated C{d=}
    must not lend a verified signature another domain.
    """
    if isinstance(verifier, UnreadableHeader):
        return Check("permerror", None, str(verifier)), []
    values = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    count = len(values)
    if not count:
        return Check("none", None, "no DKIM signature"), []
    lookup = _KeyLookup(resolver)
    signatures = []
    for index in range(min(count, limit)):
        if resolver.remaining() <= 0:
            signatures.append(Signature("temperror", "", "", "DNS time budget exhausted"))
            continue
        crafted = long_run(values[index])
        if crafted is not None:
            signatures.append(Signature("permerror", "", "", f"signature not read: {crafted}"))
            continue
        verifier.signature_fields = {}  # dkimpy keeps the previous signature's when this one cannot be parsed
        result, note = _verify_one(verifier, index, lookup)
        fields = verifier.signature_fields
        signatures.append(Signature(result, _text(fields.get(b"d")), _text(fields.get(b"s")), note))
    verdict = min(signatures, key=lambda s: _RANK.index(s.result))
    note = verdict.note
    if count > limit:
        note = f"{note}; {count - limit} more signatures not verified (limit {limit})".lstrip("; ")
    return Check(verdict.result, verdict.domain or None, note), signatures


def _verify_one(verifier: dkim.DKIM, index: int, lookup: _KeyLookup) -> tuple[str, str]:
    try:
        if verifier.verify(idx=index, dnsfunc=lookup):
            return "pass", ""
        if lookup.temporary:
            return "temperror", lookup.temporary
        if lookup.permanent:
            return "permerror", lookup.permanent
        return "fail", "signature did not verify"
    except dkim.DnsTimeoutError as e:
        return "temperror", str(e)
    except dkim.ValidationError as e:
        return "fail", str(e)
    except dkim.DKIMException as e:
        return "permerror", str(e)
    except Exception as e:
        return "permerror", f"signature cannot be checked: {type(e).__name__}"


def check_arc(message: dkim.DKIM | UnreadableHeader, resolver: BudgetResolver) -> Check:
    """
    The chain's validation (pass, fail, none) as dkimpy gives it, an
    incomplete set included (RFC 8617 5.2: fail), and the domain of the
    newest seal as dkimpy read it. C{message} is L{read_message}'s: its
    fields and body serve the chain's verifier, not read a second time.
    """
    if isinstance(message, UnreadableHeader):
        return Check("fail", None, str(message))
    arc_fields = [value for name, value in message.headers if name.lower().rstrip() in _ARC_FIELDS]
    if not arc_fields:
        return Check("none", None, "")
    crafted = next(filter(None, map(long_run, arc_fields)), None)
    if crafted is not None:
        return Check("fail", None, f"ARC chain not read: {crafted}")
    try:
        verifier = dkim.ARC(minkey=1024)
        verifier.headers, verifier.body = message.headers, message.body
        newest, _ = verifier.sorted_arc_headers()
        if newest == 0:
            return Check("none", None, "")
        if newest > MAX_ARC_SETS:
            return Check("fail", None, f"more than {MAX_ARC_SETS} ARC sets")
        if resolver.remaining() <= 0:
            return Check("temperror", None, "DNS time budget exhausted")
        lookup = _KeyLookup(resolver)
        cv, sets, reason = verifier.verify(dnsfunc=lookup)
    except dkim.DnsTimeoutError as e:
        return Check("temperror", None, str(e))
    except Exception as e:
        return Check("fail", None, f"ARC chain cannot be checked: {type(e).__name__}: {e}")
    domain = (_text(sets[0].get("as-domain")) or None) if sets else None  # sets[0]: the newest instance
    result = _text(cv) or "fail"
    if result == "fail" and lookup.temporary:
        return Check("temperror", domain, lookup.temporary)
    return Check(result, domain, "" if result == "pass" else _text(reason))
