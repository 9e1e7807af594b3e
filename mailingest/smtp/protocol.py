"""
The SMTP dialogue: Twisted's ESMTP, with what an Internet-facing ingest server
needs and Twisted leaves out.

- Commands are handled one at a time even when a client pipelines: while a
  recipient lookup or the end-of-DATA storage is pending, input is buffered,
  so replies come out in order and no recipient is dropped after its 250.
- DATA is read in bulk (L{mailingest.smtp.data_reader}) into a spool file, with the
  size limit enforced as it arrives.
- The end of DATA is answered 250 only when the delivery policy has stored the
  message, and 451 when it could not (Twisted would say 550).
- Every reply carries an RFC 3463 enhanced status code.
- Errors are counted per session and refused recipients also per client
  address over a window (L{IngestSMTPFactory}); past a few, error replies are
  delayed (a tarpit, with input held, never blocking), and past a limit the
  client is cut off: guessing organisations is slow and short.
"""

import collections
import ipaddress
import re

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.mail import smtp

from mailingest.ops import metrics
from mailingest.smtp import address as smtp_address
from mailingest.delivery.ingest import Envelope, new_transaction_id
from mailingest.smtp.data_reader import DotReader, size_refusal
from mailingest.delivery.spool import Spool

# RFC 5321 4.5.3.1.4: 512 octets including CRLF (we allow 512 without it).
MAX_COMMAND_LINE = 512
PAUSE_BUFFER = 1 << 20
# Like Postfix's smtpd_soft_error_limit, smtpd_error_sleep_time and
# smtpd_hard_error_limit: errors (5xx replies) are counted over the session and
# never forgiven by a later success; past SOFT_ERROR_LIMIT each further error
# reply waits ERROR_SLEEP_SECONDS more than the last (up to
# MAX_ERROR_SLEEP_SECONDS), and at ERROR_LIMIT the client is cut off.
SOFT_ERROR_LIMIT = 5
ERROR_SLEEP_SECONDS = 1.0
MAX_ERROR_SLEEP_SECONDS = 5.0
ERROR_LIMIT = 20
# Like Postfix's smtpd_junk_command_limit: past this many of these commands
# without a message stored, each one counts as an error.
JUNK_COMMAND_LIMIT = 100
JUNK_COMMANDS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP", b"HELO", b"EHLO"})
# Refused recipients from one client address (peer_key) within the window,
# over all its sessions: they raise the tarpit delay of every session from
# that address, and at the limit its RCPTs get 421 until the window moves on.
REFUSED_RECIPIENT_LIMIT = 50
REFUSED_RECIPIENT_WINDOW = 600.0
# Verbs of RFC 5321 and older extensions we know but do not implement.
NOT_IMPLEMENTED = frozenset(
    {b"EXPN", b"ETRN", b"TURN", b"ATRN", b"BDAT", b"SEND", b"SOML", b"SAML", b"VERB", b"XCLIENT", b"XFORWARD"}
)
# Slow-drip bounds: after a grace period DATA must average MIN_DATA_RATE
# bytes/s, and never take longer than MAX_DATA_SECONDS in all.
MIN_DATA_RATE = 500
DATA_RATE_GRACE_SECONDS = 30.0
MAX_DATA_SECONDS = 1800.0
DATA_CHECK_SECONDS = 5.0
_UTF8_MAIL = re.compile(rb"\s*FROM:\s*(?P<path><[^<>\s]*>)(\s+(?P<opts>.*))?$", re.I)
_UTF8_RCPT = re.compile(rb"\s*TO:\s*(?P<path><[^<>\s]+>)(\s+(?P<opts>.*))?$", re.I)
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_ENHANCED = re.compile(rb"\A[245]\.\d{1,3}\.\d{1,3}( |\Z)")
_DEFAULT_ENHANCED = {
    211: b"2.0.0",
    214: b"2.0.0",
    221: b"2.0.0",
    250: b"2.0.0",
    251: b"2.1.5",
    252: b"2.5.0",
    421: b"4.3.0",
    450: b"4.2.0",
    451: b"4.3.0",
    452: b"4.3.1",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    550: b"5.0.0",
    552: b"5.3.4",
    553: b"5.1.3",
    554: b"5.0.0",
    555: b"5.5.4",
}

log = Logger(namespace="mailingest.smtp")


class IngestSMTP(smtp.ESMTP):
    """One SMTP session. Settings come from L{IngestSMTPFactory}."""

    max_message_size = 52428800
    max_recipients = 100
    spool_dir = None
    factory = None
    peer_key = ""
    admitted = False
    min_data_rate = MIN_DATA_RATE
    max_data_seconds = MAX_DATA_SECONDS
    _data_watch = None
    _tarpit = None

    def __init__(self, delivery, host: bytes, tls_context=None, clock=None):
        super().__init__(contextFactory=tls_context)
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.callLater = clock.callLater
        self.delivery = delivery
        self.host = host
        self._inbuf = bytearray()
        self._holds = 0
        self._discarding_line = False
        self._reader = None
        self._envelope = None
        self._spool = None
        self._esmtp = False
        self._smtputf8 = False
        self._errors = 0
        self._junk = 0
        self._junk_penalty = False
        self.transaction_id = ""

    def connectionMade(self):
        # After a PROXY header, getPeer() is the real client: limits count it.
        self.peer_key = peer_key(getattr(self.transport.getPeer(), "host", "local"))
        if self.factory is not None and not self.factory.admit(self):
            smtp.SMTP.sendCode(
                self, 421, b"4.7.0 " + self.host + b" Too many connections, try again later"
            )
            self.transport.loseConnection()
            return
        self.admitted = True
        super().connectionMade()

    # replies

    def sendCode(self, code, message=b""):
        """Add the enhanced status code Twisted's own replies lack."""
        if code not in (220, 354) and code in _DEFAULT_ENHANCED and not _ENHANCED.match(message):
            message = _DEFAULT_ENHANCED[code] + b" " + message
        self._reply(code, message)

    def _reply(self, code: int, message: bytes) -> None:
        """
        Send a reply; an error (a 5xx, or a junk command past its limit) is
        counted, delayed when the tarpit applies, and may end the session.
        A 4xx is not the client's error: 452 4.5.3 (too many recipients) is
        how a long recipient list is split, 451 is our own trouble.
        """
        penalty, self._junk_penalty = self._junk_penalty, False
        if code < 500 and not penalty:
            super().sendCode(code, message)
            return
        self._errors += 1
        delay = self._tarpit_delay()
        if not delay:
            self._error_sent(code, message)
            return
        self._hold()
        self._tarpit = self.clock.callLater(delay, self._tarpit_over, code, message)

    def _tarpit_delay(self) -> float:
        level = self._errors
        if self.factory is not None:
            level = max(level, self.factory.refused_recipients(self.peer_key))
        if level <= SOFT_ERROR_LIMIT:
            return 0.0
        return min(ERROR_SLEEP_SECONDS * (level - SOFT_ERROR_LIMIT), MAX_ERROR_SLEEP_SECONDS)

    def _tarpit_over(self, code: int, message: bytes) -> None:
        self._tarpit = None
        self._error_sent(code, message)
        self._release()

    def _error_sent(self, code: int, message: bytes) -> None:
        super().sendCode(code, message)
        if self._errors >= ERROR_LIMIT:
            self._cut_off("errors", b"Too many errors")
        elif self._address_over_refusal_limit():
            self._cut_off("refused_recipients", b"Too many refused recipients")

    def _address_over_refusal_limit(self) -> bool:
        return self.factory is not None and self.factory.refused_recipients(self.peer_key) >= REFUSED_RECIPIENT_LIMIT

    def _cut_off(self, reason: str, text: bytes) -> None:
        metrics.REJECTED.labels(reason).inc()
        log.info("disconnecting {peer}: {reason}", peer=self.peer_key, reason=text.decode().lower(), event="rejected")
        super().sendCode(421, b"4.7.0 " + self.host + b" " + text + b", closing connection")
        self.transport.loseConnection()

    def timeoutConnection(self):
        """A command line must be complete within the timeout; a client waiting for us is not idle."""
        if self._paused:
            self.setTimeout(self.timeout)
            return
        log.info("disconnecting {peer}: timeout", peer=self.peer_key)
        super().sendCode(421, b"4.4.2 " + self.host + b" Timeout, closing connection")
        self.transport.loseConnection()

    def greeting(self):
        return self.host + b" ESMTP mailingest"

    def extensions(self):
        ext = super().extensions()
        ext.pop(b"AUTH", None)
        ext[b"SIZE"] = [str(self.max_message_size).encode()]
        ext[b"PIPELINING"] = None
        ext[b"8BITMIME"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        ext[b"SMTPUTF8"] = None
        return ext

    def received_with(self) -> str:
        """
        The protocol for our Received: header (RFC 3848; UTF8SMTP and
        UTF8SMTPS of RFC 6531 for an SMTPUTF8 transaction), with the TLS
        version and cipher.
        """
        name = "UTF8SMTP" if self._smtputf8 else "ESMTP" if self._esmtp else "SMTP"
        tls = self.tls_description()
        return f"{name}S ({tls})" if tls else name

    def tls_description(self) -> str | None:
        """'TLSv1.3 TLS_AES_256_GCM_SHA384' on a TLS connection (STARTTLS or implicit), else None."""
        if not interfaces.ISSLTransport.providedBy(self.transport):
            return None
        handle = self.transport.getHandle()
        try:
            return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        except AttributeError:
            return "TLS"

    # input: one command at a time, DATA in bulk

    def dataReceived(self, data):
        # Outside DATA only a complete command line counts as activity, so a
        # byte-at-a-time client is timed out (DATA has its own pace check).
        if self._reader is not None:
            self.resetTimeout()
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
                        self.sendCode(500, b"5.5.2 Line too long")
                return
            line = bytes(self._inbuf[:end]).rstrip(b"\r")
            del self._inbuf[: end + 1]
            self.resetTimeout()
            if self._discarding_line:
                self._discarding_line = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self.sendCode(500, b"5.5.2 Line too long")
                continue
            if _BAD_COMMAND_BYTES.search(line) or not _acceptable_text(line):
                self.sendCode(500, b"5.5.2 Invalid characters in command")
                continue
            if self.factory is not None and self.factory.shutting_down and line[:4].upper() != b"QUIT":
                self.goodbye()
                return
            self.lineReceived(line)

    @property
    def _paused(self) -> bool:
        """Input is held while a lookup, storage or a tarpit delay is pending."""
        return self._holds > 0

    def _hold(self) -> None:
        self._holds += 1

    def _release(self) -> None:
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
        self._hold()

        def resume(result):
            self._release()
            return result

        d.addBoth(resume)

    # commands

    def state_COMMAND(self, line):
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb in JUNK_COMMANDS:
            self._junk += 1
            self._junk_penalty = self._junk > JUNK_COMMAND_LIMIT
        try:
            super().state_COMMAND(line)
        finally:
            self._junk_penalty = False

    def lookupMethod(self, command):
        if command.upper() in NOT_IMPLEMENTED:
            return self.do_not_implemented
        return super().lookupMethod(command)

    def do_not_implemented(self, rest):
        self.sendCode(502, b"5.5.1 Command not implemented")

    def ext_AUTH(self, rest):
        self.sendCode(503, b"5.5.1 Authentication not enabled")

    def do_HELO(self, rest):
        self._esmtp = False
        self._greeted(rest)
        self._reply(250, self.host + b" Hello " + self._helo[1])

    def do_EHLO(self, rest):
        self._esmtp = True
        self._greeted(rest)
        self._reply(250, self.host + b" Hello " + self._helo[1] + b"\n" + self.listExtensions())

    def _greeted(self, rest: bytes) -> None:
        peer = self.transport.getPeer().host
        self._helo = (rest, peer.encode("idna") if isinstance(peer, str) else peer)
        self._from = None
        self._to = []

    def ext_STARTTLS(self, rest):
        if self.startedTLS or interfaces.ISSLTransport.providedBy(self.transport):
            self.sendCode(503, b"5.5.1 TLS already active")
        elif rest:
            self.sendCode(501, b"5.5.4 Syntax: STARTTLS")
        elif self.ctx is not None and self.canStartTLS:
            smtp.SMTP.sendCode(self, 220, b"2.0.0 Ready to start TLS")
            self._discard_pipelined_plaintext()
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207: forget what the client said before TLS.
            self._helo = (None, self._helo[1])
            self._esmtp = False
            self._from = None
            self._to = []
        else:
            self.sendCode(454, b"4.7.0 TLS not available")

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
        self.sendCode(250, b"2.0.0 OK")

    def do_VRFY(self, rest):
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, rest):
        self.sendCode(214, b"2.0.0 See RFC 5321")

    def do_RSET(self, rest):
        self._from = None
        self._to = []
        self.sendCode(250, b"2.0.0 OK")

    def do_QUIT(self, rest):
        self.sendCode(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest):
        self.sendCode(500, b"5.5.2 Command not recognised")

    def sendSyntaxError(self):
        self.sendCode(500, b"5.5.2 Syntax error")

    def do_MAIL(self, rest):
        if self._from:
            self.sendCode(503, b"5.5.1 Sender already given")
            return
        m = self.mail_re.match(rest) or _UTF8_MAIL.match(rest)
        if not m:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        self._smtputf8 = False
        error = self._check_mail_params(m.group("opts"))
        if error:
            self.sendCode(*error)
            return
        try:
            sender = self._address(m.group("path"))
        except smtp.AddressError as e:
            self.sendCode(553, b"5.1.7 Bad sender address syntax" + (b": " + str(e).encode() if str(e) else b""))
            return
        self._to = []
        d = defer.maybeDeferred(self.validateFrom, self._helo, sender)
        d.addCallbacks(self._sender_ok, self._ebFromValidate)
        self._wait_for(d)

    def _check_mail_params(self, opts: bytes | None):
        for param in (opts or b"").split():
            name, _, value = param.partition(b"=")
            name = name.upper()
            if name == b"SIZE":
                if not value.isdigit():
                    return 501, b"5.5.4 Bad SIZE parameter"
                if int(value) > self.max_message_size:
                    metrics.REJECTED.labels("size").inc()
                    return 552, size_refusal(self.max_message_size)
            elif name == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 501, b"5.5.4 Bad BODY parameter"
            elif name == b"SMTPUTF8" and not value:
                self._smtputf8 = True
            else:
                return 555, b"5.5.4 Unsupported MAIL FROM parameter " + name[:64]
        return None

    def _address(self, path: bytes) -> smtp.Address:
        """
        Read by L{smtp_address.split_path} (Twisted's parser refuses domain literals
        and quoted-pairs); an internationalised address (RFC 6531) needs
        SMTPUTF8, and a path without a domain is at our host, as Twisted has it.
        """
        if not path.isascii() and not self._smtputf8:
            raise smtp.AddressError("non-ASCII address without SMTPUTF8")
        try:
            local, domain = smtp_address.split_path(path)
        except smtp_address.MailboxSyntaxError:
            raise smtp.AddressError() from None
        address = smtp.Address(b"placeholder@invalid")
        address.local, address.domain, address.addrstr = local, self.host if domain is None else domain, path
        return address

    def _sender_ok(self, sender):
        self._from = sender
        self.sendCode(250, b"2.1.0 Sender OK")

    def do_RCPT(self, rest):
        if self._address_over_refusal_limit():
            self._cut_off("refused_recipients", b"Too many refused recipients")
            return
        if not self._from:
            self.sendCode(503, b"5.5.1 Need MAIL before RCPT")
            return
        m = self.rcpt_re.match(rest) or _UTF8_RCPT.match(rest)
        if not m:
            self.sendCode(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        if m.group("opts"):
            self.sendCode(555, b"5.5.4 Unsupported RCPT TO parameter")
            return
        if len(self._to) >= self.max_recipients:
            metrics.REJECTED.labels("recipients").inc()
            self.sendCode(452, b"4.5.3 Too many recipients")
            return
        try:
            user = smtp.User(self._address(m.group("path")), self._helo, self, self._from)
        except smtp.AddressError as e:
            self._refused_recipient()
            self.sendCode(553, b"5.1.3 Bad recipient address syntax" + (b": " + str(e).encode() if str(e) else b""))
            return
        d = defer.maybeDeferred(self.validateTo, user)
        d.addCallbacks(self._recipient_ok, self._ebToValidate, callbackArgs=(user,))
        self._wait_for(d)

    def _recipient_ok(self, message_factory, user):
        self._to.append((user, message_factory))
        self.sendCode(250, b"2.1.5 Recipient OK")

    def _ebToValidate(self, failure):
        if failure.check(smtp.SMTPServerError):
            if failure.value.code >= 500:
                self._refused_recipient()
            self.sendCode(failure.value.code, failure.value.resp.encode("utf-8", "replace"))
            self._log_refused(failure.value)
        else:
            log.failure("recipient validation failed", failure)
            self.sendCode(451, b"4.3.0 Temporary failure, try again later")

    def _refused_recipient(self) -> None:
        if self.factory is not None:
            self.factory.refused_recipient(self.peer_key)

    def _log_refused(self, error) -> None:
        log.info(
            "refused recipient {rcpt} from {peer}: {code} {reply}",
            rcpt=address_text(error.addr),
            peer=self._peer(),
            code=error.code,
            reply=error.resp,
            event="rejected",
        )

    def _peer(self) -> str:
        """The client's address (before HELO, Twisted keeps it as text, after it as bytes)."""
        peer = self._helo[1] if self._helo else ""
        return peer.decode("ascii", "replace") if isinstance(peer, bytes) else str(peer)

    def do_DATA(self, rest):
        if self._from is None or not self._to:
            self.sendCode(503, b"5.5.1 Need MAIL and RCPT before DATA")
            return
        self.transaction_id = new_transaction_id()
        users = [user for user, _ in self._to]
        self._envelope = Envelope(
            id=self.transaction_id,
            peer=self._peer(),
            helo=(self._helo[0] or b"").decode("ascii", "replace"),
            mail_from=address_text(self._from),
            recipients=[factory() for _, factory in self._to],
        )
        self._from = None
        self._to = []
        try:
            received = self.delivery.receivedHeader(self._helo, self._envelope.mail_from, users)
            self._spool = Spool(self.spool_dir, received + b"\r\n")
        except OSError as e:
            log.error("cannot open a spool file: {error}", error=str(e))
            self._envelope = None
            self.sendCode(451, b"4.3.0 Temporary local problem, try again later")
            return
        self._reader = DotReader(self._write_data, self.max_message_size)
        self._data_started = self.clock.seconds()
        self._data_watch = self.clock.callLater(DATA_CHECK_SECONDS, self._check_data_pace)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _write_data(self, chunk: bytes) -> None:
        self._spool.write(chunk)
        if self._spool.header_too_large:
            self._reader.refuse(552, b"5.3.4 Header section too large")

    def _check_data_pace(self) -> None:
        """Slow-drip clients must not hold a slot for hours (Postfix's smtpd_min_data_rate)."""
        self._data_watch = None
        elapsed = self.clock.seconds() - self._data_started
        rate = self._reader.size / elapsed if elapsed else 0
        if elapsed > self.max_data_seconds or (elapsed > DATA_RATE_GRACE_SECONDS and rate < self.min_data_rate):
            metrics.REJECTED.labels("slow").inc()
            log.info(
                "disconnecting {peer}: DATA too slow ({size} bytes in {elapsed:.0f} s)",
                peer=self.peer_key,
                size=self._reader.size,
                elapsed=elapsed,
            )
            smtp.SMTP.sendCode(self, 421, b"4.4.2 " + self.host + b" Data too slow, closing connection")
            self.transport.loseConnection()
            return
        self._data_watch = self.clock.callLater(DATA_CHECK_SECONDS, self._check_data_pace)

    def _stop_data_watch(self) -> None:
        if self._data_watch is not None and self._data_watch.active():
            self._data_watch.cancel()
        self._data_watch = None

    def _end_of_data(self):
        self._stop_data_watch()
        reader, spool, envelope = self._reader, self._spool, self._envelope
        self._reader = self._spool = self._envelope = None
        if reader.refusal is not None:
            spool.discard()
            code, reply = reader.refusal
            metrics.REJECTED.labels("size" if code == 552 else "syntax").inc()
            log.info(
                "refused message from {peer}: {reply}",
                peer=envelope.peer,
                reply=reply.decode(),
                event="rejected",
            )
            self.sendCode(code, reply)
            return
        d = self.delivery.deliver(envelope, spool)
        d.addCallbacks(self._stored, self._not_stored)
        self._wait_for(d)

    def _stored(self, outcome):
        # A duplicate is answered like a new message (naming the row that holds
        # it), so the reply tells a stranger nothing about which ids are taken.
        ids = ", ".join(str(message_id) for _, message_id in outcome.rows)
        self._junk = 0
        self.sendCode(250, b"2.0.0 Ok: stored as message " + ids.encode("ascii"))

    def _not_stored(self, failure):
        if failure.check(smtp.SMTPServerError):
            self.sendCode(failure.value.code, failure.value.resp)
        else:
            log.failure("delivery failed", failure)
            self.sendCode(451, b"4.3.0 Temporary failure, try again later")

    def connectionLost(self, reason):
        if not self.admitted:
            return
        self._stop_data_watch()
        if self._tarpit is not None and self._tarpit.active():
            self._tarpit.cancel()
        if self._spool is not None:
            self._spool.discard()
            log.info(
                "client {peer} went away during DATA; nothing stored",
                peer=self._envelope.peer if self._envelope else "",
            )
        self._reader = self._spool = self._envelope = None
        super().connectionLost(reason)
        if self.factory is not None:
            self.factory.closed(self)


class IngestSMTPFactory(protocol.ServerFactory):
    """Builds sessions and enforces the connection limits."""

    noisy = False

    def __init__(
        self,
        delivery,
        hostname: str,
        spool_dir: str,
        max_message_size: int,
        max_recipients: int,
        timeout: float,
        max_connections: int,
        max_connections_per_ip: int,
        tls_context=None,
        clock=None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.delivery = delivery
        self.hostname = hostname.encode("idna")
        self.spool_dir = spool_dir
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.tls_context = tls_context
        self.by_peer: dict[str, int] = {}
        self.sessions: set[IngestSMTP] = set()
        self.awaiting_header: set = set()
        self.shutting_down = False
        self._drained: defer.Deferred | None = None
        self._refusals: dict[str, collections.deque] = {}
        self._next_refusal_sweep = 0.0

    def buildProtocol(self, addr):
        p = IngestSMTP(self.delivery, self.hostname, self.tls_context, self.clock)
        p.factory = self
        p.timeout = self.timeout
        p.max_message_size = self.max_message_size
        p.max_recipients = self.max_recipients
        p.spool_dir = self.spool_dir
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
        """Note a refused recipient from C{peer} (its times within the window, at most the limit, are kept)."""
        now = self.clock.seconds()
        self._forget_old_refusals(now)
        times = self._refusals.get(peer)
        if times is None:
            times = self._refusals[peer] = collections.deque(maxlen=REFUSED_RECIPIENT_LIMIT)
        times.append(now)

    def refused_recipients(self, peer: str) -> int:
        """Recipients refused to C{peer} within the window (capped at the limit)."""
        times = self._refusals.get(peer)
        if not times:
            return 0
        cutoff = self.clock.seconds() - REFUSED_RECIPIENT_WINDOW
        while times and times[0] <= cutoff:
            times.popleft()
        return len(times)

    def _forget_old_refusals(self, now: float) -> None:
        """Once per window, drop the addresses with no refusal in it, so the table stays small."""
        if now < self._next_refusal_sweep:
            return
        self._next_refusal_sweep = now + REFUSED_RECIPIENT_WINDOW
        cutoff = now - REFUSED_RECIPIENT_WINDOW
        for peer in [peer for peer, times in self._refusals.items() if times[-1] <= cutoff]:
            del self._refusals[peer]

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


def address_text(address: smtp.Address) -> str:
    """An address as text; internationalised addresses are UTF-8."""
    raw = address.local + (b"@" + address.domain if address.domain else b"")
    return raw.decode("utf-8", "replace")


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
