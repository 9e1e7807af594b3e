"""
A session's input: one command at a time, DATA in bulk.

Bytes are buffered and cut into command lines, each vetted (its length, NUL,
control and 8-bit bytes) before the protocol runs it. While a reply is pending
(a recipient lookup, the end-of-DATA storage, a tarpit delay) input is held,
so pipelined commands are answered in order and none runs before the reply to
the one before it; past C{PAUSE_BUFFER} held bytes the transport is paused.
During DATA the bytes go to the open transfer, straight from the transport
when nothing is held, until its terminating CRLF "." CRLF.
"""

import re
from typing import Coroutine

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from mailingest.ops import metrics
from mailingest.smtp.limits import MAX_COMMAND_LINE, PAUSE_BUFFER

_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

log = Logger(namespace="mailingest.smtp")


class ICommandChannel(Interface):
    """What the input needs from the protocol."""

    transport = Attribute("The connection's transport: C{disconnecting}, C{pauseProducing}, C{resumeProducing}.")

    def resetTimeout():
        """The client is not idle: a complete command line, or DATA, came (Twisted's C{TimeoutMixin})."""

    def reply(code: int, text: bytes, enhanced: bool = True):
        """Refuse a command line that is not run."""

    def command(line: bytes):
        """Run one vetted command line (without its line end)."""

    def data_ended(transfer):
        """The transfer's terminating CRLF "." CRLF has come."""

    def idle():
        """What the client sent is handled, and no transaction is under way (L{CommandInput.busy} is false)."""


class ITransferInput(Interface):
    """What the input needs from the DATA being read (L{mailingest.smtp.transfer.DataTransfer})."""

    def feed(data: bytes):
        """Take the next bytes: None when all were data, else how many were, up to and including the terminator."""


class CommandInput:
    """The input of one session (L{ICommandChannel})."""

    def __init__(self, channel: ICommandChannel):
        self._channel = channel
        self._buffer = bytearray()
        self._holds = 0
        self._discarding_line = False
        self.transfer: ITransferInput | None = None

    @property
    def held(self) -> bool:
        """Input is held while a lookup, storage or a tarpit delay is pending."""
        return self._holds > 0

    @property
    def busy(self) -> bool:
        """In DATA, or waiting for a lookup or for storage."""
        return self.transfer is not None or self.held

    def read_data(self, transfer: ITransferInput) -> None:
        """DATA has begun: what follows is C{transfer}'s until its terminator."""
        self.transfer = transfer

    def received(self, data: bytes) -> None:
        """Bytes from the client (the protocol's C{dataReceived})."""
        # Outside DATA only a complete command line counts as activity, so a
        # byte-at-a-time client is timed out (DATA has its own pace check).
        transport = self._channel.transport
        if self.transfer is not None:
            self._channel.resetTimeout()
            if not self._buffer and not self.held and not transport.disconnecting:
                # The bulk of DATA: straight to the transfer, not copied through the buffer.
                consumed = self.transfer.feed(data)
                if consumed is None:
                    return
                data = data[consumed:]
                self._data_ended()
        self._buffer += data
        if self.held and len(self._buffer) > PAUSE_BUFFER:
            transport.pauseProducing()
        self._process()
        self._notify_if_idle()

    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        """One reason to hold input is over: go on with what the client pipelined."""
        self._holds -= 1
        transport = self._channel.transport
        if self._holds or transport.disconnecting:
            return
        self._channel.resetTimeout()
        transport.resumeProducing()
        self._process()
        self._notify_if_idle()

    def hold_until(self, work: Coroutine) -> None:
        """
        Run the coroutine C{work}; hold further input until it has finished
        (and sent its reply). Work that fails unexpectedly is logged and
        answered 451: a client waiting for a reply is never timed out, so it
        would wait for ever.
        """
        d = defer.Deferred.fromCoroutine(work).addErrback(self._unexpected)
        if d.called:
            return
        self.hold()

        def resume(result):
            self.release()
            return result

        d.addBoth(resume)

    def _unexpected(self, failure) -> None:
        log.failure("a command failed unexpectedly", failure)
        self._channel.reply(451, b"4.3.0 Temporary failure, try again later")

    def _notify_if_idle(self) -> None:
        if not self.busy:
            self._channel.idle()

    def discard_after_starttls(self, peer: str) -> None:
        """
        What came after STARTTLS in plaintext must not run inside TLS (the
        CVE-2011-0411 class: an on-path attacker appends commands to the
        client's STARTTLS). Like Postfix, we answer 220 and drop it.
        """
        if not self._buffer:
            return
        metrics.REJECTED.labels("pipelining").inc()
        log.warn(
            "improper command pipelining after STARTTLS from {peer}: {size} bytes discarded",
            peer=peer,
            size=len(self._buffer),
            event="rejected",
        )
        self._buffer.clear()
        self._discarding_line = False

    def _process(self) -> None:
        while self._buffer and not self.held and not self._channel.transport.disconnecting:
            if self.transfer is not None:
                consumed = self.transfer.feed(bytes(self._buffer))
                if consumed is None:
                    self._buffer.clear()
                    return
                del self._buffer[:consumed]
                self._data_ended()
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._buffer.clear()
                    if not self._discarding_line:
                        self._discarding_line = True
                        self._channel.reply(500, b"5.5.2 Line too long")
                return
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            self._channel.resetTimeout()
            if self._discarding_line:
                self._discarding_line = False
            elif len(line) > MAX_COMMAND_LINE:
                self._channel.reply(500, b"5.5.2 Line too long")
            elif _BAD_COMMAND_BYTES.search(line) or not _acceptable_text(line):
                self._channel.reply(500, b"5.5.2 Invalid characters in command")
            else:
                self._channel.command(line)

    def _data_ended(self) -> None:
        transfer, self.transfer = self.transfer, None
        self._channel.data_ended(transfer)


def _acceptable_text(line: bytes) -> bool:
    """ASCII, or UTF-8 in MAIL and RCPT (the addresses of SMTPUTF8)."""
    if line.isascii():
        return True
    if line[:4].upper() not in (b"MAIL", b"RCPT"):
        return False
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
