"""
The MAIL FROM and RCPT TO command lines: the path and the parameters.

Twisted's command patterns (C{SMTP.mail_re}, C{rcpt_re}) are tried first;
they refuse an 8-bit path, which SMTPUTF8 allows, so ours reads that. Twisted
parses MAIL's parameters and drops them: SIZE (held to the size limit), BODY
(7BIT, 8BITMIME) and SMTPUTF8 are read here and anything else is refused;
RCPT takes none. The mailbox is read by L{mailingest.smtp.address}.
"""

import re

from twisted.mail import smtp

from mailingest.ops import metrics
from mailingest.smtp.address import mailbox
from mailingest.smtp.data_reader import size_refusal

_UTF8_MAIL = re.compile(rb"\s*FROM:\s*(?P<path><[^<>\s]*>)(\s+(?P<opts>.*))?$", re.I)
_UTF8_RCPT = re.compile(rb"\s*TO:\s*(?P<path><[^<>\s]+>)(\s+(?P<opts>.*))?$", re.I)


class EnvelopeRefusal(Exception):
    """A MAIL or RCPT command line refused as written: C{code} and C{text} are the reply."""

    def __init__(self, code: int, text: bytes):
        super().__init__(code, text)
        self.code = code
        self.text = text


def mail_from(rest: bytes, max_message_size: int) -> tuple[bytes, bool]:
    """The path of C{MAIL FROM:<path> [params]}, and whether SMTPUTF8 was asked for."""
    m = smtp.SMTP.mail_re.match(rest) or _UTF8_MAIL.match(rest)
    if not m:
        raise EnvelopeRefusal(501, b"5.5.4 Syntax: MAIL FROM:<address>")
    smtputf8 = False
    for param in (m.group("opts") or b"").split():
        name, _, value = param.partition(b"=")
        name = name.upper()
        if name == b"SIZE":
            if not value.isdigit():
                raise EnvelopeRefusal(501, b"5.5.4 Bad SIZE parameter")
            if int(value) > max_message_size:
                metrics.REJECTED.labels("size").inc()
                raise EnvelopeRefusal(552, size_refusal(max_message_size))
        elif name == b"BODY":
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                raise EnvelopeRefusal(501, b"5.5.4 Bad BODY parameter")
        elif name == b"SMTPUTF8" and not value:
            smtputf8 = True
        else:
            raise EnvelopeRefusal(555, b"5.5.4 Unsupported MAIL FROM parameter " + name[:64])
    return m.group("path"), smtputf8


def rcpt_to(rest: bytes) -> bytes:
    """The path of C{RCPT TO:<path>}."""
    m = smtp.SMTP.rcpt_re.match(rest) or _UTF8_RCPT.match(rest)
    if not m:
        raise EnvelopeRefusal(501, b"5.5.4 Syntax: RCPT TO:<address>")
    if m.group("opts"):
        raise EnvelopeRefusal(555, b"5.5.4 Unsupported RCPT TO parameter")
    return m.group("path")


def envelope_address(path: bytes, host: bytes, smtputf8: bool, refusal: bytes) -> smtp.Address:
    """The mailbox C{path} names, or a 553 led by C{refusal} (the enhanced code and what is bad)."""
    try:
        return mailbox(path, host, smtputf8)
    except smtp.AddressError as e:
        raise EnvelopeRefusal(553, refusal + (b": " + str(e).encode() if str(e) else b"")) from None
