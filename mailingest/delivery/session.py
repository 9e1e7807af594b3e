"""
What an SMTP session knows about its client, handed to delivery.

The protocol fills it in as the dialogue goes on; delivery reads it for our
C{Received:} header and its log lines, so neither reaches into the protocol.
It lives in delivery so that delivery needs nothing from the SMTP layer above it.
"""

from dataclasses import dataclass


@dataclass
class Session:
    """
    One connection's facts. C{helo} is the HELO/EHLO argument as sent (None
    before one, and again after STARTTLS); C{tls} is the negotiated version
    and cipher (C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}), None in plaintext;
    C{proxy} is the load balancer's address when a PROXY header named the
    client C{peer}; C{transaction_id} names the current message (our
    C{Received:} header and its raw blob key).
    """

    peer: str = "unknown"
    proxy: str | None = None
    helo: bytes | None = None
    esmtp: bool = False
    tls: str | None = None
    smtputf8: bool = False
    transaction_id: str = ""

    @property
    def helo_pair(self) -> tuple[bytes | None, bytes]:
        """Twisted's C{helo} argument: the HELO name and the client's address."""
        return self.helo, self.peer.encode("ascii", "replace")

    @property
    def received_with(self) -> str:
        """
        The protocol for our Received: header (RFC 3848; UTF8SMTP and
        UTF8SMTPS of RFC 6531 for an SMTPUTF8 transaction), with the TLS
        version and cipher.
        """
        name = "UTF8SMTP" if self.smtputf8 else "ESMTP" if self.esmtp else "SMTP"
        return f"{name}S ({self.tls})" if self.tls else name
