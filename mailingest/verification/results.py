"""
What the sender checks found, as stored: one L{Check} per method and one
RFC 8601 C{Authentication-Results} value for all of them.
"""

import re
from dataclasses import asdict, dataclass, field

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
    """One DKIM signature's result (C{d=} and C{s=} as signed)."""

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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Verdicts":
        data = dict(data)
        for name in ("spf", "dkim", "dmarc", "arc"):
            data[name] = Check(**data[name])
        data["signatures"] = [Signature(**s) for s in data["signatures"]]
        return cls(**data)


_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._-]")
_NOT_TEXT = re.compile(r'[^\x20-\x7e]|["\\]')


def _reason(note: str) -> str | None:
    """A note as a quoted string can hold it (no quotes, backslashes or controls)."""
    return _NOT_TEXT.sub("?", note[:200]) or None


def token(value: str | None) -> str | None:
    """A sender-controlled domain as a header token: anything else becomes "?"."""
    return _NOT_TOKEN.sub("?", value[:255]) if value else None


def authentication_results(authserv_id: str, verdicts: Verdicts) -> str:
    """The header's value (without its name): what a downstream reader of RFC 8601 expects."""
    results: list = [
        authres.SPFAuthenticationResult(
            result=verdicts.spf.result,
            reason=_reason(verdicts.spf.note),
            smtp_mailfrom=_reason(verdicts.mail_from),
            smtp_helo=None if verdicts.mail_from else token(verdicts.helo),
        )
    ]
    if verdicts.signatures:
        for signature in verdicts.signatures:
            results.append(
                authres.DKIMAuthenticationResult(
                    result=signature.result,
                    reason=_reason(signature.note),
                    header_d=token(signature.domain),
                    header_s=token(signature.selector),
                )
            )
    else:
        results.append(authres.DKIMAuthenticationResult(result=verdicts.dkim.result, reason=_reason(verdicts.dkim.note)))
    results.append(
        authres.dmarc.DMARCAuthenticationResult(
            result=verdicts.dmarc.result,
            reason=_reason(verdicts.dmarc.note),
            header_from=token(verdicts.header_from),
            policy=verdicts.dmarc_policy,
        )
    )
    results.append(
        authres.arc.ARCAuthenticationResult(
            result=verdicts.arc.result, reason=_reason(verdicts.arc.note), header_as_d=token(verdicts.arc.domain)
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
