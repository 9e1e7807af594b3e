"""The port helper that tests give to daemons they start in other processes."""

import socket

from twisted.trial import unittest

from tests.ports import _ephemeral_range, free_port


class FreePortTests(unittest.TestCase):
    def test_port_is_outside_the_ephemeral_range_and_free(self):
        low, high = _ephemeral_range()
        for _ in range(20):
            port = free_port()
            self.assertFalse(low <= port <= high, port)
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
