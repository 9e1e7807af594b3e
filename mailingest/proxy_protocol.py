"""
PROXY protocol (v1 and v2) for listeners behind a load balancer.

Twisted's C{haproxy:} endpoint starts the SMTP session as soon as the TCP
connection opens, before the PROXY header is read, so the greeting and the
connection limits would see the load balancer's address. This wrapper starts
the session only once the header has been read: from its first moment the
session sees the real client, for limits, logs and our Received: header.
"""

from twisted.internet.protocol import Protocol
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, providedBy

HEADER_TIMEOUT = 10.0
ENDPOINT_PREFIX = "haproxy:"


class ProxyHeaderFirst(HAProxyProtocolWrapper, policies.TimeoutMixin):
    def makeConnection(self, transport):
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.setTimeout(HEADER_TIMEOUT)

    def timeoutConnection(self):
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            return self.wrappedProtocol.dataReceived(data)
        if self._parser is None:
            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and data[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            else:
                self.transport.loseConnection()
                return None
        try:
            self._proxyInfo, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self.transport.loseConnection()
            return None
        if self._proxyInfo is not None:
            self.setTimeout(None)
            self.wrappedProtocol.makeConnection(self)
            if remaining:
                self.wrappedProtocol.dataReceived(remaining)
        return None

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self._proxyInfo is None:
            self.factory.unregisterProtocol(self)
            return
        super().connectionLost(reason)


class ProxyHeaderFirstFactory(HAProxyWrappingFactory):
    protocol = ProxyHeaderFirst
