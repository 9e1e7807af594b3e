"""Certificates from PEM files, reloadable, and ssl: endpoint strings."""

from twisted.internet import reactor
from twisted.trial import unittest

from mailingest.errors import ConfigError
from mailingest.smtp.tls import ReloadableTLS, implicit_tls_endpoint
from tests.daemon import temp_dir
from tests.test_hardening import make_certificate


class ReloadableTLSTests(unittest.SynchronousTestCase):
    def test_a_broken_renewal_keeps_the_certificate(self):
        cert, key = make_certificate(temp_dir(self))
        tls = ReloadableTLS(cert, key)
        with open(cert, "w") as f:
            f.write("not a certificate\n")
        self.assertRaises(ConfigError, tls.reload)
        self.assertTrue(tls.describe().startswith("subject CN=mx.test, SANs mx.test, expires "), tls.describe())


class ImplicitTLSEndpointTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.cert, self.key = make_certificate(temp_dir(self))

    def test_fields(self):
        endpoint, tls = implicit_tls_endpoint(reactor, f"ssl:465:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1:backlog=7")
        self.assertEqual((endpoint._port, endpoint._interface, endpoint._backlog), (465, "127.0.0.1", 7))
        self.assertEqual((tls.cert_path, tls.key_path), (self.cert, self.key))

    def test_refused(self):
        for description, reason in (
            (f"ssl:465:privateKey={self.key}:extraCertChain=x.pem", "extraCertChain not supported"),
            (f"ssl:privateKey={self.key}", "use ssl:PORT:privateKey=KEY:certKey=CERT"),
            (f"ssl:smtps:privateKey={self.key}", "invalid literal"),
            ("ssl:465:privateKey=/nonexistent.key", "cannot read TLS files: /nonexistent.key"),
        ):
            with self.assertRaises(ConfigError) as raised:
                implicit_tls_endpoint(reactor, description)
            self.assertIn(reason, str(raised.exception))
