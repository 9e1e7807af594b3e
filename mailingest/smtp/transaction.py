"""
The mail transaction of a session: MAIL FROM, RCPT TO and DATA (RFC 5321
section 3.3), and the delivery they ask.

MAIL asks the connection's C{IMessageDeliveryFactory} for a new
C{IMessageDelivery} and calls its C{validateFrom}; each RCPT its
C{validateTo}, whose message factory DATA uses; DATA hands the envelope to a
L{DataTransfer}. Lookups run while the session holds its input, so replies
come in order to a client that pipelines. Twisted keeps this state in private
attributes and fills C{SMTP.delivery} as a side effect; here it is one
object the session keeps, and forgets at HELO, EHLO, RSET and STARTTLS.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from zope.interface import Attribute, Interface

from mailingest.delivery.routing import address_text
from mailingest.ops import metrics
from mailingest.smtp.envelope import EnvelopeRefusal, envelope_address, mail_from, rcpt_to
from mailingest.smtp.replies import reply_text
from mailingest.smtp.transfer import DataTransfer, stored_reply

log = Logger(namespace="mailingest.smtp")


class ITransactionChannel(Interface):
    """What the transaction needs from the session's protocol."""

    session = Attribute("The connection's facts (L{mailingest.delivery.session.Session}).")
    host = Attribute("Our host name: the domain of a path without one.")
    limits = Attribute("The session's L{mailingest.smtp.limits.Limits}.")

    def reply(code: int, text: bytes, enhanced: bool = True):
        """Answer the command."""

    def wait_for(work):
        """Run the coroutine C{work}, holding the client's further input until it has finished."""

    def refused_recipient():
        """Count a recipient refused to the client's address."""

    def read_data(transfer: DataTransfer):
        """DATA has begun: what the client sends next is C{transfer}'s."""

    def message_stored():
        """A transaction ended with its message stored."""


class MailTransaction:
    """The transaction being built: its delivery, sender and accepted recipients."""

    def __init__(self, channel: ITransactionChannel, delivery_factory: IMessageDeliveryFactory):
        self._channel = channel
        self._delivery_factory = delivery_factory
        self.delivery: IMessageDelivery | None = None
        self.sender: smtp.Address | None = None
        self.recipients: list[tuple[smtp.User, object]] = []

    def forget(self) -> None:
        self.delivery = None
        self.sender = None
        self.recipients = []

    def mail(self, rest: bytes) -> None:
        channel = self._channel
        if self.sender:
            channel.reply(503, b"5.5.1 Sender already given")
            return
        try:
            path, channel.session.smtputf8 = mail_from(rest, channel.limits.max_message_size)
            sender = envelope_address(path, channel.host, channel.session.smtputf8, b"5.1.7 Bad sender address syntax")
        except EnvelopeRefusal as e:
            channel.reply(e.code, e.text)
            return
        self.recipients = []
        # One per MAIL FROM. A sender decided at once (ours is) is answered at once: no
        # coroutine and no Deferred for every message (issue 29).
        try:
            delivery = IMessageDelivery(self._delivery_factory.getMessageDelivery())
            validated = delivery.validateFrom(channel.session.helo_pair, sender)
        except Exception as e:
            self._failed(e, "sender validation failed")
            return
        if isinstance(validated, defer.Deferred):
            channel.wait_for(self._validate_sender(delivery, validated))
        else:
            self._sender_accepted(delivery, validated)

    async def _validate_sender(self, delivery: IMessageDelivery, validated: defer.Deferred) -> None:
        """A sender the delivery decides later (it may refuse it), the client's input held meanwhile."""
        try:
            sender = await validated
        except Exception as e:
            self._failed(e, "sender validation failed")
            return
        self._sender_accepted(delivery, sender)

    def _sender_accepted(self, delivery: IMessageDelivery, sender: smtp.Address) -> None:
        self.sender = sender
        self.delivery = delivery
        self._channel.reply(250, b"2.1.0 Sender OK")

    def rcpt(self, rest: bytes) -> None:
        channel = self._channel
        if not self.sender:
            channel.reply(503, b"5.5.1 Need MAIL before RCPT")
            return
        try:
            path = rcpt_to(rest)
        except EnvelopeRefusal as e:
            channel.reply(e.code, e.text)
            return
        if len(self.recipients) >= channel.limits.max_recipients:
            metrics.REJECTED.labels("recipients").inc()
            channel.reply(452, b"4.5.3 Too many recipients")
            return
        try:
            address = envelope_address(path, channel.host, channel.session.smtputf8, b"5.1.3 Bad recipient address syntax")
        except EnvelopeRefusal as e:
            channel.refused_recipient()
            channel.reply(e.code, e.text)
            return
        channel.wait_for(self._validate_recipient(smtp.User(address, channel.session.helo_pair, channel, self.sender)))

    async def _validate_recipient(self, user: smtp.User) -> None:
        try:
            make_message = await defer.maybeDeferred(self.delivery.validateTo, user)
        except smtp.SMTPServerError as e:
            if e.code >= 500:
                self._channel.refused_recipient()
            self._channel.reply(e.code, reply_text(e))
            log.info(
                "refused recipient {rcpt} from {peer}: {code} {reply}",
                rcpt=address_text(e.addr) if isinstance(e, smtp.SMTPAddressError) else "",
                peer=self._channel.session.peer,
                code=e.code,
                reply=e.resp,
                event="rejected",
            )
            return
        except Exception as e:
            self._failed(e, "recipient validation failed")
            return
        self.recipients.append((user, make_message))
        self._channel.reply(250, b"2.1.5 Recipient OK")

    def data(self, tls: str | None) -> None:
        """DATA, on a connection whose TLS is C{tls} (the trace header says it)."""
        channel = self._channel
        if self.sender is None or not self.recipients:
            channel.reply(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        delivery, sender, recipients = self.delivery, self.sender, self.recipients
        self.forget()
        channel.session.tls = tls
        try:
            helo, limit = channel.session.helo_pair, channel.limits.max_message_size
            transfer = DataTransfer.begin(delivery, helo, sender, recipients, limit)
        except Exception as e:
            self._failed(e, "delivery failed at DATA")
            return
        channel.read_data(transfer)
        channel.reply(354, b"End data with <CR><LF>.<CR><LF>")

    def data_ended(self, transfer: DataTransfer) -> None:
        refusal = transfer.refusal(self._channel.session.peer)
        if refusal is not None:
            self._channel.reply(*refusal)
        else:
            self._channel.wait_for(self._delivered(transfer))

    async def _delivered(self, transfer: DataTransfer) -> None:
        try:
            outcome = await transfer.stored()
        except Exception as e:
            self._failed(e, "delivery failed")
            return
        self._channel.message_stored()
        self._channel.reply(250, stored_reply(outcome))

    def _failed(self, error: Exception, what: str) -> None:
        """Answer an exception from the delivery: an C{SMTPServerError} carries its reply; anything else is our 451."""
        if isinstance(error, smtp.SMTPServerError):
            self._channel.reply(error.code, reply_text(error))
        else:
            log.failure(what)
            self._channel.reply(451, b"4.3.0 Temporary failure, try again later")
