"""
An organisation's content policy: what a virus, a spam score or a scanner
that did not answer does to its mail. Kept apart from the scanners so the
admin command can offer its choices without importing them.
"""

from dataclasses import dataclass

ON_VIRUS = ("quarantine", "reject-documents", "tag")
UNSCANNED = ("hold", "pass")


@dataclass(frozen=True)
class ContentPolicy:
    """C{on_virus} (L{ON_VIRUS}), C{spam_threshold} (quarantine above it; None: never) and C{unscanned} (L{UNSCANNED})."""

    on_virus: str = "quarantine"
    spam_threshold: float | None = None
    unscanned: str = "hold"

    @classmethod
    def from_row(cls, row: dict) -> "ContentPolicy":
        """From an organisation row, or a claimed message's (where the organisation's C{unscanned} is C{unscanned_policy})."""
        threshold = row.get("spam_threshold")
        unscanned = row["unscanned_policy"] if "unscanned_policy" in row else row.get("unscanned")
        return cls(row.get("on_virus") or "quarantine", None if threshold is None else float(threshold), unscanned or "hold")

    def describe(self) -> str:
        threshold = "none" if self.spam_threshold is None else f"{self.spam_threshold:g}"
        return f"on virus: {self.on_virus}; spam threshold: {threshold}; unscanned: {self.unscanned}"
