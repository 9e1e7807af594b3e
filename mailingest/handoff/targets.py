"""
Where the daemon may POST webhooks: the operator's policy, checked when an
organisation's webhook is set and again at every connection.

An organisation chooses its URL, so without these checks it could aim the
daemon at the services on its own network (SSRF). At send time the host
name is resolved, every address it resolves to is checked, and the
connection goes to a checked address (TLS still verifies the host name), so
a name that resolves differently the second time (DNS rebinding) cannot
slip past the check.

Names are resolved with Twisted Names (the system's hosts file, then its
resolv.conf servers), never with C{getaddrinfo} in the reactor's thread
pool: an organisation can choose a host whose DNS never answers, and a
lookup stuck in a thread would hold that thread past the attempt's end,
until the few threads every tenant's webhooks and the S3 client share were
all held.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import dns.resolver
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.names import client, dns as names_dns, hosts, resolve
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DomainError
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailingest.errors import MailingestError

CONNECT_TIMEOUT_SECONDS = 10.0
# Seconds for each try of one lookup: a host whose DNS is silent fails in 9 s, within an attempt's 10 s.
LOOKUP_TIMEOUT = (1, 3, 5)
_system_resolver = None


def system_resolver():
    """
    The hosts file, then the nameservers of resolv.conf (as dnspython reads
    it), asked with Twisted Names; made once. Not C{client.createResolver()}:
    its cache and its re-reading of resolv.conf keep timers running forever.
    """
    global _system_resolver
    if _system_resolver is None:
        try:
            nameservers = dns.resolver.Resolver().nameservers
        except dns.resolver.NoResolverConfiguration:
            nameservers = ["127.0.0.1"]
        servers = [(address, 53) for address in nameservers]
        _system_resolver = resolve.ResolverChain([hosts.Resolver(), client.Resolver(servers=servers, timeout=LOOKUP_TIMEOUT)])
    return _system_resolver


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
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT's IPv4-translated form (RFC 2765)
# Only global unicast (2000::/3) is routed on the Internet: ipaddress calls
# unassigned space such as 4000::/3 "global" because no registry reserved it.
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_UNROUTED_V6 = (
    (ipaddress.ip_network("64:ff9b:1::/48"), "local-use NAT64"),
    (ipaddress.ip_network("2001::/32"), "Teredo"),
    (ipaddress.ip_network("::/96"), "IPv4-compatible"),
    (ipaddress.ip_network("fec0::/10"), "site-local"),
    (ipaddress.ip_network("3fff::/20"), "documentation"),  # RFC 9637, newer than ipaddress's tables
)


def not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why C{ip} is no public Internet address (e.g. C{"NAT64 of 169.254.169.254, link-local"}), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        for form, carried in (
            ("IPv4-mapped", ip.ipv4_mapped),
            ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None),
            ("IPv4-translated", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _TRANSLATED else None),
            ("6to4", ip.sixtofour),
        ):
            if carried is not None:
                problem = not_public(carried)
                return None if problem is None else f"{form} of {carried}, {problem}"
        for network, name in _UNROUTED_V6:
            if ip in network and not (ip.is_loopback or ip.is_unspecified):
                return name
        if ip.is_global and ip not in _GLOBAL_UNICAST:
            return "not global unicast"
    if ip.is_global and not ip.is_multicast:
        return None
    kind = next(
        (name for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved") if getattr(ip, "is_" + name)),
        "not public",
    )
    return kind.replace("_", "-")


async def lookup(resolver, host: str) -> list[str]:
    """The IPv4 and IPv6 addresses of C{host} (a literal is its own), asked of C{resolver} without a thread."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found = await defer.DeferredList(
        [resolver.lookupAddress(host, LOOKUP_TIMEOUT), resolver.lookupIPV6Address(host, LOOKUP_TIMEOUT)], consumeErrors=True
    )
    addresses, why = [], "no address"
    for ok, result in found:
        if not ok:
            if result.check(DNSQueryTimeoutError, defer.TimeoutError):
                why = "its DNS did not answer"
            elif result.check(DNSNameError):
                why = "no such name"
            elif not result.check(DomainError):
                why = result.getErrorMessage() or result.type.__name__
            continue
        for record in result[0]:
            if record.type == names_dns.A:
                addresses.append(record.payload.dottedQuad())
            elif record.type == names_dns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    if not addresses:
        raise TargetRefused(f"webhook host {host} does not resolve: {why}")
    return list(dict.fromkeys(addresses))


async def resolve_checked(policy: TargetPolicy, host: str, resolver=None) -> list[str]:
    """The addresses of C{host}, every one allowed by C{policy} (a name with any internal address is refused)."""
    addresses = await lookup(resolver or system_resolver(), host)
    for address in addresses:
        policy.check_address(host, address)
    return addresses


async def check_target(policy: TargetPolicy, url: str, resolver=None) -> None:
    """The whole check of a webhook URL, as the daemon makes it before connecting."""
    _, host, _ = policy.check_url(url)
    await resolve_checked(policy, host, resolver)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """Resolve, check every address, connect to the first one checked."""

    def __init__(self, reactor, policy: TargetPolicy, scheme: str, host: str, port: int, resolver):
        self.reactor = reactor
        self.policy = policy
        self.resolver = resolver
        self.scheme = scheme
        self.host = host
        self.port = port

    def connect(self, factory) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory):
        address = (await resolve_checked(self.policy, self.host, self.resolver))[0]
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

    def __init__(self, reactor, policy: TargetPolicy, resolver=None):
        self.reactor = reactor
        self.policy = policy
        self.resolver = resolver or system_resolver()

    def endpointForURI(self, uri) -> _CheckedEndpoint:
        scheme, host, port = self.policy.check_url(uri.toBytes().decode("ascii"))
        return _CheckedEndpoint(self.reactor, self.policy, scheme, host, port, self.resolver)
