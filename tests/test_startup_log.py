"""What the daemon says about itself when it starts: limits and TLS."""

import io

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailingest.ops import logs
from tests.daemon import RunningDaemon, temp_dir
from tests.test_hardening import make_certificate


class StartupLogTests(unittest.TestCase):
    def start_log(self, **overrides) -> str:
        stream = io.StringIO()
        observer = logs.make_observer("text", stream)
        globalLogPublisher.addObserver(observer)
        try:
            RunningDaemon(temp_dir(self), **overrides)
        finally:
            globalLogPublisher.removeObserver(observer)
        return stream.getvalue()

    def test_limits_and_no_tls(self):
        text = self.start_log(max_message_size="1000000", max_recipients="7", max_connections="30", max_connections_per_ip="4", timeout="60")
        self.assertIn(
            "SMTP limits: messages up to 1000000 bytes and 7 recipients, 30 connections (4 per address), idle timeout 60 s",
            text,
        )
        self.assertIn("STARTTLS off (no --tls-cert)", text)
        self.assertIn("implicit TLS: no ssl: endpoint", text)

    def test_starttls_and_implicit_tls_certificates(self):
        directory = temp_dir(self)
        cert, key = make_certificate(directory)
        implicit_cert, implicit_key = make_certificate(directory, "smtps.test")
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={implicit_key}:certKey={implicit_cert}"
        text = self.start_log(tls_cert=cert, tls_key=key, smtp=["tcp:0:interface=127.0.0.1", endpoint])
        self.assertRegex(
            text,
            f"STARTTLS on, certificate {cert}: subject CN=mx.test, SANs mx.test, "
            r"expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
        )
        self.assertIn(f"implicit TLS on {endpoint}, certificate {implicit_cert}: subject CN=smtps.test, SANs smtps.test, expires ", text)
