"""
One DATA: the transaction's messages, written in bulk.

The messages are made when DATA begins, one per accepted recipient, and given
the trace header as their first line (Twisted's order in C{SMTP.do_DATA}).
The bytes then pass through a L{DotReader} (the terminator, dot-unstuffing,
the size and line limits) to every message a buffer at a time: an
L{IIngestMessage} takes them as they are; a plain Twisted C{IMessage} is
adapted (L{LineMessage}) and fed a line at a time. The transaction ends in
one refusal or one outcome for all its messages.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.python.components import registerAdapter
from zope.interface import implementer

from mailingest.interfaces import IDeliveryOutcome, IIngestMessage
from mailingest.ops import metrics
from mailingest.smtp.command_input import ITransferInput
from mailingest.smtp.data_reader import DotReader
from mailingest.smtp.replies import reply_text

_REFUSAL_REASONS = {552: "size", 451: "temporary_failure"}

log = Logger(namespace="mailingest.smtp")


@implementer(ITransferInput)
class DataTransfer:
    """The messages of one transaction, and the reader their data comes through."""

    def __init__(self, messages: list[IIngestMessage], max_message_size: int):
        self._messages = messages
        self._reader = DotReader(self._write, max_message_size)

    @classmethod
    def begin(
        cls,
        delivery: IMessageDelivery,
        helo: tuple[bytes, bytes],
        sender: smtp.Address,
        recipients: list,
        max_message_size: int,
    ) -> "DataTransfer":
        """
        Every recipient's message (C{recipients} are C{(smtp.User, make_message)}
        pairs), each given the transaction's one trace header. Raises what the
        delivery raised, once the messages made so far are discarded.
        """
        messages = []
        try:
            for _, make_message in recipients:
                messages.append(IIngestMessage(make_message()))
            header = delivery.receivedHeader(helo, sender, [user for user, _ in recipients])
            for message in messages:
                message.lineReceived(header)
        except Exception:
            for message in messages:
                message.connectionLost()
            raise
        return cls(messages, max_message_size)

    @property
    def size(self) -> int:
        """The bytes of message data so far."""
        return self._reader.size

    def feed(self, data: bytes) -> int | None:
        return self._reader.feed(data)

    def _write(self, chunk: bytes) -> None:
        try:
            for message in self._messages:
                message.write(chunk)
        except smtp.SMTPServerError as e:
            self._reader.refuse(e.code, reply_text(e))

    def refusal(self, peer: str) -> tuple[int, bytes] | None:
        """
        At the end of the data: the reply when it was refused (too large, a
        line too long, a message could not take it), counted and logged.
        """
        if self._reader.refusal is None:
            return None
        self.discard()
        code, reply = self._reader.refusal
        metrics.REJECTED.labels(_REFUSAL_REASONS.get(code, "syntax")).inc()
        log.info("refused message from {peer}: {reply}", peer=peer, reply=reply.decode(), event="rejected")
        return code, reply

    def discard(self) -> None:
        """Nothing of this transaction is to be kept."""
        for message in self._messages:
            message.connectionLost()

    async def stored(self) -> IDeliveryOutcome | None:
        """One transaction, one outcome: the first failure is raised for all, else the first outcome."""
        if len(self._messages) == 1:
            return IDeliveryOutcome(await defer.maybeDeferred(self._messages[0].eomReceived), None)
        results = await defer.DeferredList([defer.maybeDeferred(m.eomReceived) for m in self._messages], consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.raiseException()
        return IDeliveryOutcome(results[0][1], None)


def stored_reply(outcome: IDeliveryOutcome | None) -> bytes:
    """The 250 text once a transaction is stored."""
    if outcome is None:
        return b"2.0.0 Ok"
    # A duplicate is answered like a new message (naming the row that
    # holds it), so the reply tells a stranger nothing about which ids are taken.
    ids = ", ".join(str(row_id) for row_id in outcome.ids)
    return b"2.0.0 Ok: stored as message " + ids.encode("ascii")


@implementer(IIngestMessage)
class LineMessage:
    """
    A message that provides only Twisted's C{IMessage}, fed as Twisted's own
    DATA state feeds it: a line at a time, without its CRLF.
    """

    def __init__(self, message: IMessageSMTP):
        self.message = message
        self._partial = b""

    def lineReceived(self, line: bytes) -> None:
        self.message.lineReceived(line)

    def write(self, chunk: bytes) -> None:
        # The reader bounds a line (data_reader.MAX_LINE), so the partial line is bounded too.
        lines = (self._partial + chunk).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            self.message.lineReceived(line)

    def eomReceived(self) -> defer.Deferred:
        # The data before the terminating "." always ends in CRLF: nothing is left partial.
        return self.message.eomReceived()

    def connectionLost(self) -> None:
        self.message.connectionLost()


registerAdapter(LineMessage, IMessageSMTP, IIngestMessage)
