"""
Mailboxes as clients write them in C{MAIL FROM} and C{RCPT TO} (RFC 5321
section 4.1.2): the local part and the domain.

Twisted's C{smtp.Address} cannot read a domain literal (C{[127.0.0.1]}) or a
quoted-pair inside a quoted local part, and its errors quote Python internals;
this parser reads both, is as lenient as Twisted's about the rest (a path
without angle brackets, a source route, any atom characters), and its errors
are fixed texts. Input is one command line (at most 512 bytes), so the regular
expression's cost is bounded.
"""

import re

from twisted.mail import smtp

_ATOM = rb"[-A-Za-z0-9!#$%&'*+/=?^_`{|}~.\x80-\xff]"
_QUOTED = rb'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e\x80-\xff])*"'
_DOMAIN = rb"(?:\[[^\[\]\\\x00-\x20\x7f]*\]|" + _ATOM + rb"+)"
_PATH = re.compile(
    rb"\A(?P<open><)?"
    rb"(?:@" + _DOMAIN + rb"(?:,@" + _DOMAIN + rb")*:)?"  # a source route, ignored (RFC 5321 4.1.2)
    rb"(?P<local>" + _QUOTED + rb"|" + _ATOM + rb"+)"
    rb"(?:@(?P<domain>" + _DOMAIN + rb"))?"
    rb"(?(open)>)\Z"
)


class MailboxSyntaxError(ValueError):
    """Not a mailbox RFC 5321 (or Twisted's leniency) allows."""


def split_path(path: bytes) -> tuple[bytes, bytes | None]:
    """
    C{<local@domain>} into the local part as written (quotes kept) and the
    domain (a literal with its brackets), None when the path has no domain.
    The null path C{<>} is C{(b"", b"")}.
    """
    if path == b"<>":
        return b"", b""
    match = _PATH.match(path)
    if match is None:
        raise MailboxSyntaxError("bad address syntax")
    return match.group("local"), match.group("domain")


def mailbox(path: bytes, host: bytes, smtputf8: bool):
    """
    A C{twisted.mail.smtp.Address} for C{path}, read by L{split_path};
    an internationalised address (RFC 6531) needs SMTPUTF8, and a path
    without a domain is at our C{host}, as Twisted has it. Raises Twisted's
    C{AddressError}.
    """
    if not path.isascii() and not smtputf8:
        raise smtp.AddressError("non-ASCII address without SMTPUTF8")
    try:
        local, domain = split_path(path)
    except MailboxSyntaxError:
        raise smtp.AddressError() from None
    address = smtp.Address(b"placeholder@invalid")
    address.local, address.domain, address.addrstr = local, host if domain is None else domain, path
    return address
