"""
Twisted's delivery seam for one SMTP session.

The SMTP factory is given L{IngestDeliveries} (L{ISMTPDelivery}), which makes
each connection's L{IngestDeliveryFactory} (Twisted's
C{IMessageDeliveryFactory}); the protocol asks it for a new L{IngestDelivery}
(an C{IMessageDelivery}) at each C{MAIL FROM}, so one delivery is one transaction.

Twisted calls the message factory of every accepted recipient and feeds each
message it gets every line; a message sent to three organisations must still
be spooled once and stored as one raw copy with three rows. So the messages of
one transaction are views of one L{Transaction}: the first view made writes the
spool, the others only add their recipient and ignore the data, and every
view's C{eomReceived} answers with the transaction's one outcome.
"""

from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailingest.delivery.ingest import Envelope, Ingest, Recipient, new_transaction_id
from mailingest.delivery.received import received_header
from mailingest.delivery.routing import address_text
from mailingest.delivery.session import Session
from mailingest.delivery.spool import Spool
from mailingest.interfaces import IIngestMessage, ISMTPDelivery

log = Logger(namespace="mailingest.delivery")


@implementer(ISMTPDelivery)
class IngestDeliveries:
    """Delivery through L{Ingest}, for the SMTP factory to give each connection."""

    def __init__(self, ingest: Ingest):
        self.ingest = ingest

    def deliveryFactory(self, session: Session) -> "IngestDeliveryFactory":
        return IngestDeliveryFactory(self.ingest, session)


@implementer(smtp.IMessageDeliveryFactory)
class IngestDeliveryFactory:
    """One session's deliveries: each knows the session's facts."""

    def __init__(self, ingest: Ingest, session: Session):
        self.ingest = ingest
        self.session = session

    def getMessageDelivery(self) -> "IngestDelivery":
        return IngestDelivery(self.ingest, self.session)


@implementer(smtp.IMessageDelivery)
class IngestDelivery:
    """One transaction's delivery policy, as Twisted defines C{IMessageDelivery}."""

    def __init__(self, ingest: Ingest, session: Session):
        self.ingest = ingest
        self.session = session
        self.transaction: Transaction | None = None

    def validateFrom(self, helo, origin):
        self.transaction = Transaction(self.ingest, self.session, origin)
        return origin

    def validateTo(self, user):
        """Fire with a callable making this recipient's L{IngestMessage}, or fail with the refusal."""
        transaction = self.transaction
        return self.ingest.route(user).addCallback(lambda recipient: lambda: transaction.message_for(recipient))

    def receivedHeader(self, helo, origin, recipients) -> bytes:
        return received_header(self.session, self.ingest.hostname, helo, recipients)


class Transaction:
    """
    One message however many recipients it has: its recipients, its spool,
    and keeping it (once). Its id is made when its first message is, at DATA,
    and written to the session for our Received: header and logs.
    """

    def __init__(self, ingest: Ingest, session: Session, origin: smtp.Address):
        self.ingest = ingest
        self.session = session
        self.origin = origin
        self.envelope: Envelope | None = None
        self.spool: Spool | None = None
        self._outcome: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._result = None

    def message_for(self, recipient: Recipient) -> "IngestMessage":
        if self.envelope is None:
            self.session.transaction_id = new_transaction_id()
            self.envelope = Envelope(
                id=self.session.transaction_id,
                peer=self.session.peer,
                proxy=self.session.proxy,
                tls=self.session.tls,
                helo=(self.session.helo or b"").decode("ascii", "replace"),
                mail_from=address_text(self.origin),
                received_at=datetime.now(timezone.utc),
            )
            writes = True
        else:
            writes = False
        self.envelope.recipients.append(recipient)
        return IngestMessage(self, writes)

    def line(self, line: bytes) -> None:
        if self.spool is None:
            self.spool = Spool(self.ingest.spool_dir, line + b"\r\n")
        else:
            self.write(line + b"\r\n")

    def write(self, chunk: bytes) -> None:
        if self.spool is None:
            self.spool = Spool(self.ingest.spool_dir)
        try:
            self.spool.write(chunk)
        except OSError as e:
            log.error("cannot spool a message: {error}", error=str(e))
            raise smtp.SMTPServerError(451, "4.3.0 Temporary local problem, try again later") from None
        if self.spool.header_too_large:
            raise smtp.SMTPServerError(552, "5.3.4 Header section too large")

    def outcome(self) -> defer.Deferred:
        """The outcome of keeping the message (kept at the first call), for each caller its own Deferred."""
        if self._outcome is None:
            if self.spool is None:
                self.spool = Spool(self.ingest.spool_dir)
            self._outcome = self.ingest.deliver(self.envelope, self.spool).addBoth(self._kept)
        if self._outcome.called:
            return defer.fail(self._result) if isinstance(self._result, Failure) else defer.succeed(self._result)
        waiting = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def _kept(self, result) -> None:
        self._result = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def discard(self) -> None:
        """The client went away or the message was refused: nothing is kept."""
        if self._outcome is None and self.spool is not None:
            self.spool.discard()


@implementer(IIngestMessage)
class IngestMessage:
    """One recipient's view of its L{Transaction}; only the first view made writes."""

    def __init__(self, transaction: Transaction, writes: bool):
        self.transaction = transaction
        self.writes = writes

    def lineReceived(self, line):
        if self.writes:
            self.transaction.line(line)

    def write(self, chunk):
        if self.writes:
            self.transaction.write(chunk)

    def eomReceived(self):
        return self.transaction.outcome()

    def connectionLost(self):
        self.transaction.discard()
