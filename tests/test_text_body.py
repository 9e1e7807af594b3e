"""
Issue 29: a message that is one text body (plain or HTML) is extracted without a round
trip to a parser worker (L{mailingest.extraction.text_body}). The test must
never be wrong: checked on crafted edge cases, on every sample message
written by others (each one the test lets through gives exactly what the
parser gives), and end to end with a parser that cannot start.
"""

import os
import sys
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from mailingest.extraction import checker, text_body
from mailingest.extraction.attachments import extract_attachments
from mailingest.extraction.text_body import HEADER_LIMIT, WARNINGS, needs_no_parser, one_text_body
from tests.corpus import sample_messages
from tests.test_extraction import PDF, ExtractionCase, order

H = b"From: buyer@customer.test\r\nTo: orders+acme@example.com\r\nSubject: Order 12\r\n"


class TextBodyTests(unittest.TestCase):
    def test_text_bodies(self):
        for start in (
            H + b"\r\nPlease send 12 widgets.\r\n",
            H + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n\r\nbody\r\n",
            H + b"Content-Type: text/plain;\r\n\tcharset=us-ascii\r\n\r\nbody\r\n",
            H + b"CONTENT-TYPE: TEXT/PLAIN\r\nContent-Transfer-Encoding: base64\r\n\r\nnot base64\r\n",
            H + "Subject: Übergröße\r\n".encode() + b"\r\n",
            H + b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>12 widgets</p><img src=\"cid:logo\">\r\n",
        ):
            self.assertTrue(one_text_body(start), start)

    def test_everything_else_goes_to_a_worker(self):
        for start in (
            H + b"Content-Type: text/plain; name=order.txt\r\n\r\nbody\r\n",
            H + b"Content-Type: text/plain;\r\n name=order.txt\r\n\r\nbody\r\n",
            H + b"Content-Disposition: inline\r\n\r\nbody\r\n",
            H + b"Content-Type: text/htmlx\r\n\r\n<p>body</p>\r\n",
            H + b"Content-Type: text/calendar\r\n\r\nBEGIN:VCALENDAR\r\n",
            H + b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nbody\r\n--x--\r\n",
            H + b"Content-Type: application/pdf\r\n\r\n%PDF\r\n",
            H + b"Content-Type: text/plain\r\nContent-Type: text/plain\r\n\r\nbody\r\n",
            H + b"Content-Type: text/plainx\r\n\r\nbody\r\n",
            H + b"Content-Type: text/plain (comment)\r\n\r\nbody\r\n",
            H + b"X A: a field name with a space\r\n\r\nbody\r\n",
            b" continued\r\n" + H + b"\r\nbody\r\n",
            b"From buyer@customer.test Mon Dec  7 01:00:00 2026\r\n" + H + b"\r\nbody\r\n",
            H.replace(b"\r\n", b"\n") + b"\nbody\n",
            H + b"X-Long: " + b"a" * HEADER_LIMIT + b"\r\n\r\nbody\r\n",
            H,
            b"",
        ):
            self.assertFalse(one_text_body(start[:HEADER_LIMIT]), start[:200])

    def test_unreadable_file_goes_to_a_worker(self):
        self.assertFalse(needs_no_parser(os.path.join(self.mktemp(), "gone.eml")))


class SampleMessageTests(unittest.TestCase):
    def test_the_parser_agrees_on_every_sample_let_through(self):
        """Samples from other projects (tests/samples), with CRLF line ends as they arrive over SMTP."""
        through = 0
        for path in sample_messages():
            with open(path, "rb") as f:
                data = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if not one_text_body(data[:HEADER_LIMIT]):
                continue
            through += 1
            with tempfile.TemporaryDirectory() as directory:
                raw = os.path.join(directory, "raw.eml")
                with open(raw, "wb") as f:
                    f.write(data)
                os.mkdir(os.path.join(directory, "parts"))
                result = extract_attachments(raw, os.path.join(directory, "parts"))
            self.assertEqual((result.attachments, result.warnings, result.skipped), ([], WARNINGS, []), path)
        self.assertGreater(through, 20, "too few samples are text bodies for this to say anything")

    def test_the_check_process_says_what_reading_the_file_says(self):
        """The check process tells from the header section it read for the checks (a signed message's whole)."""
        said = []
        for path in sample_messages():
            for crlf in (False, True):
                raw = path
                if crlf:
                    raw = self.mktemp()
                    with open(path, "rb") as f, open(raw, "wb") as out:
                        out.write(f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
                request = {
                    "raw_path": raw, "client_ip": "192.0.2.1", "helo": "mx", "mail_from": "a@b.test",
                    "authserv_id": "mx", "resolver": ["127.0.0.1", 9], "budget": 0.0,
                }
                reply = checker.verify(request)
                self.assertIn("verdicts", reply, path)
                self.assertEqual(reply["text_body"], needs_no_parser(raw), (path, crlf))
                said.append(reply["text_body"])
        self.assertGreater(said.count(True), 20)
        self.assertGreater(said.count(False), 20)


class WithoutParserTests(ExtractionCase):
    @defer.inlineCallbacks
    def test_text_body_order_is_extracted_without_a_worker(self):
        parser = self.daemon.service.extraction.messages.parser
        self.patch(parser, "_argv", [sys.executable, "-c", "raise SystemExit(3)"])

        def read_again(path):
            raise AssertionError("the check process has said; the header was read again")

        self.patch(text_body, "needs_no_parser", read_again)
        row = yield self.deliver(order(subject="Plain order"))
        self.assertEqual((row["status"], row["warnings"]), ("parsed", None))  # "no attachments" is not stored as a warning
        self.assertEqual((yield self.documents(row["id"])), [])
        # A message with a document still needs the worker, which cannot start here.
        message_id = yield self.deliver(order(attachments=[(PDF, "application", "pdf", "PO.pdf")]), settle=False)
        row = yield self.daemon.until(message_id, lambda r: r["attempts"] >= 1, timeout=10)
        self.assertEqual(row["status"], "received")
        self.assertIn("ParserDied", row["last_error"])
