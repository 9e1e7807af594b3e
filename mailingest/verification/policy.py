"""
An organisation's sender policy: which From: domains may send it orders, and
which check must pass. A message breaking it is quarantined, not refused: it
was already answered 250 and is kept.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from mailingest.verification.dmarc import aligned
from mailingest.verification.requirements import REQUIREMENTS
from mailingest.verification.results import Verdicts

__all__ = ["REQUIREMENTS", "SenderPolicy"]


@dataclass(frozen=True)
class SenderPolicy:
    """
    C{allow_domains}: From: domains (and their subdomains) accepted, empty
    for any; C{require}: C{dmarc} (a DMARC pass), C{dkim} (a DKIM pass
    aligned with the From: domain), C{spf} (an SPF pass aligned with it) or
    C{none}.
    """

    allow_domains: tuple[str, ...] = field(default=())
    require: str = "none"

    @property
    def is_default(self) -> bool:
        return not self.allow_domains and self.require == "none"

    @classmethod
    def from_columns(cls, allow_domains: str | None, require: str | None) -> "SenderPolicy":
        return cls(tuple((allow_domains or "").split()), require or "none")

    def describe(self) -> str:
        domains = ", ".join(self.allow_domains) or "any"
        return f"from: {domains}; require: {self.require}"


def _within(domain: str, allowed: str) -> bool:
    return domain == allowed or domain.endswith("." + allowed)


class Violation(NamedTuple):
    """C{kind} names the rule broken (C{domain}, C{dmarc}, C{dkim}, C{spf}: a metric label); C{reason} says how."""

    kind: str
    reason: str


def violation(policy: SenderPolicy, verdicts: Verdicts) -> Violation | None:
    """Why C{verdicts} break C{policy}, in the operator's words; None when they do not."""
    domain = verdicts.header_from
    if policy.allow_domains and not (domain and any(_within(domain, d) for d in policy.allow_domains)):
        shown = domain or "(none)"
        return Violation("domain", f"From: domain {shown} is not allowed (allowed: {', '.join(policy.allow_domains)})")
    if policy.require == "dmarc" and verdicts.dmarc.result != "pass":
        return Violation("dmarc", f"DMARC did not pass (dmarc={verdicts.dmarc.result}: {verdicts.dmarc.note})")
    if policy.require == "dkim" and not any(
        s.result == "pass" and aligned(s.domain, domain, strict=False) for s in verdicts.signatures
    ):
        return Violation("dkim", f"no DKIM pass aligned with the From: domain (dkim={verdicts.dkim.result})")
    if policy.require == "spf" and not (verdicts.spf.result == "pass" and aligned(verdicts.spf.domain, domain, strict=False)):
        return Violation("spf", f"no SPF pass aligned with the From: domain (spf={verdicts.spf.result})")
    return None
