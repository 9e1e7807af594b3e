"""
Shutdown of the SMTP side (IngestSMTPFactory.shutdown) on a task.Clock: idle
sessions are closed at once, a transaction in progress may finish within the
grace period and its session is closed the moment it ends, what is left is cut
off at the end of the grace period. No sockets, no sleeps, no polling: the
replies below come without advancing the clock.
"""

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.test_smtp_protocol import MESSAGE, Server

GRACE = 10.0
GOODBYE = b"421 4.3.2 mx.test Service shutting down, try again later"


def open_data(session) -> None:
    for line in (b"EHLO customer.test", b"MAIL FROM:<buyer@customer.test>", b"RCPT TO:<orders+acme@example.com>"):
        session.command(line)
    assert session.command(b"DATA").startswith(b"354"), "DATA not started"


def hang_up(session) -> None:
    """What the reactor does once a closed transport is gone: the protocol learns it."""
    session.protocol.connectionLost(Failure(error.ConnectionDone()))


class ShutdownTests(unittest.TestCase):
    def test_without_sessions_done_at_once(self):
        server = Server(self)
        self.successResultOf(server.factory.shutdown(GRACE, server.clock))
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_idle_session_closed_at_once(self):
        server = Server(self)
        session = server.connect()
        session.command(b"EHLO customer.test")
        done = server.factory.shutdown(GRACE, server.clock)
        self.assertEqual(session.replies(), [GOODBYE])
        self.assertTrue(session.closed)
        self.assertNoResult(done)
        hang_up(session)
        self.successResultOf(done)

    def test_data_in_progress_finishes_then_session_closed(self):
        server = Server(self)
        session = server.connect()
        open_data(session)
        session.send(MESSAGE[:40])
        done = server.factory.shutdown(GRACE, server.clock)
        server.clock.advance(GRACE - 1)
        self.assertEqual(session.replies(), [])
        self.assertFalse(session.closed)
        session.send(MESSAGE[40:] + b".\r\n")
        [stored, goodbye] = session.replies()
        self.assertTrue(stored.startswith(b"250 2.0.0 Ok: stored as message"), stored)
        self.assertEqual(goodbye, GOODBYE)
        self.assertTrue(session.closed)
        self.assertEqual(len(server.store.rows), 1)
        hang_up(session)
        self.successResultOf(done)
        # the cut-off timer is gone with the last session
        self.assertEqual([call for call in server.clock.getDelayedCalls() if call.active()], [])

    def test_session_waiting_for_storage_closed_once_stored(self):
        server = Server(self)
        insert = server.store.insert_messages
        storing = defer.Deferred()
        self.patch(server.store, "insert_messages", lambda rows: storing.addCallback(lambda _: insert(rows)))
        session = server.connect()
        open_data(session)
        session.send(MESSAGE + b".\r\n")
        self.assertTrue(session.protocol.busy)
        done = server.factory.shutdown(GRACE, server.clock)
        self.assertEqual(session.replies(), [])
        storing.callback(None)
        [stored, goodbye] = session.replies()
        self.assertTrue(stored.startswith(b"250 2.0.0"), stored)
        self.assertEqual(goodbye, GOODBYE)
        hang_up(session)
        self.successResultOf(done)

    def test_unfinished_transaction_cut_off_after_the_grace_period(self):
        server = Server(self)
        idle, busy = server.connect(), server.connect("192.0.2.2")
        open_data(busy)
        busy.send(MESSAGE[:40])
        done = server.factory.shutdown(GRACE, server.clock)
        self.assertEqual(idle.replies(), [GOODBYE])
        hang_up(idle)
        server.clock.advance(GRACE - 0.1)
        self.assertNoResult(done)
        self.assertFalse(busy.transport.disconnected)
        server.clock.advance(0.1)
        self.successResultOf(done)
        self.assertTrue(busy.transport.disconnected)
        self.assertEqual(busy.replies(), [])
