"""
The SMTP dialogue: Twisted's ESMTP, with what an Internet-facing ingest server
needs and Twisted leaves out.

- Commands are handled one at a time even when a client pipelines: while a
  recipient lookup, the end-of-DATA storage or a tarpit delay is pending,
  input is held, so replies come out in order and no recipient is dropped
  after its 250.
- DATA is read in bulk (L{mailingest.smtp.data_reader}) and handed to the
  transaction's messages a buffer at a time, with the size limit enforced as
  it arrives; it is answered 250 only once the message is stored, 451 when it
  could not be.
- Every reply carries an RFC 3463 enhanced status code, and errors are
  counted, delayed and finally cut off (L{mailingest.smtp.replies}).
- Limits, the idle timeout and the DATA pace: L{mailingest.smtp.limits}.

Delivery goes through Twisted's own seam: the protocol's C{deliveryFactory}
(an C{IMessageDeliveryFactory}, L{mailingest.delivery.transaction}) gives one
C{IMessageDelivery} per MAIL FROM, reached through Twisted's C{validateFrom},
C{validateTo} and C{receivedHeader}; its recipients' factories make the
C{IMessage}s DATA is written to. The session's facts (L{Session}) are handed to
delivery with it.

The ESMTP methods overridden, and why:

- C{connectionMade}, C{connectionLost}: the factory's connection limits before
  the greeting, the session's facts; nothing of an unfinished DATA is kept.
- C{dataReceived} (C{LineOnlyReceiver}'s): command lines one at a time, held
  while a reply is pending; DATA read in bulk, never a call per line; lines
  over 512 bytes, NUL and control bytes refused with our reply. Twisted's DATA
  state (C{do_DATA}'s C{state_DATA}, C{dataLineReceived}) is never entered.
- C{timeoutConnection}: a client waiting for our reply is not idle; our 421.
- C{greeting}, C{extensions}: our banner; SIZE, PIPELINING, 8BITMIME,
  ENHANCEDSTATUSCODES, SMTPUTF8 offered, AUTH not.
- C{lookupMethod}: verbs we know but do not implement get 502, not 500.
- C{do_HELO}, C{do_EHLO}, C{do_MAIL}, C{do_RCPT}, C{do_DATA}, C{do_RSET},
  C{do_QUIT}, C{do_UNKNOWN}, C{sendSyntaxError}, C{ext_STARTTLS},
  C{ext_AUTH}: our reply texts with enhanced codes, through the error budget;
  MAIL and RCPT read what Twisted's parser refuses (domain literals,
  quoted-pairs, SMTPUTF8 addresses) and the SIZE, BODY and SMTPUTF8
  parameters; the transaction is kept in our own attributes (Twisted's
  C{_helo}, C{_from} and C{_to} are private); STARTTLS drops plaintext
  pipelined after it and forgets the session's state (RFC 3207).

C{do_NOOP}, C{do_VRFY} and C{do_HELP} are ours (Twisted has none). Twisted's
C{sendCode} writes every reply, unchanged. No private Twisted name is used.
"""

import ipaddress
import re

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.protocols import policies

from mailingest.ops import metrics
from mailingest.delivery.ingest import Ingest
from mailingest.delivery.routing import address_text
from mailingest.delivery.session import Session
from mailingest.delivery.transaction import IngestDeliveryFactory
from mailingest.smtp import replies
from mailingest.smtp.address import mailbox
from mailingest.smtp.data_reader import DotReader, size_refusal
from mailingest.smtp.limits import MAX_COMMAND_LINE, PAUSE_BUFFER, DataPace, Limits, RefusalCounter
from mailingest.smtp.replies import Replies

# Verbs of RFC 5321 and older extensions we know but do not implement.
NOT_IMPLEMENTED = frozenset(
    {b"EXPN", b"ETRN", b"TURN", b"ATRN", b"BDAT", b"SEND", b"SOML", b"SAML", b"VERB", b"XCLIENT", b"XFORWARD"}
)
_UTF8_MAIL = re.compile(rb"\s*FROM:\s*(?P<path><[^<>\s]*>)(\s+(?P<opts>.*))?$", re.I)
_UTF8_RCPT = re.compile(rb"\s*TO:\s*(?P<path><[^<>\s]+>)(\s+(?P<opts>.*))?$", re.I)
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

log = Logger(namespace="mailingest.smtp")


class IngestSMTP(smtp.ESMTP):
    """One SMTP session. Built by L{IngestSMTPFactory}."""

    factory = None
    peer_key = ""
    admitted = False

    def __init__(self, deliveryFactory, session: Session, host: bytes, limits: Limits, tls_context=None, clock=None):
        super().__init__(contextFactory=tls_context)
        if clock is None:
            from twisted.internet import reactor as clock
        self.callLater = clock.callLater
        self.deliveryFactory = deliveryFactory
        self.session = session
        self.host = host
        self.limits = limits
        self.timeout = limits.timeout
        self.replies = Replies(self, clock, self._address_refusals)
        self.pace = DataPace(clock, limits, self._data_too_slow)
        self._inbuf = bytearray()
        self._holds = 0
        self._discarding_line = False
        self._sender: smtp.Address | None = None
        self._recipients: list[tuple[smtp.User, object]] = []
        self._reader: DotReader | None = None
        self._messages = ()

    def connectionMade(self):
        # After a PROXY header, getPeer() is the real client: limits count it.
        self.session.peer = getattr(self.transport.getPeer(), "host", None) or "local"
        self.session.proxy = _proxy_of(self.transport, self.session.peer)
        self.peer_key = peer_key(self.session.peer)
        if self.factory is not None and not self.factory.admit(self):
            self.sendCode(421, b"4.7.0 " + self.host + b" Too many connections, try again later")
            self.transport.loseConnection()
            return
        self.admitted = True
        super().connectionMade()

    # replies

    def reply(self, code: int, text: bytes, enhanced: bool = True) -> None:
        """Every reply but the unconditional 421s and STARTTLS's 220 goes through the error budget."""
        self.replies.reply(code, text, enhanced)

    def _address_refusals(self) -> int:
        return self.factory.refused_recipients(self.peer_key) if self.factory is not None else 0

    def cut_off(self, reason: str, text: bytes) -> None:
        metrics.REJECTED.labels(reason).inc()
        log.info("disconnecting {peer}: {reason}", peer=self.peer_key, reason=text.decode().lower(), event="rejected")
        self.sendCode(421, b"4.7.0 " + self.host + b" " + text + b", closing connection")
        self.transport.loseConnection()

    def timeoutConnection(self):
        """A command line must be complete within the timeout; a client waiting for us is not idle."""
        if self._paused:
            self.setTimeout(self.timeout)
            return
        log.info("disconnecting {peer}: timeout", peer=self.peer_key)
        self.sendCode(421, b"4.4.2 " + self.host + b" Timeout, closing connection")
        self.transport.loseConnection()

    def greeting(self):
        return self.host + b" ESMTP mailingest"

    def extensions(self):
        ext = super().extensions()
        ext.pop(b"AUTH", None)
        ext[b"SIZE"] = [str(self.limits.max_message_size).encode()]
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        ext[b"SMTPUTF8"] = None
        return ext

    # input: one command at a time, DATA in bulk

    def dataReceived(self, data):
        # Outside DATA only a complete command line counts as activity, so a
        # byte-at-a-time client is timed out (DATA has its own pace check).
        if self._reader is not None:
            self.resetTimeout()
            if not self._inbuf and not self._paused and not self.transport.disconnecting:
                # The bulk of DATA: straight to the reader, not copied through the buffer.
                consumed = self._reader.feed(data)
                if consumed is None:
                    return
                data = data[consumed:]
                self._end_of_data()
        self._inbuf += data
        if self._paused and len(self._inbuf) > PAUSE_BUFFER:
            self.transport.pauseProducing()
        self._process()
        self._notify_if_idle()

    def _process(self):
        while self._inbuf and not self._paused and not self.transport.disconnecting:
            if self._reader is not None:
                consumed = self._reader.feed(bytes(self._inbuf))
                if consumed is None:
                    self._inbuf.clear()
                    return
                del self._inbuf[:consumed]
                self._end_of_data()
                continue
            end = self._inbuf.find(b"\n")
            if end < 0:
                if len(self._inbuf) > MAX_COMMAND_LINE:
                    self._inbuf.clear()
                    if not self._discarding_line:
                        self._discarding_line = True
                        self.reply(500, b"5.5.2 Line too long")
                return
            line = bytes(self._inbuf[:end]).rstrip(b"\r")
            del self._inbuf[: end + 1]
            self.resetTimeout()
            if self._discarding_line:
                self._discarding_line = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self.reply(500, b"5.5.2 Line too long")
                continue
            if _BAD_COMMAND_BYTES.search(line) or not _acceptable_text(line):
                self.reply(500, b"5.5.2 Invalid characters in command")
                continue
            if self.factory is not None and self.factory.shutting_down and line[:4].upper() != b"QUIT":
                self.goodbye()
                return
            self.replies.command(line.split(None, 1)[0].upper() if line.strip() else b"")
            self.lineReceived(line)

    @property
    def _paused(self) -> bool:
        """Input is held while a lookup, storage or a tarpit delay is pending."""
        return self._holds > 0

    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        """One reason to hold input is over: go on with what the client pipelined."""
        self._holds -= 1
        if self._holds or self.transport.disconnecting:
            return
        self.resetTimeout()
        self.transport.resumeProducing()
        self._process()
        self._notify_if_idle()

    @property
    def busy(self) -> bool:
        """In DATA, or waiting for a lookup or for storage: not to be cut off."""
        return self._reader is not None or self._paused

    def _notify_if_idle(self) -> None:
        """Tell the factory when input has been handled and no transaction is left (it may be shutting down)."""
        if self.factory is not None and not self.busy:
            self.factory.idle(self)

    def goodbye(self) -> None:
        self.sendCode(421, b"4.3.2 " + self.host + b" Service shutting down, try again later")
        self.transport.loseConnection()

    def _wait_for(self, d: defer.Deferred) -> None:
        """Hold further input until C{d} has fired (and its reply is sent)."""
        if d.called:
            return
        self.hold()

        def resume(result):
            self.release()
            return result

        d.addBoth(resume)

    # commands

    def lookupMethod(self, command):
        if command.upper() in NOT_IMPLEMENTED:
            return self.do_not_implemented
        return super().lookupMethod(command)

    def do_not_implemented(self, rest):
        self.reply(502, b"5.5.1 Command not implemented")

    def ext_AUTH(self, rest):
        self.reply(503, b"5.5.1 Authentication not enabled")

    def do_HELO(self, rest):
        self._greeted(rest, esmtp=False)
        self.reply(250, self.host + b" Hello " + self.session.helo_pair[1], enhanced=False)

    def do_EHLO(self, rest):
        self._greeted(rest, esmtp=True)
        self.reply(250, self.host + b" Hello " + self.session.helo_pair[1] + b"\n" + self.listExtensions(), enhanced=False)

    def _greeted(self, rest: bytes, esmtp: bool) -> None:
        self.session.helo = rest
        self.session.esmtp = esmtp
        self._forget_transaction()

    def _forget_transaction(self) -> None:
        self._sender = None
        self._recipients = []

    def ext_STARTTLS(self, rest):
        if self.startedTLS or interfaces.ISSLTransport.providedBy(self.transport):
            self.reply(503, b"5.5.1 TLS already active")
        elif rest:
            self.reply(501, b"5.5.4 Syntax: STARTTLS")
        elif self.ctx is not None and self.canStartTLS:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self._discard_pipelined_plaintext()
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207: forget what the client said before TLS.
            self.session.helo = None
            self.session.esmtp = False
            self._forget_transaction()
        else:
            self.reply(454, b"4.7.0 TLS not available")

    def _discard_pipelined_plaintext(self) -> None:
        """
        What came after STARTTLS in plaintext must not run inside TLS (the
        CVE-2011-0411 class: an on-path attacker appends commands to the
        client's STARTTLS). Like Postfix, we answer 220 and drop it.
        """
        if not self._inbuf:
            return
        metrics.REJECTED.labels("pipelining").inc()
        log.warn(
            "improper command pipelining after STARTTLS from {peer}: {size} bytes discarded",
            peer=self.peer_key,
            size=len(self._inbuf),
            event="rejected",
        )
        self._inbuf.clear()
        self._discarding_line = False

    def do_NOOP(self, rest):
        self.reply(250, b"2.0.0 OK")

    def do_VRFY(self, rest):
        self.reply(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, rest):
        self.reply(214, b"2.0.0 See RFC 5321")

    def do_RSET(self, rest):
        self._forget_transaction()
        self.reply(250, b"2.0.0 OK")

    def do_QUIT(self, rest):
        self.reply(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest):
        self.reply(500, b"5.5.2 Command not recognised")

    def sendSyntaxError(self):
        self.reply(500, b"5.5.2 Syntax error")

    def do_MAIL(self, rest):
        if self._sender:
            self.reply(503, b"5.5.1 Sender already given")
            return
        m = self.mail_re.match(rest) or _UTF8_MAIL.match(rest)
        if not m:
            self.reply(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        self.session.smtputf8 = False
        error = self._check_mail_params(m.group("opts"))
        if error:
            self.reply(*error)
            return
        try:
            sender = mailbox(m.group("path"), self.host, self.session.smtputf8)
        except smtp.AddressError as e:
            self.reply(553, b"5.1.7 Bad sender address syntax" + (b": " + str(e).encode() if str(e) else b""))
            return
        self._recipients = []
        d = defer.maybeDeferred(self.validateFrom, self.session.helo_pair, sender)
        d.addCallbacks(self._sender_ok, self._sender_refused)
        self._wait_for(d)

    def _check_mail_params(self, opts: bytes | None):
        for param in (opts or b"").split():
            name, _, value = param.partition(b"=")
            name = name.upper()
            if name == b"SIZE":
                if not value.isdigit():
                    return 501, b"5.5.4 Bad SIZE parameter"
                if int(value) > self.limits.max_message_size:
                    metrics.REJECTED.labels("size").inc()
                    return 552, size_refusal(self.limits.max_message_size)
            elif name == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 501, b"5.5.4 Bad BODY parameter"
            elif name == b"SMTPUTF8" and not value:
                self.session.smtputf8 = True
            else:
                return 555, b"5.5.4 Unsupported MAIL FROM parameter " + name[:64]
        return None

    def _sender_ok(self, sender):
        self._sender = sender
        self.reply(250, b"2.1.0 Sender OK")

    def _sender_refused(self, failure):
        if failure.check(smtp.SMTPServerError):
            self.reply(failure.value.code, _reply_text(failure.value))
        else:
            log.failure("sender validation failed", failure)
            self.reply(451, b"4.3.0 Temporary failure, try again later")

    def do_RCPT(self, rest):
        if self.replies.address_over_limit():
            self.cut_off("refused_recipients", b"Too many refused recipients")
            return
        if not self._sender:
            self.reply(503, b"5.5.1 Need MAIL before RCPT")
            return
        m = self.rcpt_re.match(rest) or _UTF8_RCPT.match(rest)
        if not m:
            self.reply(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        if m.group("opts"):
            self.reply(555, b"5.5.4 Unsupported RCPT TO parameter")
            return
        if len(self._recipients) >= self.limits.max_recipients:
            metrics.REJECTED.labels("recipients").inc()
            self.reply(452, b"4.5.3 Too many recipients")
            return
        try:
            address = mailbox(m.group("path"), self.host, self.session.smtputf8)
        except smtp.AddressError as e:
            self._refused_recipient()
            self.reply(553, b"5.1.3 Bad recipient address syntax" + (b": " + str(e).encode() if str(e) else b""))
            return
        user = smtp.User(address, self.session.helo_pair, self, self._sender)
        d = defer.maybeDeferred(self.validateTo, user)
        d.addCallbacks(self._recipient_ok, self._recipient_refused, callbackArgs=(user,))
        self._wait_for(d)

    def _recipient_ok(self, message_factory, user):
        self._recipients.append((user, message_factory))
        self.reply(250, b"2.1.5 Recipient OK")

    def _recipient_refused(self, failure):
        if failure.check(smtp.SMTPServerError):
            if failure.value.code >= 500:
                self._refused_recipient()
            self.reply(failure.value.code, _reply_text(failure.value))
            log.info(
                "refused recipient {rcpt} from {peer}: {code} {reply}",
                rcpt=address_text(failure.value.addr) if isinstance(failure.value, smtp.SMTPAddressError) else "",
                peer=self.session.peer,
                code=failure.value.code,
                reply=failure.value.resp,
                event="rejected",
            )
        else:
            log.failure("recipient validation failed", failure)
            self.reply(451, b"4.3.0 Temporary failure, try again later")

    def _refused_recipient(self) -> None:
        if self.factory is not None:
            self.factory.refused_recipient(self.peer_key)

    def do_DATA(self, rest):
        if self._sender is None or not self._recipients:
            self.reply(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        sender, recipients = self._sender, self._recipients
        self._forget_transaction()
        self.session.tls = tls_description(self.transport)
        # Twisted's order (SMTP.do_DATA): every recipient's message, then our
        # trace header as each one's first line.
        messages = [make_message() for _, make_message in recipients]
        header = self.receivedHeader(self.session.helo_pair, sender, [user for user, _ in recipients])
        for message in messages:
            message.lineReceived(header)
        self._messages = messages
        self._reader = DotReader(self._write, self.limits.max_message_size)
        self.pace.start(lambda: self._reader.size)
        self.reply(354, b"End data with <CR><LF>.<CR><LF>")

    def _write(self, chunk: bytes) -> None:
        try:
            for message in self._messages:
                message.write(chunk)
        except smtp.SMTPServerError as e:
            self._reader.refuse(e.code, _reply_text(e))

    def _data_too_slow(self, size: int, elapsed: float) -> None:
        metrics.REJECTED.labels("slow").inc()
        log.info(
            "disconnecting {peer}: DATA too slow ({size} bytes in {elapsed:.0f} s)",
            peer=self.peer_key,
            size=size,
            elapsed=elapsed,
        )
        self.sendCode(421, b"4.4.2 " + self.host + b" Data too slow, closing connection")
        self.transport.loseConnection()

    def _end_of_data(self):
        self.pace.stop()
        reader, messages = self._reader, self._messages
        self._reader, self._messages = None, ()
        if reader.refusal is not None:
            for message in messages:
                message.connectionLost()
            code, reply = reader.refusal
            metrics.REJECTED.labels(_REFUSAL_REASONS.get(code, "syntax")).inc()
            log.info("refused message from {peer}: {reply}", peer=self.session.peer, reply=reply.decode(), event="rejected")
            self.reply(code, reply)
            return
        # One transaction, one outcome: every message of it answers alike.
        d = defer.DeferredList([message.eomReceived() for message in messages], consumeErrors=True)
        d.addCallback(self._delivered)
        self._wait_for(d)

    def _delivered(self, results) -> None:
        failures = [result for ok, result in results if not ok]
        if not failures:
            # A duplicate is answered like a new message (naming the row that
            # holds it), so the reply tells a stranger nothing about which ids are taken.
            ids = ", ".join(str(row_id) for _, row_id in results[0][1].rows)
            self.replies.message_stored()
            self.reply(250, b"2.0.0 Ok: stored as message " + ids.encode("ascii"))
        elif failures[0].check(smtp.SMTPServerError):
            self.reply(failures[0].value.code, _reply_text(failures[0].value))
        else:
            log.failure("delivery failed", failures[0])
            self.reply(451, b"4.3.0 Temporary failure, try again later")

    def connectionLost(self, reason):
        if not self.admitted:
            return
        self.pace.stop()
        self.replies.cancel()
        if self._reader is not None:
            for message in self._messages:
                message.connectionLost()
            log.info("client {peer} went away during DATA; nothing stored", peer=self.session.peer)
        self._reader, self._messages = None, ()
        super().connectionLost(reason)
        if self.factory is not None:
            self.factory.closed(self)


class IngestSMTPFactory(protocol.ServerFactory):
    """Builds sessions and enforces the connection limits."""

    noisy = False

    def __init__(
        self,
        ingest: Ingest,
        hostname: str,
        max_message_size: int,
        max_recipients: int,
        timeout: float,
        max_connections: int,
        max_connections_per_ip: int,
        tls_context=None,
        clock=None,
        refusals: RefusalCounter | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        # Shared by the intake processes when there are several.
        self.refusals = refusals or RefusalCounter(clock, replies.REFUSED_RECIPIENT_LIMIT, replies.REFUSED_RECIPIENT_WINDOW)
        self.ingest = ingest
        self.hostname = hostname.encode("idna")
        self.limits = Limits(max_message_size, max_recipients, timeout)
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.tls_context = tls_context
        self.by_peer: dict[str, int] = {}
        self.sessions: set[IngestSMTP] = set()
        self.awaiting_header: set = set()
        self.shutting_down = False
        self._drained: defer.Deferred | None = None

    def buildProtocol(self, addr):
        session = Session()
        p = IngestSMTP(IngestDeliveryFactory(self.ingest, session), session, self.hostname, self.limits, self.tls_context, self.clock)
        p.factory = self
        p.noisy = False
        return p

    def admit(self, connection) -> bool:
        """
        Count a new connection, or refuse it when a connection limit is
        reached. C{connection} is a session, or a connection still waiting for
        its PROXY header (it has a C{peer_key} too: the proxy's address).
        """
        peer = connection.peer_key
        if len(self.sessions) + len(self.awaiting_header) >= self.max_connections:
            limit = f"--max-connections {self.max_connections} reached"
        elif self.by_peer.get(peer, 0) >= self.max_connections_per_ip:
            limit = f"--max-connections-per-ip {self.max_connections_per_ip} reached for {peer}"
        else:
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
            (self.sessions if isinstance(connection, IngestSMTP) else self.awaiting_header).add(connection)
            metrics.OPEN_CONNECTIONS.inc()
            return True
        metrics.REJECTED.labels("connections").inc()
        log.warn("refused connection from {peer}: too many connections ({limit})", peer=peer, limit=limit)
        return False

    def refused_recipient(self, peer: str) -> None:
        """Note a refused recipient from C{peer}."""
        self.refusals.refused(peer)

    def refused_recipients(self, peer: str) -> int:
        """Recipients refused to C{peer} within the window (capped at the limit)."""
        return self.refusals.count(peer)

    def shutdown(self, grace: float, clock) -> defer.Deferred:
        """
        Close idle sessions at once (421 4.3.2) and each busy one as soon as
        its transaction ends (L{idle}); cut off what is left after C{grace}
        seconds. Fires when the last session has gone, or at the cut-off.
        """
        self.shutting_down = True
        for session in list(self.sessions):
            if not session.busy:
                self.idle(session)
        if not self.sessions:
            return defer.succeed(None)
        self._drained = defer.Deferred()
        cut_off = clock.callLater(grace, self._cut_off_at_shutdown)

        def drained(result):
            if cut_off.active():
                cut_off.cancel()
            return result

        return self._drained.addBoth(drained)

    def idle(self, session: IngestSMTP) -> None:
        """C{session} is between transactions: at shutdown, now is the time to close it."""
        if self.shutting_down and not session.transport.disconnecting:
            session.goodbye()

    def _cut_off_at_shutdown(self) -> None:
        for session in list(self.sessions):
            log.warn("cutting off {peer} at shutdown", peer=session.peer_key)
            session.transport.abortConnection()
        self._fire_drained()

    def _fire_drained(self) -> None:
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def closed(self, connection) -> None:
        self.sessions.discard(connection)
        self.awaiting_header.discard(connection)
        peer = connection.peer_key
        self.by_peer[peer] -= 1
        if not self.by_peer[peer]:
            del self.by_peer[peer]
        metrics.OPEN_CONNECTIONS.dec()
        if not self.sessions:
            self._fire_drained()


_REFUSAL_REASONS = {552: "size", 451: "temporary_failure"}


def _reply_text(error: smtp.SMTPServerError) -> bytes:
    """An C{SMTPServerError}'s reply text (Twisted's are text; bytes pass)."""
    resp = error.resp
    return resp if isinstance(resp, bytes) else resp.encode("utf-8", "replace")


def tls_description(transport) -> str | None:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' on a TLS connection (STARTTLS or implicit), else None."""
    if not interfaces.ISSLTransport.providedBy(transport):
        return None
    handle = transport.getHandle()
    try:
        return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
    except AttributeError:
        return "TLS"


def _proxy_of(transport, peer: str) -> str | None:
    """
    The load balancer's address when a PROXY header named the client: the
    session's transport is then a wrapper whose own transport's peer is not
    the client (a TLS wrapper's is).
    """
    if not isinstance(transport, policies.ProtocolWrapper):
        return None
    outer = getattr(transport.transport.getPeer(), "host", None)
    return outer if outer is not None and outer != peer else None


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


def peer_key(host: str) -> str:
    """The unit a per-address limit counts: the address, or its /64 for IPv6."""
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host
