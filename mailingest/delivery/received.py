"""Our C{Received:} trace header (RFC 5321 4.4), from the session's facts."""

import re
import time
from email.utils import format_datetime

from twisted.mail import smtp

from mailingest.delivery.session import Session
from mailingest.timestamps import PerSecond

_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")
_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f]")
_DATE = PerSecond(format_datetime)


def printable(text: str, limit: int = 255) -> str:
    """C{text} with anything but visible ASCII as "?", cut to C{limit}; "unknown" when empty."""
    return _UNPRINTABLE.sub("?", text)[:limit] or "unknown"


def _text(value: bytes | str | None) -> str:
    """Twisted's C{helo} pair holds bytes, or the peer as text before any HELO."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value or ""


def received_header(session: Session, hostname: str, helo: tuple, recipients: list[smtp.User]) -> bytes:
    """
    The header for one transaction. After SMTPUTF8 (with UTF8SMTP...) the
    recipient stays UTF-8, as RFC 6532 allows in the headers of such a
    message; otherwise the header is ASCII. The recipient is named only
    when there is one.
    """
    with_ = session.received_with
    utf8 = session.smtputf8
    lines = [
        f"Received: from {printable(_text(helo[0]))} ([{printable(_text(helo[1]))}])",
        f"\tby {hostname} (mailingest) with {with_} id {session.transaction_id}",
    ]
    if len(recipients) == 1:
        dest = recipients[0].dest
        address = (dest.local + b"@" + dest.domain).decode("utf-8", "replace")
        shown = (_CONTROL.sub("?", address)[:320] or "unknown") if utf8 else printable(address, 320)
        lines.append(f"\tfor <{shown}>;")
    else:
        lines[-1] += ";"
    lines.append("\t" + _DATE(time.time()))
    return "\r\n".join(lines).encode("utf-8" if utf8 else "ascii", "replace")
