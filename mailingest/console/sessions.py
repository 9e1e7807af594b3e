"""
Console sign-in sessions, kept in memory: a random id in the cookie names a
session that holds the token's scope and the session's CSRF token. A restart
signs everyone out, which is the safe failure.
"""

import secrets
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 10_000
# A token's new session evicts only that token's oldest one past this, so signing
# in again and again with one token cannot sign anyone else out.
MAX_SESSIONS_PER_TOKEN = 100
SWEEP_SECONDS = 60.0


@dataclass
class ConsoleSession:
    id: str
    scope: int | None  # the organisation id the token sees; None: the admin token, every organisation
    expires: float
    token: str  # the SHA-256 of the token it signed in with, whose sessions are bounded together
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    notice: str | None = None  # the confirmation of the last action, shown once

    @property
    def admin(self) -> bool:
        return self.scope is None

    @property
    def who(self) -> str:
        return "admin" if self.admin else f"organisation {self.scope}"


class Sessions:
    """
    Sessions by id; each lives L{SESSION_SECONDS} from its last use. At most
    L{MAX_SESSIONS_PER_TOKEN} per token: a new one evicts that token's oldest.
    At most L{MAX_SESSIONS} in all: a new one evicts the oldest of the token
    holding the most, so one token's sign-ins never evict another's sessions.
    """

    def __init__(
        self, clock: IReactorTime, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS, per_token: int = MAX_SESSIONS_PER_TOKEN
    ):
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit
        self.per_token = per_token
        self._sessions: dict[str, ConsoleSession] = {}
        self._by_token: dict[str, dict[str, None]] = {}  # each token's session ids, oldest first
        self._next_sweep = 0.0

    def open(self, scope: int | None, token: str) -> ConsoleSession:
        """A new session for C{scope}, signed in with the token whose SHA-256 is C{token}."""
        now = self.clock.seconds()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            for sid in [sid for sid, s in self._sessions.items() if s.expires <= now]:
                self.close(sid)
        while len(self._by_token.get(token, ())) >= self.per_token:
            self.close(next(iter(self._by_token[token])))
        while len(self._sessions) >= self.limit:
            self.close(next(iter(max(self._by_token.values(), key=len))))
        session = ConsoleSession(secrets.token_urlsafe(32), scope, now + self.lifetime, token)
        self._sessions[session.id] = session
        self._by_token.setdefault(token, {})[session.id] = None
        return session

    def get(self, sid: str | None) -> ConsoleSession | None:
        session = self._sessions.get(sid or "")
        now = self.clock.seconds()
        if session is None:
            return None
        if session.expires <= now:
            self.close(session.id)
            return None
        session.expires = now + self.lifetime
        return session

    def close(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        mine = self._by_token[session.token]
        del mine[sid]
        if not mine:
            del self._by_token[session.token]

    def __len__(self) -> int:
        return len(self._sessions)
