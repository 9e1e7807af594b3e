"""
The spool's header scan reads Message-ID and Subject as the email package
would (its compat32 parse was used before the scan replaced it), on crafted
edge cases and on every message of the sample corpus.
"""

import hashlib
import os
import random
import sys
from email import policy
from email.parser import BytesHeaderParser

from twisted.trial import unittest

from mailingest.delivery.ingest import message_id_of, subject_of
from mailingest.delivery.spool import HEADER_LIMIT, MEMORY_LIMIT, Spool
from tests.corpus import sample_messages


def spool_of(data: bytes, directory: str) -> Spool:
    spool = Spool(directory)
    spool.write(data[:1000])
    spool.write(data[1000:])
    spool.discard()
    return spool


def email_package(data: bytes, name: str) -> str | None:
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(data)
    for key, value in headers.raw_items():
        if key.lower() == name.lower():
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None


class HeaderScanTests(unittest.TestCase):
    def assertSameAsEmailPackage(self, data: bytes) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        headers = spool_of(data, directory).headers("Message-ID", "Subject")
        for name, meaning in (("Message-ID", message_id_of), ("Subject", subject_of)):
            self.assertEqual(meaning(headers[name]), meaning(email_package(data, name)), (name, data[:300]))

    def test_cases(self):
        for data in [
            b"Subject: plain\r\nMessage-ID: <a@b>\r\n\r\nbody",
            b"subject:   no space and case\r\nmessage-id:<a@b>\r\n\r\n",
            b"Subject: folded\r\n  over\r\n\ttwo lines\r\nMessage-ID:\r\n <folded@id>\r\n\r\n",
            b"Subject: =?utf-8?q?Bestellung_f=C3=BCr_M=C3=A4rz?=\r\n\r\n",
            "Subject: Bestellung für März (8-bit)\r\n\r\n".encode("utf-8"),
            b"Subject: bad \xff\xfe bytes\r\n\r\n",
            b"Subject: first\r\nSubject: second\r\n\r\n",
            b"From sender@example.com Mon Nov 24 07:00:00 2026\r\nSubject: mbox\r\n\r\n",
            b"X-Other: 1\r\nthis is not a header\r\nSubject: in the body now\r\n\r\n",
            b"Subject : space before colon\r\n\r\n",
            b"X: 1\r\n: no name\r\nSubject: after a nameless line\r\n\r\n",
            b"Subject: bare LF\nMessage-ID: <lf@id>\n\nbody",
            b"\r\nSubject: after an empty line: body\r\n",
            b"Subject: no body separator",
            b"Message-ID: \r\n\r\n",
            b"",
            b"Subject: bare CR\r\rMessage-ID: <in@body>\r\n\r\n",
            b"Subject: LF then CR\n\rMessage-ID: <in@body>\n\n",
        ]:
            self.assertSameAsEmailPackage(data)

    def test_random_header_sections(self):
        """
        Lines of names, colons, folds, bare CR and LF, mbox "From " lines, in
        any order: read as the email package reads them (the scan before this
        test read a bare CR as part of a line and stopped at an mbox line past
        the first: 18,905 of 90,000 such sections read otherwise).
        """
        rng = random.Random(3)
        pieces = [b"Subject", b"message-id", b"X-A", b"From ", b"From", b":", b": ", b" ", b"\t", b"v", b"<i@d>", b"\r", b"\n",
                  b"\r\n", b"\xc3\xa9", b"Message-ID: <m@x>", b"\r\n ", b"SUBJECT:", b"\rSubject:", b"\rmessage-id:<c@r>"]
        for _ in range(1000):
            data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40))) + rng.choice([b"\r\n\r\nbody", b"\n\nbody", b"", b"\r\n"])
            self.assertSameAsEmailPackage(data)

    def test_many_short_lines_are_not_a_step_each(self):
        """A header section of 87,000 one-byte fields (no Message-ID) costs a few regular expressions, not Python steps per line."""
        directory = self.mktemp()
        os.makedirs(directory)
        spool = spool_of(b"X:\n" * 87000 + b"Subject: last\n\nbody", directory)
        steps = []

        def count_lines(frame, event, arg):
            if event == "line":
                steps.append(frame.f_lineno)
            return count_lines

        def trace(frame, event, arg):
            return count_lines if frame.f_code is Spool.headers.__code__ else None

        before = sys.gettrace()
        sys.settrace(trace)
        try:
            headers = spool.headers("Message-ID", "Subject")
        finally:
            sys.settrace(before)
        self.assertEqual(headers, {"Message-ID": None, "Subject": "last"})
        self.assertLess(len(steps), 100)

    def test_end_of_header_section_as_the_email_package_finds_it(self):
        """Issue 12: only CRLF CRLF ended it, so a large bare-LF message was refused as too large."""
        body = b"x" * 63 + b"\n"
        for header in (
            b"Subject: bare LF\nMessage-ID: <lf@id>\n\n",
            b"Subject: CRLF then LF\r\nMessage-ID: <mixed@id>\r\n\n",
            b"Subject: LF then CRLF\nMessage-ID: <mixed@id>\n\r\n",
            b"Subject: CRLF\r\nMessage-ID: <crlf@id>\r\n\r\n",
        ):
            data = header + body * 5000
            self.assertGreater(len(data), HEADER_LIMIT)
            directory = self.mktemp()
            os.makedirs(directory)
            spool = spool_of(data, directory)
            self.assertFalse(spool.header_too_large, header)
            self.assertSameAsEmailPackage(data)
            self.assertIsNotNone(spool.headers("Message-ID")["Message-ID"])

    def test_corpus(self):
        files = sample_messages()
        self.assertGreater(len(files), 100)
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            self.assertSameAsEmailPackage(data)

    async def test_digests_of_a_spilled_message_are_taken_from_its_file(self):
        """Past the memory limit the digests come from the file, in a thread: the same as for a message in memory."""
        prefix = b"Received: ours\r\n"
        lines = b"0123456789abcdef\r\n" * (MEMORY_LIMIT // 9)
        for data, body in [
            (b"Subject: big\r\n" + b"\r\n" + lines, b"\r\n" + lines),
            (b"Subject: big\n" + b"\n" + lines.replace(b"\r\n", b"\n"), b"\n" + lines.replace(b"\r\n", b"\n")),
            (b"x" * (MEMORY_LIMIT + 7), b""),
        ]:
            directory = self.mktemp()
            os.makedirs(directory)
            spool = Spool(directory, prefix)
            self.addCleanup(spool.discard)
            for start in range(0, len(data), 65536):
                spool.write(data[start : start + 65536])
            self.assertFalse(spool.in_memory)
            await spool.finish(sent=True)
            self.assertEqual(spool.raw_sha256, hashlib.sha256(prefix + data).hexdigest())
            self.assertEqual(spool.sent_sha256, hashlib.sha256(data).hexdigest())
            self.assertEqual(spool.body_sha256, hashlib.sha256(body).hexdigest())
            with open(spool.path, "rb") as f:
                self.assertEqual(f.read(), prefix + data)

    def test_body_hash_whatever_the_chunks(self):
        """The body (after the header section) is hashed while spooling, the same for any chunking."""
        for data, body in [
            (b"Subject: a\r\n\r\nbody\r\n", b"\r\nbody\r\n"),
            (b"Subject: a\n\nbody\n", b"\nbody\n"),
            (b"Subject: a\r\n\nbody", b"\nbody"),
            (b"\r\nall body", b"\r\nall body"),
            (b"Subject: no body", b""),
        ]:
            for size in (1, 2, 3, 7, len(data)):
                directory = self.mktemp()
                os.makedirs(directory)
                spool = Spool(directory, b"Received: ours\r\n")
                for start in range(0, len(data), size):
                    spool.write(data[start : start + size])
                spool.discard()
                self.assertEqual(spool.body_sha256, hashlib.sha256(body).hexdigest(), (data, size))
