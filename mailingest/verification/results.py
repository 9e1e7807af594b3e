"""
What the sender checks found, as stored: one L{Check} per method and one
RFC 8601 C{Authentication-Results} value for all of them.
"""

import re
from dataclasses import dataclass, field

import authres
import authres.arc
import authres.dmarc


@dataclass
class Check:
    """
    One method's result (RFC 8601 words: pass, fail, softfail, neutral,
    none, temperror, permerror), the domain it was for, and why, in our words.
    """

    result: str
    domain: str | None = None
    note: str = ""


@dataclass
class Signature:
    """One DKIM signature's result (C{d=} and C{s=} as dkimpy parsed them; empty when it could not)."""

    result: str
    domain: str
    selector: str
    note: str = ""


@dataclass
class Verdicts:
    spf: Check
    dkim: Check
    dmarc: Check
    arc: Check
    signatures: list[Signature] = field(default_factory=list)
    mail_from: str = ""
    helo: str = ""
    header_from: str | None = None
    dmarc_policy: str | None = None
    authentication_results: str = ""

    def as_dict(self) -> dict:
        """
        The JSON-ready form L{from_dict} reads back: field by field, as
        dataclasses.asdict would give it, without its deep copy of every
        value (a sixth of a sender check's CPU; the values are strings).
        """
        data = dict(vars(self))
        for name in ("spf", "dkim", "dmarc", "arc"):
            data[name] = dict(vars(data[name]))
        data["signatures"] = [dict(vars(signature)) for signature in self.signatures]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Verdicts":
        data = dict(data)
        for name in ("spf", "dkim", "dmarc", "arc"):
            data[name] = Check(**data[name])
        data["signatures"] = [Signature(**s) for s in data["signatures"]]
        return cls(**data)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


def value(text: str | None, limit: int = 255) -> str | None:
    """
    A sender-controlled value as L{authres} writes it validly (RFC 8601
    C{pvalue}): authres makes a token or a quoted string of a value without
    C{@}, but writes any value with one as it is, so such a value that is not
    a plain C{local@domain} is quoted here. The characters are kept; only
    controls, which no quoted string can hold, become C{?}.
    """
    if not text:
        return None
    text = _CONTROL.sub("?", text[:limit])
    if "@" not in text:
        return text
    local, _, domain = text.rpartition("@")
    if _DOT_ATOM.fullmatch(local) and _DOMAIN.fullmatch(domain):
        return text
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def authentication_results(authserv_id: str, verdicts: Verdicts) -> str:
    """The header's value (without its name): what a downstream reader of RFC 8601 expects."""
    results: list = [
        authres.SPFAuthenticationResult(
            result=verdicts.spf.result,
            reason=value(verdicts.spf.note, 200),
            smtp_mailfrom=value(verdicts.mail_from),
            smtp_helo=None if verdicts.mail_from else value(verdicts.helo),
        )
    ]
    if verdicts.signatures:
        for signature in verdicts.signatures:
            results.append(
                authres.DKIMAuthenticationResult(
                    result=signature.result,
                    reason=value(signature.note, 200),
                    header_d=value(signature.domain),
                    header_s=value(signature.selector),
                )
            )
    else:
        results.append(authres.DKIMAuthenticationResult(result=verdicts.dkim.result, reason=value(verdicts.dkim.note, 200)))
    results.append(
        authres.dmarc.DMARCAuthenticationResult(
            result=verdicts.dmarc.result,
            reason=value(verdicts.dmarc.note, 200),
            header_from=value(verdicts.header_from),
            policy=verdicts.dmarc_policy,
        )
    )
    results.append(
        authres.arc.ARCAuthenticationResult(
            result=verdicts.arc.result, reason=value(verdicts.arc.note, 200), header_as_d=value(verdicts.arc.domain)
        )
    )
    header = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return header.split(":", 1)[1].strip()


def verdict_columns(verdicts: Verdicts) -> dict[str, str | None]:
    """The C{inbound_message} columns the store keeps of them (L{mailingest.storage.store.VERDICT_COLUMNS})."""
    columns = {"dmarc_policy": verdicts.dmarc_policy, "authentication_results": verdicts.authentication_results}
    for name in ("spf", "dkim", "dmarc", "arc"):
        check = getattr(verdicts, name)
        columns[name], columns[name + "_domain"] = check.result, check.domain
    return columns
