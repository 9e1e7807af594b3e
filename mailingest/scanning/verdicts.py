"""
A message's content verdicts (L{mailingest.scanning.clamd},
L{mailingest.scanning.rspamd}) and what its organisation's content policy
makes of them.
"""

from dataclasses import dataclass, field

from mailingest.scanning.clamd import FileVerdict
from mailingest.scanning.content_policy import ContentPolicy
from mailingest.scanning.rspamd import SpamVerdict

_WORSE = {"clean": 0, "error": 1, "infected": 2}


@dataclass
class ContentVerdicts:
    """
    C{documents}: one clamd verdict per attachment, in order (empty without
    clamd); C{raw}: the raw message's (None when not scanned whole); C{spam}:
    rspamd's (None without rspamd); C{seconds}: how long each scanner took
    (the daemon's latency metric).
    """

    documents: list[FileVerdict] = field(default_factory=list)
    raw: FileVerdict | None = None
    spam: SpamVerdict | None = None
    clamd: bool = False
    unscanned: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """As the scan process sends it to the daemon."""
        return {
            "documents": [v.to_json() for v in self.documents],
            "raw": self.raw and self.raw.to_json(),
            "spam": self.spam and self.spam.to_json(),
            "clamd": self.clamd,
            "unscanned": self.unscanned,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ContentVerdicts":
        return cls(
            [FileVerdict.from_json(v) for v in data["documents"]],
            data["raw"] and FileVerdict.from_json(data["raw"]),
            data["spam"] and SpamVerdict.from_json(data["spam"]),
            data["clamd"],
            data["unscanned"],
            data["seconds"],
        )

    @property
    def virus(self) -> FileVerdict | None:
        """The message's malware verdict: the worst of its parts and its raw copy (None without clamd)."""
        if not self.clamd:
            return None
        parts = [v for v in (*self.documents, self.raw) if v is not None]
        return max(parts, key=lambda v: _WORSE[v.result], default=FileVerdict("clean"))

    def errors(self) -> list[FileVerdict | SpamVerdict]:
        """What could not be scanned."""
        found = [v for v in (*self.documents, self.raw) if v is not None and v.result == "error"]
        return found + ([self.spam] if self.spam is not None and self.spam.error else [])

    def columns(self) -> dict:
        """The C{inbound_message} columns of migration 010."""
        virus, spam = self.virus, self.spam
        return {
            "virus": virus and virus.result,
            "virus_detail": virus and virus.detail,
            "spam_action": spam and spam.action,
            "spam_score": spam and spam.score,
            "spam_required": spam and spam.required,
            "spam_symbols": spam and " ".join(spam.symbols) or None,
            "spam_detail": spam and spam.detail,
            "unscanned": self.unscanned,
        }


@dataclass(frozen=True)
class Decision:
    """
    What happens to the message: C{hold} (kept C{received}, tried again:
    a scanner did not answer), C{quarantine} (with C{kind}, a metric label,
    and C{reason}), or neither; C{drop}: ordinals of documents not kept.
    """

    hold: str | None = None
    quarantine: str | None = None
    kind: str | None = None
    drop: frozenset[int] = frozenset()


def decide(policy: ContentPolicy, verdicts: ContentVerdicts, filenames: list[str]) -> Decision:
    """The organisation's policy applied to fresh verdicts (a released message is not asked)."""
    virus = verdicts.virus
    if virus is not None and virus.result == "infected":
        where = [f"{virus.detail} in {name}" for name, v in zip(filenames, verdicts.documents) if v.result == "infected"]
        if not where:
            where = [f"{virus.detail} in the message"]
        reason = "virus: " + "; ".join(where)
        if policy.on_virus == "quarantine":
            return Decision(quarantine=reason, kind="virus")
        if policy.on_virus == "reject-documents":
            return Decision(drop=frozenset(n for n, v in enumerate(verdicts.documents) if v.result == "infected"))
        return Decision()
    errors = verdicts.errors()
    if errors:
        why = "; ".join(dict.fromkeys(e.detail or "scanner error" for e in errors[:3]))
        if policy.unscanned == "pass":
            verdicts.unscanned = why[:1000]
        elif any(getattr(e, "transient", True) for e in errors):
            return Decision(hold=why)
        else:
            return Decision(quarantine=f"cannot be scanned: {why}", kind="unscanned")
    spam = verdicts.spam
    if spam is not None and not spam.error and policy.spam_threshold is not None and spam.score > policy.spam_threshold:
        return Decision(
            quarantine=f"spam: score {spam.score:g} above the threshold {policy.spam_threshold:g} (rspamd: {spam.action})",
            kind="spam",
        )
    return Decision()
