"""
The private names of Twisted that mailingest uses, all in this one module,
each with the reason no public hook serves. The rest of the code imports
what it needs from here, so a Twisted upgrade is checked in one place (and
the tests of each user fail if a name changes).

- PROXY protocol: C{twisted.protocols.haproxy} exports only C{proxyEndpoint},
  which starts the wrapped session before the header is read (so limits and
  the greeting would see the load balancer) and believes any peer. Its v1 and
  v2 header parsers are private; L{ProxyHeaderParser} wraps them.
- twistd's log destination: a C{--logger} replaces twistd's own choice of
  destination (stdout with C{--nodaemon}, else C{--logfile}, rotated on
  SIGUSR1); the observer twistd would make is only returned by the private
  C{UnixAppLogger._getLogObserver} (L{twistd_log_observer}).
- The HTTP client's factory logs "Starting/Stopping factory" per connection;
  L{twisted.web.client.HTTPConnectionPool} takes its factory class from the
  private C{_factory} attribute, and the factory class itself is private
  (L{QuietHTTPConnectionPool}).
- Several SO_REUSEPORT sockets for one C{tcp:} description (C{--processes}):
  a TCP server endpoint keeps its port, interface and backlog in private
  attributes, and the description parser is private too
  (L{tcp_listen_arguments}).
"""

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IAddress, IStreamServerEndpoint
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import usage
from twisted.scripts._twistd_unix import UnixAppLogger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

__all__ = [
    "InvalidProxyHeader", "ProxyHeaderParser", "QuietHTTPConnectionPool", "tcp_listen_arguments", "twistd_log_observer",
]


class ProxyHeaderParser:
    """
    Reads one PROXY header, v1 or v2, from the first bytes of a connection.

    L{feed} returns None until the header is complete, then the header's
    source address (None for a LOCAL/UNKNOWN header) and the bytes after it;
    it raises L{InvalidProxyHeader} at the first byte that cannot start a
    header. TCP may split the header anywhere, so the bytes that choose the
    version are gathered first: Twisted's V2Parser refuses a first feed
    shorter than its 16-byte fixed part.
    """

    def __init__(self) -> None:
        self._parser: V1Parser | V2Parser | None = None
        self._start = b""

    def feed(self, data: bytes) -> tuple[IAddress | None, bytes] | None:
        if self._parser is None:
            start = self._start + data
            if V2Parser.PREFIX.startswith(start[:12]):
                if len(start) > 12 and start[12] & 0xF0 != 0x20:
                    raise InvalidProxyHeader()
                if len(start) < 16:
                    self._start = start
                    return None
                self._parser = V2Parser()
            elif V1Parser.PROXYSTR.startswith(start[:5]):
                if len(start) < 5:
                    self._start = start
                    return None
                self._parser = V1Parser()
            else:
                raise InvalidProxyHeader()
            data, self._start = start, b""
        info, remaining = self._parser.feed(data)
        if info is None:
            return None
        return info.source, remaining


def twistd_log_observer(server_options: usage.Options):
    """The log observer twistd itself would make from its options."""
    return UnixAppLogger(server_options)._getLogObserver()


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietHTTPConnectionPool(HTTPConnectionPool):
    """An HTTP client connection pool whose connections log no "Starting/Stopping factory" lines."""

    _factory = _QuietClientFactory


def tcp_listen_arguments(endpoint: IStreamServerEndpoint) -> tuple[int, str, int]:
    """The port, interface and backlog a C{tcp:} or C{tcp6:} server endpoint would listen with."""
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise TypeError(f"not a TCP server endpoint: {endpoint!r}")
    return endpoint._port, endpoint._interface, endpoint._backlog
