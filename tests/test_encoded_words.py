"""
The linear RFC 2047 decoder gives what C{email.header} gives, and the Subject
is decoded in bounded time whatever the sender puts in it.
"""

import email.header
import random
import time

from twisted.trial import unittest

from mailingest import encoded_words
from mailingest.delivery.ingest import subject_of

# The crafted Subject of issue 11: 40 s of decode_header on the reactor.
HOSTILE_SUBJECT = "=?a?q?x" * 18432 + "\r\n " + "=?a?q?x" * 18432

NORMAL = [
    "plain subject",
    "=?utf-8?q?Bestellung_f=C3=BCr_M=C3=A4rz?=",
    "Re: =?ISO-8859-1?Q?Andr=E9?= Pirard <pirard@example.be>",
    "=?utf-8?B?w6TDtsO8?= =?utf-8?B?w6TDtsO8?=",
    "=?utf-8?q?folded?=\r\n =?utf-8?q?_over_lines?=",
    "a =?utf-8?q?b?= c",
    "=?iso-2022-jp?b?GyRCRnxLXDhsGyhC?=",
    "=?utf-8?b?w6Q?=",
    "=?utf-8?b?QUIAQ0Q=?=",
    "=?bogus?q?unknown_charset?=",
    "=?utf-8?b?not base64!?=",
    "Bestellung für =?utf-8?q?x?=",
    "=?US-ASCII*EN?Q?Keith_Moore?=",
    "=?utf-8?q?unclosed",
]


def with_email_package(text: str) -> str:
    """What subject_of gave when it used email.header.decode_header."""
    try:
        text = str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        pass
    return " ".join(text.split())


class DecodeHeaderTests(unittest.TestCase):
    def test_normal_subjects_decode_as_the_email_package_does(self):
        for text in NORMAL:
            self.assertEqual(subject_of(text), with_email_package(text), text)
        self.assertEqual(subject_of(NORMAL[1]), "Bestellung für März")
        self.assertEqual(subject_of(NORMAL[2]), "Re: André Pirard <pirard@example.be>")

    def test_same_chunks_as_the_email_package(self):
        for text in NORMAL[1:9]:
            self.assertEqual(encoded_words.decode_header(text), email.header.decode_header(text), text)

    def test_random_subjects_decode_as_the_email_package_does(self):
        pieces = ["=?", "?=", "?", "q", "Q", "b", "B", "utf-8", "a", " ", "_", "=C3", "=A4", "\r\n ", "\t", "=", "YQ"]
        rng = random.Random(11)
        for _ in range(20000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
            self.assertEqual(subject_of(text), with_email_package(text), repr(text))


class HostileSubjectTests(unittest.TestCase):
    def test_crafted_subject_is_decoded_in_bounded_time(self):
        started = time.perf_counter()
        subject = subject_of(HOSTILE_SUBJECT)
        elapsed = time.perf_counter() - started
        self.assertTrue(subject.startswith("=?a?q?x=?a?q?x"))
        self.assertEqual(len(subject), 998)
        # The email package took about 40 s; the bound is about 2 ms.
        self.assertLess(elapsed, 0.25)
