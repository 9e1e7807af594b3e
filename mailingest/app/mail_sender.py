"""
Test mail for C{mailingest send-test}: a realistic message (text body, real
attachments, unique Message-ID) sent over plain SMTP, so an operator can check
a daemon end to end and read the server's final reply.
"""

import mimetypes
import os
import smtplib
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid

from mailingest import __version__
from mailingest.errors import MailingestError

DEFAULT_SENDER = "mailingest-test@localhost"
# A daemon listening on every address of a family is reached on its loopback address.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class SendError(MailingestError):
    """The test mail could not be sent; the message carries the server's reply."""


@dataclass(frozen=True)
class FileToAttach:
    filename: str
    content_type: str
    data: bytes

    @classmethod
    def load(cls, path: str) -> "FileToAttach":
        """Read a file to attach, typed by its extension as a mail client would."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SendError(f"cannot read attachment {path}: {e.strerror}") from None
        content_type, encoding = mimetypes.guess_type(path)
        if content_type is None or encoding is not None:
            content_type = "application/octet-stream"
        return cls(os.path.basename(path), content_type, data)


def parse_server(text: str) -> tuple[str, int]:
    """C{HOST:PORT}, C{[IPV6]:PORT} or a bare C{HOST} (port 2525, the daemon's default)."""
    host, port = text, "2525"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise SendError(f"bad --server {text!r}: use HOST:PORT or [IPV6]:PORT")
        if rest:
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SendError(f"bad --server {text!r}: use HOST:PORT")
    return host, int(port)


def daemon_server(descriptions: Iterable[str]) -> tuple[str, str]:
    """
    C{HOST:PORT} of the first of the daemon's SMTP endpoints (C{--smtp}) that
    takes plain SMTP from this machine, and that endpoint: C{tcp:} and
    C{tcp6:} do; C{haproxy:} wants a PROXY header first, C{ssl:} TLS from the
    first byte, and a C{systemd:} socket has no port written in it.
    """
    # Here, not at the top: the admin command starts without Twisted's endpoints.
    from twisted.internet import endpoints, reactor

    from mailingest.twisted_private import tcp_listen_arguments

    descriptions = list(descriptions)
    for description in descriptions:
        if description.split(":", 1)[0] not in ("tcp", "tcp6"):
            continue
        try:
            port, interface, _ = tcp_listen_arguments(endpoints.serverFromString(reactor, description))
        except (ValueError, TypeError) as e:
            raise SendError(f"bad SMTP endpoint {description!r}: {e}") from None
        host = _LOOPBACK.get(interface, interface)
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), description
    raise SendError(
        f"none of the daemon's SMTP endpoints ({', '.join(descriptions)}) takes plain SMTP here:"
        " give --server HOST:PORT"
    )


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip("<> ") or "localhost"


def build_test_message(
    sender: str,
    recipients: list[str],
    attachments: Iterable[FileToAttach] = (),
    subject: str | None = None,
    index: int = 1,
    count: int = 1,
) -> EmailMessage:
    """One test message; each call gets a fresh Message-ID, so none is a duplicate."""
    attachments = list(attachments)
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject or (
        "mailingest test message" if count == 1 else f"mailingest test message {index}/{count}"
    )
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid("mailingest-test", domain=_domain_of(sender))
    message["X-Mailer"] = f"mailingest send-test {__version__}"
    lines = [f"This is test message {index} of {count}, sent by mailingest send-test."]
    if attachments:
        lines.append("Attached: " + ", ".join(a.filename for a in attachments) + ".")
    message.set_content("\n".join(lines) + "\n")
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    return message


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join([str(code), *text.split()])


def send(
    server: str,
    sender: str,
    recipients: list[str],
    messages: Iterable[bytes],
    timeout: float = 30.0,
    found_as: str = "",
) -> Iterator[str]:
    """
    Send each message in its own transaction over one connection, yielding the
    server's final reply to each (e.g. C{250 2.0.0 Ok: stored as message 17}).
    C{found_as} says where C{server} came from, for a connection that fails.

    Any refusal (greeting, MAIL, a single RCPT, DATA) raises L{SendError}
    naming the reply: a test message half-delivered would mislead.
    """
    host, port = parse_server(server)
    try:
        client = smtplib.SMTP(timeout=timeout, local_hostname=socket.gethostname())
        try:
            code, text = client.connect(host, port)
            if code != 220:
                raise SendError(f"{server} greeted us with {_reply(code, text)}")
            client.ehlo_or_helo_if_needed()
            for raw in messages:
                yield _transaction(client, sender, recipients, raw)
            client.quit()
        finally:
            client.close()
    except smtplib.SMTPServerDisconnected as e:
        raise SendError(f"{server} closed the connection: {e}") from None
    except smtplib.SMTPResponseException as e:
        raise SendError(f"{server}: {_reply(e.smtp_code, e.smtp_error)}") from None
    except OSError as e:
        raise SendError(f"cannot talk to {server}{found_as}: {e.strerror or e}") from None


def _transaction(client: smtplib.SMTP, sender: str, recipients: list[str], raw: bytes) -> str:
    options = [f"SIZE={len(raw)}"] if client.has_extn("size") else []
    code, text = client.mail(sender, options)
    if code != 250:
        _reset(client)
        raise SendError(f"MAIL FROM:<{sender}> refused: {_reply(code, text)}")
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        if code not in (250, 251):
            _reset(client)
            raise SendError(f"RCPT TO:<{recipient}> refused: {_reply(code, text)}")
    code, text = client.data(raw)
    if code != 250:
        raise SendError(f"message refused after DATA: {_reply(code, text)}")
    return _reply(code, text)


def _reset(client: smtplib.SMTP) -> None:
    """Abandon the transaction politely; the refusal being reported matters more."""
    try:
        client.rset()
    except (smtplib.SMTPException, OSError):
        pass
