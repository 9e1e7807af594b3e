"""Storage URLs: the one place a database password is recognised and hidden."""

from twisted.trial import unittest

from mailingest.storage.urls import redact_url, url_passwords


class RedactionTests(unittest.SynchronousTestCase):
    def test_every_written_form_of_the_password(self):
        cases = [
            ("postgresql://u:p%40ss@db:5432/x", "postgresql://u:***@db:5432/x", ("p%40ss", "p@ss")),
            ("postgresql://u@db/x?password=sec&sslmode=require", "postgresql://u@db/x?password=***&sslmode=require", ("sec",)),
            ("postgresql://u:pw@[::1/db", "postgresql://u:***@[::1/db", ("pw",)),
            ("sqlite:///mailingest-data/mailingest.db", "sqlite:///mailingest-data/mailingest.db", ()),
        ]
        for url, shown, passwords in cases:
            self.assertEqual((redact_url(url), url_passwords(url)), (shown, passwords), url)
