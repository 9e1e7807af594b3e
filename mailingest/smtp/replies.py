"""
The session's replies: RFC 3463 enhanced codes, and the error budget.

Like Postfix's smtpd_soft_error_limit, smtpd_error_sleep_time and
smtpd_hard_error_limit: errors (5xx replies) are counted over the session and
never forgiven by a later success; past C{SOFT_ERROR_LIMIT} each further error
reply waits C{ERROR_SLEEP_SECONDS} more than the last (up to
C{MAX_ERROR_SLEEP_SECONDS}), with the client's input held meanwhile so replies
stay in order (a tarpit that never blocks), and at C{ERROR_LIMIT} the client is
cut off. Refused recipients are also counted per client address over all its
sessions (by the factory): they raise the delay of every session from that
address, and at C{REFUSED_RECIPIENT_LIMIT} that address is cut off until the
window moves on.
"""

import re
from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.mail import smtp
from zope.interface import Interface

SOFT_ERROR_LIMIT = 5
ERROR_SLEEP_SECONDS = 1.0
MAX_ERROR_SLEEP_SECONDS = 5.0
ERROR_LIMIT = 20
# Like Postfix's smtpd_junk_command_limit: past this many of these commands
# without a message stored, each one counts as an error.
JUNK_COMMAND_LIMIT = 100
JUNK_COMMANDS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP", b"HELO", b"EHLO"})
REFUSED_RECIPIENT_LIMIT = 50
REFUSED_RECIPIENT_WINDOW = 600.0

_ENHANCED = re.compile(rb"\A[245]\.\d{1,3}\.\d{1,3}( |\Z)")
_DEFAULT_ENHANCED = {
    211: b"2.0.0",
    214: b"2.0.0",
    221: b"2.0.0",
    250: b"2.0.0",
    251: b"2.1.5",
    252: b"2.5.0",
    421: b"4.3.0",
    450: b"4.2.0",
    451: b"4.3.0",
    452: b"4.3.1",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    550: b"5.0.0",
    552: b"5.3.4",
    553: b"5.1.3",
    554: b"5.0.0",
    555: b"5.5.4",
}


def with_enhanced_code(code: int, text: bytes) -> bytes:
    """C{text} led by an enhanced status code; the greeting and 354 carry none."""
    if code in (220, 354) or code not in _DEFAULT_ENHANCED or _ENHANCED.match(text):
        return text
    return _DEFAULT_ENHANCED[code] + b" " + text


def reply_text(error: smtp.SMTPServerError) -> bytes:
    """An C{SMTPServerError}'s reply text (Twisted's are text; bytes pass)."""
    resp = error.resp
    return resp if isinstance(resp, bytes) else resp.encode("utf-8", "replace")


class IReplyChannel(Interface):
    """What the replies need from the protocol."""

    def sendCode(code: int, message: bytes = b""):
        """Write one reply as it is (Twisted's C{SMTP.sendCode})."""

    def hold():
        """Hold the client's further input: a delayed reply is pending."""

    def release():
        """The delayed reply is sent: go on with what the client pipelined."""

    def cut_off(reason: str, text: bytes):
        """Send a 421 with C{text}, count it under C{reason} and close the connection."""


class Replies:
    """
    Sends the replies of one session. A 4xx is not the client's error:
    452 4.5.3 (too many recipients) is how a long recipient list is split, 451
    is our own trouble; a junk command past its limit is one.
    """

    def __init__(self, connection: IReplyChannel, clock: IReactorTime, address_refusals: Callable[[], int]):
        self._connection = connection
        self._clock = clock
        self._address_refusals = address_refusals
        self.errors = 0
        self._junk = 0
        self._junk_penalty = False
        self._delayed = None

    def command(self, verb: bytes) -> None:
        """A command line is about to run: is it one junk command too many?"""
        if verb in JUNK_COMMANDS:
            self._junk += 1
            self._junk_penalty = self._junk > JUNK_COMMAND_LIMIT
        else:
            self._junk_penalty = False

    def message_stored(self) -> None:
        self._junk = 0

    def reply(self, code: int, text: bytes, enhanced: bool = True) -> None:
        """
        Send a reply; an error is counted, delayed when the tarpit applies,
        and may end the session. The reply to HELO and EHLO carries no
        enhanced code (RFC 2034 section 3).
        """
        if enhanced:
            text = with_enhanced_code(code, text)
        penalty, self._junk_penalty = self._junk_penalty, False
        if code < 500 and not penalty:
            self._connection.sendCode(code, text)
            return
        self.errors += 1
        delay = self._delay()
        if not delay:
            self._error_sent(code, text)
            return
        self._connection.hold()
        self._delayed = self._clock.callLater(delay, self._delay_over, code, text)

    def address_over_limit(self) -> bool:
        """The client's address has had too many recipients refused within the window."""
        return self._address_refusals() >= REFUSED_RECIPIENT_LIMIT

    def cancel(self) -> None:
        """The connection is gone: a delayed reply is never sent."""
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()

    def _delay(self) -> float:
        level = max(self.errors, self._address_refusals())
        if level <= SOFT_ERROR_LIMIT:
            return 0.0
        return min(ERROR_SLEEP_SECONDS * (level - SOFT_ERROR_LIMIT), MAX_ERROR_SLEEP_SECONDS)

    def _delay_over(self, code: int, text: bytes) -> None:
        self._delayed = None
        self._error_sent(code, text)
        self._connection.release()

    def _error_sent(self, code: int, text: bytes) -> None:
        self._connection.sendCode(code, text)
        if self.errors >= ERROR_LIMIT:
            self._connection.cut_off("errors", b"Too many errors")
        elif self.address_over_limit():
            self._connection.cut_off("refused_recipients", b"Too many refused recipients")
