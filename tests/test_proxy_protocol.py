"""
The haproxy: listener at the protocol level: only trusted peers may send a
PROXY header, and a connection waiting for its header holds a connection slot.
"""

import ipaddress

from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailingest.ops import metrics
from mailingest.smtp.proxy import HEADER_TIMEOUT, ProxyHeaderFirstFactory
from mailingest.delivery.transaction import IngestDeliveries
from mailingest.smtp.protocol import IngestSMTPFactory

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
HEADER = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n"


def rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason)._value.get()


class ProxyConnectionTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.sessions = IngestSMTPFactory(
            delivery=IngestDeliveries(None),
            hostname="mx.test",
            max_message_size=1000,
            max_recipients=10,
            timeout=300,
            max_connections=3,
            max_connections_per_ip=2,
        )
        self.factory = ProxyHeaderFirstFactory(self.sessions, TRUSTED)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.open = []
        self.addCleanup(self.close_all)

    def connect(self, host: str, port: int = 50000):
        peer = (address.IPv6Address if ":" in host else address.IPv4Address)("TCP", host, port)
        transport = StringTransport(peerAddress=peer)
        protocol = self.factory.buildProtocol(peer)
        protocol.callLater = self.clock.callLater
        protocol.wrappedProtocol.callLater = self.clock.callLater
        protocol.makeConnection(transport)
        self.open.append(protocol)
        return protocol, transport

    def lose(self, protocol):
        self.open.remove(protocol)
        protocol.connectionLost(Failure(ConnectionDone()))

    def close_all(self):
        for protocol in list(self.open):
            self.lose(protocol)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]

    def test_untrusted_peer_is_closed_before_reading(self):
        before = rejected("proxy_untrusted")
        protocol, transport = self.connect("6.6.6.1")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(rejected("proxy_untrusted"), before + 1)
        self.assertEqual(
            self.warnings(), ["refused connection from 6.6.6.1: not a trusted PROXY sender (--proxy-trusted)"]
        )
        protocol.dataReceived(HEADER + b"EHLO x\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual((self.sessions.sessions, self.sessions.awaiting_header, self.sessions.by_peer), (set(), set(), {}))

    def test_trusted_peer_gives_the_real_client(self):
        protocol, transport = self.connect("10.1.2.3")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(HEADER + b"EHLO client.test\r\n")
        self.assertTrue(transport.value().startswith(b"220 mx.test"), transport.value())
        self.assertIn(b"250-mx.test Hello 203.0.113.7\r\n", transport.value())
        self.assertEqual(self.sessions.by_peer, {"203.0.113.7": 1})
        self.assertEqual(self.sessions.awaiting_header, set())

    def test_ipv6_and_ipv4_mapped_peers(self):
        self.assertFalse(self.connect("2001:db8::5")[1].disconnecting)
        self.assertFalse(self.connect("::ffff:10.9.9.9")[1].disconnecting)
        self.assertTrue(self.connect("2001:db9::5")[1].disconnecting)

    def test_waiting_connections_count_against_max_connections(self):
        self.sessions.max_connections_per_ip = 100
        waiting = [self.connect(f"10.0.0.{n}") for n in range(3)]
        self.assertEqual(len(self.sessions.awaiting_header), 3)
        protocol, transport = self.connect("10.0.0.9")
        self.assertEqual(transport.value(), b"421 4.7.0 mx.test Too many connections, try again later\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIn(
            "refused connection from 10.0.0.9: too many connections (--max-connections 3 reached)", self.warnings()
        )
        self.lose(waiting[0][0])
        self.assertFalse(self.connect("10.0.0.9")[1].disconnecting)

    def test_waiting_connections_count_against_the_proxy_address(self):
        self.connect("10.0.0.1")
        self.connect("10.0.0.1")
        protocol, transport = self.connect("10.0.0.1")
        self.assertTrue(transport.value().startswith(b"421 4.7.0"), transport.value())
        self.assertIn(
            "refused connection from 10.0.0.1: too many connections (--max-connections-per-ip 2 reached for 10.0.0.1)",
            self.warnings(),
        )

    def test_the_slot_passes_to_the_session(self):
        protocol, transport = self.connect("10.0.0.1")
        self.assertEqual(self.sessions.by_peer, {"10.0.0.1": 1})
        protocol.dataReceived(HEADER)
        self.assertEqual(self.sessions.by_peer, {"203.0.113.7": 1})
        self.assertEqual(len(self.sessions.sessions), 1)
        self.lose(protocol)
        self.assertEqual((self.sessions.sessions, self.sessions.by_peer), (set(), {}))

    def test_no_header_in_time_frees_the_slot(self):
        protocol, transport = self.connect("10.0.0.1")
        self.clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)
        self.assertEqual((self.sessions.awaiting_header, self.sessions.by_peer), (set(), {}))

    def test_a_header_read_however_it_is_segmented(self):
        """On main a first segment shorter than 8 bytes (v1) or 16 (v2) was taken as no PROXY header: disconnected."""
        v2 = (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            + bytes([203, 0, 113, 8]) + bytes([192, 0, 2, 1]) + (40001).to_bytes(2, "big") + (25).to_bytes(2, "big")
        )
        for header, client in ((HEADER, "203.0.113.7"), (v2, "203.0.113.8")):
            protocol, transport = self.connect("10.0.0.1")
            for index in range(len(header)):
                protocol.dataReceived(header[index : index + 1])
                self.assertFalse(transport.disconnecting, (header, index))
                if index < len(header) - 1:
                    self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.value().startswith(b"220 mx.test"), transport.value())
            for byte in b"EHLO client.test\r\n":
                protocol.dataReceived(bytes([byte]))
            self.assertIn(f"250-mx.test Hello {client}\r\n".encode(), transport.value())
            self.lose(protocol)

    def test_what_cannot_start_a_header_is_refused_at_its_first_wrong_byte(self):
        for junk in (b"E", b"PROX\r", b"\r\n\r\n\x00\r\nQUIT\n\x11", b"\r\n\r\nX"):
            protocol, transport = self.connect("10.0.0.1")
            for index in range(len(junk) - 1):
                protocol.dataReceived(junk[index : index + 1])
                self.assertFalse(transport.disconnecting, (junk, index))
            protocol.dataReceived(junk[-1:])
            self.assertTrue(transport.disconnecting, junk)
            self.assertEqual(transport.value(), b"")
            self.lose(protocol)
