"""
A real DNS server on 127.0.0.1 for the sender checks: Twisted Names'
authoritative server with a zone built in the test (UDP and TCP on one free
port), and names it answers with SERVFAIL or never answers at all.
"""

import socket

from twisted.internet import defer, reactor
from twisted.names import authority, dns, server

ORIGIN = "example"


def txt(text: str | bytes) -> dns.Record_TXT:
    """One TXT record, split into the 255-byte strings DNS carries."""
    data = text.encode("ascii") if isinstance(text, str) else text
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)] or [b""], ttl=60)


class ServerFailure(Exception):
    """What a name in L{Zone.servfail} raises: answered SERVFAIL, not logged as an error."""


class _Factory(server.DNSServerFactory):
    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(ServerFailure):
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=dns.ESERVER), address)
            return
        super().gotResolverError(failure, protocol, message, address)


class Zone(authority.FileAuthority):
    """
    Every name under C{origin}: C{records} maps a name to its Twisted Names
    records; names in C{servfail} get SERVFAIL, names in C{silent} no answer,
    and no name in or under a domain of C{silent_zones} either (a domain
    whose nameservers never answer). C{asked} lists every (name, type) asked,
    in order, silent ones included.
    """

    def __init__(self, records: dict[str, list], servfail=(), silent=(), origin: str = ORIGIN, silent_zones=()):
        self._given = records
        self._origin = origin
        self.servfail = {name.lower() for name in servfail}
        self.silent = {name.lower() for name in silent}
        self.silent_zones = {name.lower() for name in silent_zones}
        self.asked: list[tuple[str, str]] = []
        super().__init__(None)

    def is_silent(self, name: str) -> bool:
        name = name.lower()
        return name in self.silent or any(name == z or name.endswith("." + z) for z in self.silent_zones)

    def loadFile(self, filename):
        origin = self._origin
        soa = dns.Record_SOA(mname="ns." + origin, rname="hostmaster." + origin, serial=1, minimum=60, expire=60, ttl=60)
        self.soa = (origin.encode(), soa)
        self.records = {origin.encode(): [soa]}
        for name, records in self._given.items():
            self.records.setdefault(name.lower().encode(), []).extend(records)

    def _lookup(self, name, cls, type, timeout=None):
        key = name.decode("ascii") if isinstance(name, bytes) else str(name)
        self.asked.append((key.lower(), dns.QUERY_TYPES.get(type, str(type))))
        if self.is_silent(key):
            return defer.Deferred()
        if key.lower() in self.servfail:
            return defer.fail(ServerFailure(key))
        return super()._lookup(name, cls, type, timeout)


class DnsServer:
    """The zones served on one free port of 127.0.0.1, UDP and TCP (for answers above 512 bytes)."""

    def __init__(self, zone: Zone, *more: Zone):
        self.zone = zone
        self.zones = [zone, *more]
        self._ports = []

    def start(self) -> tuple[str, int]:
        factory = _Factory(authorities=self.zones)
        for _ in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except Exception:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.address = ("127.0.0.1", port)
            return self.address
        raise RuntimeError("no free port for the test DNS server")

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])

    @property
    def spec(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
