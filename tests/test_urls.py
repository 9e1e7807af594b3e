"""
Database URLs: the password is found by libpq's rules and never shown, in any
shape an operator can write it.
"""

import re

from twisted.trial import unittest

from mailingest.errors import ConfigError
from mailingest.ops.secrets import redact, redact_url, url_passwords, url_problem

# (--database string, the passwords its writer meant, whether libpq can use it).
# The ports are closed, so a daemon or command given one fails to connect.
HOSTILE_URLS = [
    ("postgresql://u:s3cr/etPW@127.0.0.1:5432/nodb", ["s3cr/etPW"], False),
    ("postgresql://u:s3cret@PW@127.0.0.1:5432/nodb", ["s3cret@PW"], False),
    ("postgresql://h?password=T0ps3cret@127.0.0.1:1/nodb", ["T0ps3cret"], False),
    ("postgresql://u:Pq7%40Ss%2FW8%3FRd@127.0.0.1:1/nodb", ["Pq7@Ss/W8?Rd"], True),
    ("postgresql://u:Pw9?X8#Y7:Z6@127.0.0.1:1/nodb", ["Pw9?X8#Y7:Z6"], True),
    ("postgresql://u@127.0.0.1:1/nodb?sslmode=disable&password=Aa1%26Bb2%3DCc3%40Dd4", ["Aa1&Bb2=Cc3@Dd4"], True),
    ("postgresql://u@127.0.0.1:1/nodb?pass%77ord=H1dd3nKey", ["H1dd3nKey"], True),
    ("postgresql://u@127.0.0.1:1/nodb?password=Rw9@Q7/Z9", ["Rw9@Q7/Z9"], True),
    ("postgresql://u:Pw1Xy@127.0.0.1:1/nodb?sslpassword=Kp4ssZ", ["Pw1Xy", "Kp4ssZ"], True),
    ("host=127.0.0.1 port=1 user=u password='Pa Ss\\'W@Rd7' dbname=nodb", ["Pa Ss'W@Rd7"], True),
    ("host=127.0.0.1 port=1 password = Bk\\ Sl4sh dbname=nodb", ["Bk Sl4sh"], True),
    ("host=127.0.0.1 port=1 password=Tw0 W0rds dbname=nodb", ["Tw0 W0rds"], False),
    ("host=127.0.0.1 port=1 password='Unt3rminated Qu0te", ["Unt3rminated Qu0te"], False),
]


def leaked(text: str, passwords) -> list[str]:
    """The passwords, and their pieces between punctuation, that show in C{text}."""
    pieces = {p for password in passwords for p in [password, *re.split(r"[^A-Za-z0-9]", password)] if len(p) >= 2}
    return sorted(piece for piece in pieces if piece in text)


class RedactionTests(unittest.SynchronousTestCase):
    def test_every_written_form_of_the_password(self):
        cases = [
            ("postgresql://u:p%40ss@db:5432/x", "postgresql://u:***@db:5432/x", ("p%40ss", "p@ss")),
            ("postgresql://u@db/x?password=sec&sslmode=require", "postgresql://u@db/x?password=***&sslmode=require", ("sec",)),
            ("postgresql://u:pw@[::1/db", "postgresql://u:***@[::1/db", ("pw",)),
            ("postgresql://u:s3cret@PW@127.0.0.1:5432/nodb", "postgresql://***@127.0.0.1:5432/nodb", ("u:s3cret@PW", "s3cret@PW")),
            ("host=h password='a b\\'c' user=u", "host=h password='***' user=u", ("a b\\'c", "a b'c")),
            ("sqlite:///mailingest-data/mailingest.db", "sqlite:///mailingest-data/mailingest.db", ()),
        ]
        for url, shown, passwords in cases:
            self.assertEqual((redact_url(url), url_passwords(url)), (shown, passwords), url)

    def test_hostile_shapes_never_show_the_password(self):
        for url, passwords, usable in HOSTILE_URLS:
            shown = redact_url(url)
            self.assertIn("***", shown, url)
            self.assertEqual(leaked(shown, passwords), [], url)
            if usable:
                self.assertTrue(set(passwords) <= set(url_passwords(url)), url)
            self.assertEqual(leaked(redact(url, url_passwords(url)), passwords), [], url)
            self.assertEqual(url_problem(url) is None, usable, url)

    def test_libpq_reads_the_same_password(self):
        """Differential: where libpq accepts the string, its password is one we hide."""
        try:
            from psycopg2.extensions import parse_dsn
        except ImportError:
            raise unittest.SkipTest("psycopg2 is not installed")
        for url, _, usable in HOSTILE_URLS:
            if usable:
                params = parse_dsn(url)
                secrets = {params[k] for k in ("password", "sslpassword") if k in params}
                self.assertTrue(secrets and secrets <= set(url_passwords(url)), url)

    def test_the_engine_refuses_what_libpq_would_misread(self):
        try:
            from mailingest.storage.engines.postgresql import PostgresqlEngine
        except ImportError:
            raise unittest.SkipTest("psycopg2 is not installed")
        for url, passwords, usable in HOSTILE_URLS:
            if not usable:
                error = self.assertRaises(ConfigError, PostgresqlEngine, url)
                self.assertIn("bad database URL", str(error))
                self.assertEqual(leaked(str(error), passwords), [], url)
