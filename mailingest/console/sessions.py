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


@dataclass
class Session:
    id: str
    scope: int | None  # the organisation id the token sees; None: the admin token, every organisation
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    notice: str | None = None  # the confirmation of the last action, shown once

    @property
    def admin(self) -> bool:
        return self.scope is None

    @property
    def who(self) -> str:
        return "admin" if self.admin else f"organisation {self.scope}"


class Sessions:
    """Sessions by id; each lives L{SESSION_SECONDS} from its last use, at most L{MAX_SESSIONS} at once."""

    def __init__(self, clock: IReactorTime, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS):
        self.clock = clock
        self.lifetime = lifetime
        self.limit = limit
        self._sessions: dict[str, Session] = {}

    def open(self, scope: int | None) -> Session:
        now = self.clock.seconds()
        for sid in [sid for sid, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]
        while len(self._sessions) >= self.limit:
            del self._sessions[next(iter(self._sessions))]
        session = Session(secrets.token_urlsafe(32), scope, now + self.lifetime)
        self._sessions[session.id] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        session = self._sessions.get(sid or "")
        now = self.clock.seconds()
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[session.id]
            return None
        session.expires = now + self.lifetime
        return session

    def close(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def __len__(self) -> int:
        return len(self._sessions)
