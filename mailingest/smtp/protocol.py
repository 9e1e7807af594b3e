"""
The SMTP dialogue: Twisted's ESMTP, with what an Internet-facing ingest server
needs and Twisted leaves out.

- Commands are handled one at a time even when a client pipelines: while a
  recipient lookup, the end-of-DATA storage or a tarpit delay is pending,
  input is held, so replies come out in order and no recipient is dropped
  after its 250 (L{mailingest.smtp.command_input}).
- DATA is read in bulk (L{mailingest.smtp.data_reader}) and handed to the
  transaction's messages a buffer at a time, with the size limit enforced as
  it arrives (L{mailingest.smtp.transfer}); it is answered 250 only once the
  message is stored, 451 when it could not be.
- MAIL FROM and RCPT TO are read by L{mailingest.smtp.envelope}: the paths
  Twisted's patterns refuse and the parameters it drops.
- Every reply carries an RFC 3463 enhanced status code, and errors are
  counted, delayed and finally cut off (L{mailingest.smtp.replies}).
- Limits, the idle timeout and the DATA pace: L{mailingest.smtp.limits}.

Delivery is given, as Twisted's own factories give it: L{IngestSMTPFactory}
is given an L{ISMTPDelivery}, which makes each connection's
C{IMessageDeliveryFactory}; the protocol asks that for one
C{IMessageDelivery} per MAIL FROM and calls its C{validateFrom},
C{validateTo} and C{receivedHeader} itself (Twisted's C{SMTP.validateFrom}
and friends, which fill C{self.delivery} as a side effect, are not used). The
recipients' factories make the messages DATA is written to: an
L{IIngestMessage} takes DATA in bulk; a plain Twisted C{IMessage} is adapted
(L{mailingest.smtp.transfer.LineMessage}) and fed a line at a time.
C{eomReceived} may fire with an L{IDeliveryOutcome}, whose ids the 250 names.
Nothing else of the delivery is touched; the connection's facts (L{Session})
are the delivery's to read.

Every method of Twisted's C{ESMTP} still overridden, and why. Where Twisted
lacks a hook, the hook that would make the override unnecessary follows
"Upstream:" (the list we would propose to Twisted).

- C{__init__}: takes the delivery factory, session, limits and clock; no hook
  missing (Twisted's C{ESMTP.__init__} does not pass C{deliveryFactory} on to
  C{SMTP.__init__}, so it is set here).
- C{connectionMade} (extends): the factory's connection limits before the
  greeting, and the session's facts. Upstream: a refusal hook run before the
  greeting (C{SMTP.admit()} returning None or a 421 text).
- C{dataReceived} (C{LineOnlyReceiver}'s, replaced): a command line at a time,
  held while a reply is pending; lines over 512 bytes, NUL, control and 8-bit
  bytes refused with our reply; each line dispatched through Twisted's
  C{lookupMethod} (C{lineReceived} and its C{mode} states are not used); DATA
  read in bulk. The input is L{CommandInput}'s. Upstream: (1) C{SMTP} pausing
  line delivery while a C{validateFrom}/C{validateTo}/C{eomReceived} Deferred
  is pending (today it answers pipelined commands out of order); (2) DATA in
  raw mode, handed to messages in buffers through an C{IMessageSMTP} extension
  with a C{write(bytes)} (or C{IConsumer}) and a size limit; (3) a
  C{commandReceived} hook to vet a command line before dispatch.
- C{connectionLost} (extends): our DATA state is ours to discard (Twisted's is
  in name-mangled attributes). Goes with DATA in raw mode, upstream (2).
- C{timeoutConnection}: a client waiting for our reply is not idle; our 421.
  Upstream: (1) above, and replies as data (4) below.
- C{greeting}, C{extensions}: our banner; SIZE, PIPELINING, 8BITMIME,
  ENHANCEDSTATUSCODES, SMTPUTF8 offered. These are Twisted's customisation
  points; no hook missing.
- C{do_HELO}, C{do_EHLO}, C{do_RSET}, C{do_QUIT}, C{do_UNKNOWN}: our reply
  texts with enhanced codes, through the error budget; the HELO name and the
  transaction in our attributes (Twisted's C{_helo}, C{_from}, C{_to} are
  private; the transaction is a L{MailTransaction}). Upstream: (4) replies as
  data: each reply Twisted sends taken from a table a subclass can replace
  (code, enhanced code, text), every one sent through one overridable
  C{reply()} rather than C{sendCode} from each handler; and public
  C{helo}/C{origin}/C{recipients} attributes.
- C{do_MAIL}, C{do_RCPT}: what Twisted's parser refuses (domain literals,
  quoted-pairs, SMTPUTF8 addresses) and the SIZE, BODY and SMTPUTF8 parameters
  (Twisted parses C{opts} and drops them, L{mailingest.smtp.envelope}); the
  delivery asked explicitly (L{MailTransaction}). Upstream: (5) an RFC
  5321/6531 address parser and a C{mailParameters} hook given the parsed
  parameters; and (4).
- C{do_DATA}: DATA in bulk, one trace header for the transaction, and the
  end-of-data result as our reply (L{mailingest.smtp.transfer.DataTransfer}):
  Twisted's private C{_messageHandled} turns every failure into 550. Upstream:
  (2), and (6) a public C{messageHandled} that answers an C{SMTPServerError}'s
  own code (a 451 stays a 451).
- C{ext_STARTTLS}: refuses an argument and a second TLS (implicit TLS
  included), drops plaintext pipelined after STARTTLS and forgets the HELO
  and the transaction (RFC 3207; the CVE-2011-0411 class). Upstream: (7)
  Twisted's own STARTTLS doing so.
- C{ext_AUTH}: AUTH is not offered; Twisted answers 504 there (and a bare
  C{AUTH} raises IndexError). Upstream: (8) 503 when no mechanism is offered.

Not overridden any more: C{lookupMethod} (the verbs we know but do not
implement are C{do_} aliases answering 502), C{sendSyntaxError} (an empty line
is answered by our dispatch), C{validateFrom}, C{validateTo},
C{receivedHeader}, C{lineReceived}. C{do_NOOP}, C{do_VRFY} and C{do_HELP} are
ours (Twisted has none). Twisted's C{sendCode} writes every reply, unchanged.
No private Twisted name is used.
"""

import ipaddress

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.protocols import policies
from zope.interface import implementer

from mailingest.interfaces import ISMTPDelivery
from mailingest.ops import metrics
from mailingest.delivery.session import Session
from mailingest.smtp import replies
from mailingest.smtp.command_input import CommandInput, ICommandChannel
from mailingest.smtp.limits import AddressWindow, DataPace, Limits
from mailingest.smtp.replies import IReplyChannel, Replies
from mailingest.smtp.transaction import ITransactionChannel, MailTransaction
from mailingest.smtp.transfer import DataTransfer

log = Logger(namespace="mailingest.smtp")


@implementer(IReplyChannel, ICommandChannel, ITransactionChannel)
class IngestSMTP(smtp.ESMTP):
    """One SMTP session. Built by L{IngestSMTPFactory}."""

    factory = None
    peer_key = ""
    admitted = False

    def __init__(
        self, deliveryFactory: IMessageDeliveryFactory, session: Session, host: bytes, limits: Limits, tls_context=None, clock=None
    ):
        super().__init__(contextFactory=tls_context)
        if clock is None:
            from twisted.internet import reactor as clock
        self.callLater = clock.callLater
        self.deliveryFactory = IMessageDeliveryFactory(deliveryFactory)
        self.session = session
        self.host = host
        self.limits = limits
        self.timeout = limits.timeout
        self.replies = Replies(self, clock, self._address_refusals)
        self.pace = DataPace(clock, limits, self._data_too_slow)
        self.input = CommandInput(self)
        self.transaction = MailTransaction(self, self.deliveryFactory)

    def connectionMade(self):
        # After a PROXY header, getPeer() is the real client: limits count it.
        self.session.peer = getattr(self.transport.getPeer(), "host", None) or "local"
        self.session.proxy = _proxy_of(self.transport, self.session.peer)
        self.peer_key = peer_key(self.session.peer)
        if self.factory is not None and not self.factory.admit(self):
            self._close(b"4.7.0", b"Too many connections, try again later")
            return
        self.admitted = True
        super().connectionMade()

    # replies

    def reply(self, code: int, text: bytes, enhanced: bool = True) -> None:
        """Every reply but the unconditional 421s and STARTTLS's 220 goes through the error budget."""
        self.replies.reply(code, text, enhanced)

    def _address_refusals(self) -> int:
        return self.factory.refused_recipients(self.peer_key) if self.factory is not None else 0

    def _close(self, enhanced: bytes, text: bytes) -> None:
        """A 421 naming us, then the connection closed."""
        self.sendCode(421, enhanced + b" " + self.host + b" " + text)
        self.transport.loseConnection()

    def cut_off(self, reason: str, text: bytes) -> None:
        metrics.REJECTED.labels(reason).inc()
        log.info("disconnecting {peer}: {reason}", peer=self.peer_key, reason=text.decode().lower(), event="rejected")
        self._close(b"4.7.0", text + b", closing connection")

    def goodbye(self) -> None:
        self._close(b"4.3.2", b"Service shutting down, try again later")

    def timeoutConnection(self):
        """A command line must be complete within the timeout; a client waiting for us is not idle."""
        if self.input.held:
            self.setTimeout(self.timeout)
            return
        log.info("disconnecting {peer}: timeout", peer=self.peer_key)
        self._close(b"4.4.2", b"Timeout, closing connection")

    def greeting(self):
        return self.host + b" ESMTP mailingest"

    def extensions(self):
        # Twisted's lists AUTH only with a mechanism (we give none) and STARTTLS when it can start.
        ext = super().extensions()
        ext[b"SIZE"] = [str(self.limits.max_message_size).encode()]
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        ext[b"SMTPUTF8"] = None
        return ext

    # input: L{CommandInput}, one command at a time, DATA in bulk

    def dataReceived(self, data):
        self.input.received(data)

    def command(self, line: bytes) -> None:
        """
        Run one command line, as Twisted's C{state_COMMAND} would, through
        its public C{lookupMethod}: the verb's C{do_} or C{ext_} method.
        """
        if self.factory is not None and self.factory.shutting_down and line[:4].upper() != b"QUIT":
            self.goodbye()
            return
        parts = line.strip().split(None, 1)
        verb = parts[0].upper() if parts else b""
        self.replies.command(verb)
        if not parts:
            self.reply(500, b"5.5.2 Syntax error")
            return
        # lookupMethod takes ASCII only; an 8-bit verb (a UTF-8 line starting MAIL or RCPT) is no verb we know.
        method = (self.lookupMethod(verb) if verb.isascii() else None) or self.do_UNKNOWN
        method(parts[1] if len(parts) == 2 else b"")

    def hold(self) -> None:
        self.input.hold()

    def release(self) -> None:
        self.input.release()

    def wait_for(self, work) -> None:
        self.input.hold_until(work)

    @property
    def busy(self) -> bool:
        """In DATA, or waiting for a lookup or for storage: not to be cut off."""
        return self.input.busy

    def idle(self) -> None:
        """Tell the factory (it may be shutting down)."""
        if self.factory is not None:
            self.factory.idle(self)

    # commands

    def _not_implemented(self, rest):
        self.reply(502, b"5.5.1 Command not implemented")

    # Verbs of RFC 5321 and older extensions we know but do not implement.
    do_EXPN = do_ETRN = do_TURN = do_ATRN = do_BDAT = do_SEND = do_SOML = do_SAML = _not_implemented
    do_VERB = do_XCLIENT = do_XFORWARD = _not_implemented

    def ext_AUTH(self, rest):
        self.reply(503, b"5.5.1 Authentication not enabled")

    def do_HELO(self, rest):
        self._greeted(rest, esmtp=False)
        self.reply(250, self.host + b" Hello " + self.session.helo_pair[1], enhanced=False)

    def do_EHLO(self, rest):
        self._greeted(rest, esmtp=True)
        self.reply(250, self.host + b" Hello " + self.session.helo_pair[1] + b"\n" + self.listExtensions(), enhanced=False)

    def _greeted(self, rest: bytes | None, esmtp: bool) -> None:
        self.session.helo = rest
        self.session.esmtp = esmtp
        self.transaction.forget()

    def ext_STARTTLS(self, rest):
        if self.startedTLS or interfaces.ISSLTransport.providedBy(self.transport):
            self.reply(503, b"5.5.1 TLS already active")
        elif rest:
            self.reply(501, b"5.5.4 Syntax: STARTTLS")
        elif self.ctx is not None and self.canStartTLS:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self.input.discard_after_starttls(self.peer_key)
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207: forget what the client said before TLS.
            self._greeted(None, esmtp=False)
        else:
            self.reply(454, b"4.7.0 TLS not available")

    def do_NOOP(self, rest):
        self.reply(250, b"2.0.0 OK")

    def do_VRFY(self, rest):
        self.reply(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, rest):
        self.reply(214, b"2.0.0 See RFC 5321")

    def do_RSET(self, rest):
        self.transaction.forget()
        self.reply(250, b"2.0.0 OK")

    def do_QUIT(self, rest):
        self.reply(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest):
        self.reply(500, b"5.5.2 Command not recognised")

    def do_MAIL(self, rest):
        self.transaction.mail(rest)

    def do_RCPT(self, rest):
        if self.replies.address_over_limit():
            self.cut_off("refused_recipients", b"Too many refused recipients")
            return
        self.transaction.rcpt(rest)

    def refused_recipient(self) -> None:
        if self.factory is not None:
            self.factory.refused_recipient(self.peer_key)

    def do_DATA(self, rest):
        self.transaction.data(tls_description(self.transport))

    def read_data(self, transfer: DataTransfer) -> None:
        self.input.read_data(transfer)
        self.pace.start(lambda: transfer.size)

    def _data_too_slow(self, size: int, elapsed: float) -> None:
        metrics.REJECTED.labels("slow").inc()
        log.info(
            "disconnecting {peer}: DATA too slow ({size} bytes in {elapsed:.0f} s)",
            peer=self.peer_key,
            size=size,
            elapsed=elapsed,
        )
        self._close(b"4.4.2", b"Data too slow, closing connection")

    def data_ended(self, transfer: DataTransfer) -> None:
        self.pace.stop()
        self.transaction.data_ended(transfer)

    def message_stored(self) -> None:
        self.replies.message_stored()

    def connectionLost(self, reason):
        if not self.admitted:
            return
        self.pace.stop()
        self.replies.cancel()
        if self.input.transfer is not None:
            self.input.transfer.discard()
            self.input.transfer = None
            log.info("client {peer} went away during DATA; nothing stored", peer=self.session.peer)
        super().connectionLost(reason)
        if self.factory is not None:
            self.factory.closed(self)


class IngestSMTPFactory(protocol.ServerFactory):
    """
    Builds sessions and enforces the connection limits. Given C{delivery},
    as Twisted's C{SMTPFactory} is given its delivery: each session gets
    C{delivery.deliveryFactory(session)}.
    """

    noisy = False

    def __init__(
        self,
        delivery: ISMTPDelivery,
        hostname: str,
        max_message_size: int,
        max_recipients: int,
        timeout: float,
        max_connections: int,
        max_connections_per_ip: int,
        tls_context=None,
        clock=None,
        refusals: AddressWindow | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        # Shared by the intake processes when there are several.
        if refusals is None:  # an empty window is falsy (it has a length)
            refusals = AddressWindow(clock, replies.REFUSED_RECIPIENT_LIMIT, replies.REFUSED_RECIPIENT_WINDOW)
        self.refusals = refusals
        self.delivery = ISMTPDelivery(delivery)
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
        p = IngestSMTP(self.delivery.deliveryFactory(session), session, self.hostname, self.limits, self.tls_context, self.clock)
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
        self.refusals.add(peer)

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
