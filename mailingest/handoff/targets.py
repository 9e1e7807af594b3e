"""
Where the daemon may POST webhooks: the operator's policy, checked when an
organisation's webhook is set and again at every connection.

An organisation chooses its URL, so without these checks it could aim the
daemon at the services on its own network (SSRF). At send time the host
name is resolved, every address it resolves to is checked, and the
connection goes to a checked address (TLS still verifies the host name), so
a name that resolves differently the second time (DNS rebinding) cannot
slip past the check.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints, threads
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailingest.errors import MailingestError

CONNECT_TIMEOUT_SECONDS = 10.0


class TargetRefused(MailingestError):
    """A webhook URL or address the operator's policy does not allow."""


@dataclass(frozen=True)
class TargetPolicy:
    """C{allow_http}: plain http:// too; C{allow_private}: loopback, private, link-local... addresses too."""

    allow_http: bool = False
    allow_private: bool = False

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an allowed URL; raises L{TargetRefused} with the reason."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise TargetRefused(f"bad webhook URL {url!r}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            raise TargetRefused(f"bad webhook URL {url!r}: use https://")
        if scheme == "http" and not self.allow_http:
            raise TargetRefused(f"webhook URL {url!r} is plain http: use https:// (or run with --webhook-allow-http)")
        if not parts.hostname:
            raise TargetRefused(f"bad webhook URL {url!r}: no host")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused(f"bad webhook URL {url!r}: no user or password in the URL, the body is signed")
        return scheme, parts.hostname, port or (443 if scheme == "https" else 80)

    def check_address(self, host: str, address: str) -> None:
        """Refuse an address that is not public, looking through the IPv6 forms that carry an IPv4 address."""
        if self.allow_private:
            return
        problem = not_public(ipaddress.ip_address(address.split("%", 1)[0]))
        if problem is not None:
            raise TargetRefused(
                f"webhook host {host} resolves to {address} ({problem}):"
                " refused (run with --webhook-allow-private to allow internal targets)"
            )


# IPv6 forms that stand for an IPv4 address (the address is checked through
# them) and forms no Internet route reaches. Python's ipaddress calls several
# of these "global", so they are looked at before its own verdict.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNROUTED_V6 = (
    (ipaddress.ip_network("64:ff9b:1::/48"), "local-use NAT64"),
    (ipaddress.ip_network("2001::/32"), "Teredo"),
    (ipaddress.ip_network("::/96"), "IPv4-compatible"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
)


def not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why C{ip} is no public Internet address (e.g. C{"NAT64 of 169.254.169.254, link-local"}), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        for form, carried in (
            ("IPv4-mapped", ip.ipv4_mapped),
            ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None),
            ("6to4", ip.sixtofour),
        ):
            if carried is not None:
                problem = not_public(carried)
                return None if problem is None else f"{form} of {carried}, {problem}"
        for network, name in _UNROUTED_V6:
            if ip in network and not (ip.is_loopback or ip.is_unspecified):
                return name
    if ip.is_global and not ip.is_multicast:
        return None
    kind = next(
        (name for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved") if getattr(ip, "is_" + name)),
        "not public",
    )
    return kind.replace("_", "-")


async def resolve_checked(policy: TargetPolicy, host: str, port: int) -> list[str]:
    """The addresses of C{host}, every one allowed by C{policy} (a name with any internal address is refused)."""
    try:
        found = await threads.deferToThread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TargetRefused(f"webhook host {host} does not resolve: {e.strerror}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    for address in addresses:
        policy.check_address(host, address)
    return addresses


async def check_target(policy: TargetPolicy, url: str) -> None:
    """The whole check of a webhook URL, as the daemon makes it before connecting."""
    _, host, port = policy.check_url(url)
    await resolve_checked(policy, host, port)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolve, check every address, connect to the first one checked."""

    def __init__(self, reactor, policy: TargetPolicy, scheme: str, host: str, port: int):
        self.reactor = reactor
        self.policy = policy
        self.scheme = scheme
        self.host = host
        self.port = port

    def connect(self, factory) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory):
        address = (await resolve_checked(self.policy, self.host, self.port))[0]
        if ":" in address:
            endpoint = endpoints.TCP6ClientEndpoint(self.reactor, address, self.port, CONNECT_TIMEOUT_SECONDS)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, address, self.port, CONNECT_TIMEOUT_SECONDS)
        if self.scheme == "https":
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return await endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class CheckedEndpointFactory:
    """For L{twisted.web.client.Agent.usingEndpointFactory}: every connection goes through the policy."""

    def __init__(self, reactor, policy: TargetPolicy):
        self.reactor = reactor
        self.policy = policy

    def endpointForURI(self, uri) -> _CheckedEndpoint:
        scheme, host, port = self.policy.check_url(uri.toBytes().decode("ascii"))
        return _CheckedEndpoint(self.reactor, self.policy, scheme, host, port)
