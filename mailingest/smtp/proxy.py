"""
PROXY protocol (v1 and v2) for listeners behind a load balancer.

Twisted's C{haproxy:} endpoint starts the SMTP session as soon as the TCP
connection opens, before the PROXY header is read, so the greeting and the
connection limits would see the load balancer's address. This wrapper starts
the session only once the header has been read: from its first moment the
session sees the real client, for limits, logs and our Received: header.

A PROXY header lets its sender claim any client address, so it is read only
from the networks of C{--proxy-trusted}; any other peer is closed before a
byte is read. A connection waiting for its header already holds a connection
slot (counted under the proxy's own address), so connections that never send
a header cannot exceed C{--max-connections}.
"""

import ipaddress
from collections.abc import Iterable

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides, providedBy

from mailingest.ops import metrics
from mailingest.smtp.protocol import peer_key
from mailingest.twisted_private import InvalidProxyHeader, ProxyHeaderParser

HEADER_TIMEOUT = 10.0
ENDPOINT_PREFIX = "haproxy:"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger(namespace="mailingest.proxy_protocol")


class ProxyHeaderFirst(policies.ProtocolWrapper, policies.TimeoutMixin):
    """Reads the PROXY header, then runs the session with the header's client as its peer."""

    peer_key = ""
    holds_slot = False
    header_done = False
    source = None

    def __init__(self, factory, wrappedProtocol):
        super().__init__(factory, wrappedProtocol)
        self._header = ProxyHeaderParser()

    def makeConnection(self, transport):
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        host = getattr(transport.getPeer(), "host", None)
        if not self.factory.trusts(host):
            metrics.REJECTED.labels("proxy_untrusted").inc()
            log.warn("refused connection from {peer}: not a trusted PROXY sender (--proxy-trusted)", peer=host)
            transport.loseConnection()
            return
        self.peer_key = peer_key(host or "local")
        sessions = self.factory.wrappedFactory
        if not sessions.admit(self):
            transport.write(b"421 4.7.0 " + sessions.hostname + b" Too many connections, try again later\r\n")
            transport.loseConnection()
            return
        self.holds_slot = True
        self.setTimeout(HEADER_TIMEOUT)

    def timeoutConnection(self):
        self.transport.abortConnection()

    def _release_slot(self) -> None:
        """The session takes over (it counts the real client), or the connection ended."""
        if self.holds_slot:
            self.holds_slot = False
            self.factory.wrappedFactory.closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.header_done:
            return self.wrappedProtocol.dataReceived(data)
        if not self.holds_slot:
            return None
        try:
            header = self._header.feed(data)
        except InvalidProxyHeader:
            self.transport.loseConnection()
            return None
        if header is not None:
            self.source, remaining = header
            self.header_done = True
            self.setTimeout(None)
            self._release_slot()
            self.wrappedProtocol.makeConnection(self)
            if remaining:
                self.wrappedProtocol.dataReceived(remaining)
        return None

    def getPeer(self):
        """The client the header names (the load balancer's own address for a LOCAL header)."""
        return self.source or self.transport.getPeer()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self._release_slot()
        if not self.header_done:
            self.factory.unregisterProtocol(self)
            return
        super().connectionLost(reason)


class ProxyHeaderFirstFactory(policies.WrappingFactory):
    """
    Wraps the SMTP factory (its C{admit}, C{closed} and C{hostname}) for a
    C{haproxy:} listener that believes headers from C{trusted} networks only.
    """

    protocol = ProxyHeaderFirst

    def __init__(self, wrappedFactory, trusted: Iterable[Network]):
        super().__init__(wrappedFactory)
        self.trusted = tuple(trusted)

    def trusts(self, host: str | None) -> bool:
        """
        Whether C{host} may send a PROXY header. A peer without an IP address
        (a UNIX socket) is trusted: the socket's file permissions decide who
        connects.
        """
        if host is None:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)
