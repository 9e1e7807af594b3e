"""
The limits of one session, and the DATA pace watchdog.

A command line must be complete within C{Limits.timeout} of the previous one
(Twisted's C{TimeoutMixin}, reset per complete line by the protocol). DATA has
its own pace, like Postfix's smtpd_min_data_rate: after a grace period it must
average C{min_data_rate} bytes/s, and it may never take longer than
C{max_data_seconds}, so slow-drip clients cannot hold slots for hours.
"""

import collections
import math
from dataclasses import dataclass
from typing import Callable

from twisted.internet.interfaces import IReactorTime

# RFC 5321 4.5.3.1.4: 512 octets including CRLF (we allow 512 without it).
MAX_COMMAND_LINE = 512
# Input buffered while a command is pending; past it, the transport is paused.
PAUSE_BUFFER = 1 << 20
MIN_DATA_RATE = 500
DATA_RATE_GRACE_SECONDS = 30.0
MAX_DATA_SECONDS = 1800.0
DATA_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 52428800
    max_recipients: int = 100
    timeout: float = 300.0
    min_data_rate: float = MIN_DATA_RATE
    max_data_seconds: float = MAX_DATA_SECONDS


class DataPace:
    """
    Checks every C{DATA_CHECK_SECONDS} how much of a message has come, and
    calls C{too_slow(size, elapsed)} once when the pace is broken.
    """

    def __init__(self, clock, limits: Limits, too_slow: Callable[[int, float], None]):
        self._clock = clock
        self._limits = limits
        self._too_slow = too_slow
        self._received: Callable[[], int] | None = None
        self._started = 0.0
        self._call = None

    def start(self, received: Callable[[], int]) -> None:
        """DATA has begun; C{received()} is how many bytes of it have come."""
        self._received = received
        self._started = self._clock.seconds()
        self._call = self._clock.callLater(DATA_CHECK_SECONDS, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        elapsed = self._clock.seconds() - self._started
        size = self._received()
        rate = size / elapsed if elapsed else 0
        if elapsed > self._limits.max_data_seconds or (elapsed > DATA_RATE_GRACE_SECONDS and rate < self._limits.min_data_rate):
            self._too_slow(size, elapsed)
            return
        self._call = self._clock.callLater(DATA_CHECK_SECONDS, self._check)


class AddressWindow:
    """
    When each client address was counted within the last C{window} seconds,
    at most C{limit} times kept per address (enough to say the limit is
    reached): the refused recipients of the SMTP side, and the wrong tokens
    and sign-ins of the API's site. An address with nothing left in the
    window is forgotten when it is read and, for the rest, once a window;
    C{max_addresses} bounds the table further, the least recently counted
    going first. With C{--processes} every intake process keeps a copy of the
    refusals, fed by the others through the parent
    (L{mailingest.app.intake_protocol.RecipientRefused}).
    """

    def __init__(self, clock: IReactorTime, limit: int, window: float = 600.0, max_addresses: int | None = None):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._times: dict[str, collections.deque[float]] = {}
        self._next_sweep = 0.0

    def add(self, key: str, when: float | None = None) -> int:
        """Count C{key} now (or at C{when}); its count within the window."""
        now = self.clock.seconds()
        self._forget_old(now)
        times = self._times.pop(key, None)
        if times is None:
            times = collections.deque(maxlen=self.limit)
            while self.max_addresses is not None and len(self._times) >= self.max_addresses:
                del self._times[next(iter(self._times))]
        self._times[key] = times  # now the most recently counted
        times.append(now if when is None else when)
        return self._count(key, times)

    def count(self, key: str) -> int:
        """C{key}'s count within the window (capped at the limit)."""
        times = self._times.get(key)
        return 0 if times is None else self._count(key, times)

    def wait(self, key: str) -> int | None:
        """Whole seconds until C{key} is under its limit again; None if it is now."""
        times = self._times.get(key)
        if times is None or self._count(key, times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window - self.clock.seconds()))

    def snapshot(self) -> list[dict]:
        """Every count still within the window, for a process that starts."""
        cutoff = self.clock.seconds() - self.window
        return [{"peer": key, "at": at} for key, times in self._times.items() for at in times if at > cutoff]

    def _count(self, key: str, times: collections.deque[float]) -> int:
        cutoff = self.clock.seconds() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._times[key]
        return len(times)

    def _forget_old(self, now: float) -> None:
        """Once per window, drop the addresses with nothing in it, so the table stays small."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.window
        cutoff = now - self.window
        for key in [key for key, times in self._times.items() if not times or times[-1] <= cutoff]:
            del self._times[key]

    def __len__(self) -> int:
        return len(self._times)
