"""Times as text made once a second (issue 29): the cache must roll over with the clock."""

import calendar
from datetime import datetime, timezone

from twisted.internet import task
from twisted.trial import unittest

from mailingest.delivery import ingest, received
from mailingest.delivery.session import Session
from mailingest.ops import logs
from mailingest.timestamps import PerSecond

MIDNIGHT = calendar.timegm((2026, 12, 7, 0, 0, 0))


class PerSecondTests(unittest.TestCase):
    def setUp(self):
        self.rendered = []
        self.clock = task.Clock()
        self.clock.advance(MIDNIGHT - 1.5)

        def render(moment):
            self.rendered.append(moment)
            return moment.strftime("%Y-%m-%d %H:%M:%S")

        self.stamp = PerSecond(render)

    def test_once_a_second(self):
        self.assertEqual(self.stamp(self.clock.seconds()), "2026-12-06 23:59:58")
        self.clock.advance(0.4)
        self.assertEqual(self.stamp(self.clock.seconds()), "2026-12-06 23:59:58")
        self.assertEqual(len(self.rendered), 1)

    def test_rolls_over_with_the_clock(self):
        seen = []
        for _ in range(4):
            seen.append(self.stamp(self.clock.seconds()))
            self.clock.advance(0.5)
        self.assertEqual(seen, ["2026-12-06 23:59:58", "2026-12-06 23:59:59", "2026-12-06 23:59:59", "2026-12-07 00:00:00"])
        self.assertEqual(len(self.rendered), 3)
        # Back in time (a clock set back): the earlier second again, not the cached one.
        self.assertEqual(self.stamp(MIDNIGHT - 10), "2026-12-06 23:59:50")

    def test_rounded_as_datetime_rounds(self):
        """Within half a microsecond of the next second, datetime already names the next second."""
        when = MIDNIGHT - 0.0000004
        self.assertEqual(datetime.fromtimestamp(when, timezone.utc).second, 0)
        self.assertEqual(self.stamp(when), "2026-12-07 00:00:00")

    def test_the_same_text_as_every_time_anew(self):
        for step in range(0, 200_000, 997):
            when = MIDNIGHT + step / 1000
            moment = datetime.fromtimestamp(when, timezone.utc)
            self.assertEqual(self.stamp(when), moment.strftime("%Y-%m-%d %H:%M:%S"))


class UsersTests(unittest.TestCase):
    """The log's text stamp, our Received: header's date and the raw key's day follow the time."""

    def test_log_stamp(self):
        line = lambda when: logs._text_line({"log_format": "x", "log_time": when, "log_namespace": "n"}, str)
        self.assertEqual(line(MIDNIGHT - 0.5), "2026-12-06T23:59:59Z [n#-] x")
        self.assertEqual(line(MIDNIGHT + 0.2), "2026-12-07T00:00:00Z [n#-] x")

    def test_received_date(self):
        clock = task.Clock()
        clock.advance(MIDNIGHT - 0.25)
        self.patch(received.time, "time", clock.seconds)
        date = lambda: received.received_header(Session(peer="192.0.2.1"), "mx.test", (b"h", b"192.0.2.1"), []).split(b"\t")[-1]
        self.assertEqual(date(), b"Sun, 06 Dec 2026 23:59:59 +0000")
        clock.advance(0.5)
        self.assertEqual(date(), b"Mon, 07 Dec 2026 00:00:00 +0000")

    def test_raw_key_day(self):
        def key(when):
            envelope = ingest.Envelope("t1", "192.0.2.1", "h", "a@b", received_at=datetime.fromtimestamp(when, timezone.utc))
            return ingest.raw_key(envelope)

        self.assertEqual(key(MIDNIGHT - 0.5), "raw/2026/12/06/t1.eml")
        self.assertEqual(key(MIDNIGHT + 0.5), "raw/2026/12/07/t1.eml")
