"""
L{mailingest.verification.dkim_reading}: each linear step gives what
dkimpy's own gives, on random and crafted input, at a cost that follows the
input's size rather than a product of its parts.
"""

import random

import dkim
from dkim.canonicalization import CanonicalizationPolicy, Relaxed, Simple

from twisted.trial import unittest

from mailingest.verification.dkim_check import read_message
from tests.corpus import sample_messages
from tests.python_steps import python_lines
from mailingest.verification.dkim_reading import (
    B_TAG,
    DKIMPY,
    MAX_FIELDS,
    MAX_RUN,
    UnreadableHeader,
    compress_whitespace,
    forget_body,
    long_run,
    read_fields,
    select_headers,
    strip_trailing_lines,
    strip_trailing_whitespace,
)

# Pieces of header sections and bodies, the odd ones dkimpy must agree on.
_PIECES = [
    b"a", b"Subject", b"X-Y", b":", b"::", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\r\n", b"From ",
    b"From:", b"v", b"\x7f", b"\xff", b"\x01", b"b: c", b"  ", b" \r\n", b"\t\r\n",
]


def random_bytes(rng: random.Random, count: int) -> bytes:
    return b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(count)))


def dkimpy_reading(message: bytes):
    try:
        headers, body = DKIMPY["rfc822_parse"](message)
    except Exception:
        return "unreadable"
    return [list(field) for field in headers], body


def ours(message: bytes):
    try:
        return read_fields(message)
    except UnreadableHeader:
        return "unreadable"


class ReadFieldsTests(unittest.TestCase):
    def test_random_messages_read_as_dkimpy_reads_them(self):
        rng = random.Random(20261207)
        disagreements = []
        for _ in range(20000):
            message = random_bytes(rng, 30)
            if ours(message) != dkimpy_reading(message):
                disagreements.append(message)
        self.assertEqual(disagreements[:5], [])

    def test_real_messages_read_as_dkimpy_reads_them(self):
        files = sample_messages()
        self.assertGreater(len(files), 100)
        for path in files:
            with open(path, "rb") as f:
                message = f.read()
            self.assertEqual(ours(message), dkimpy_reading(message), path)

    def test_fields_and_body(self):
        headers, body = read_fields(b"From: a\r\nX: b\r\n\tc\nY:d\r\n\r\nline\nline\r\n")
        self.assertEqual(headers, [[b"From", b" a\r\n"], [b"X", b" b\r\n\tc\r\n"], [b"Y", b"d\r\n"]])
        self.assertEqual(body, b"line\r\nline\r\n")

    def test_too_many_fields(self):
        message = b"a: b\r\n" * (MAX_FIELDS + 1) + b"\r\nbody"
        self.assertEqual(dkimpy_reading(message)[0][0], [b"a", b" b\r\n"], "dkimpy reads them all")
        with self.assertRaises(UnreadableHeader) as raised:
            read_fields(message)
        self.assertEqual(str(raised.exception), "message header cannot be read: 1,001 fields (at most 1,000 are read)")
        read_fields(b"a: b\r\n" * MAX_FIELDS + b" folded\r\n" * 5000 + b"\r\nbody")

    def test_long_line_without_a_colon_is_refused_in_one_pass(self):
        """Each field is matched where the last ended: a search tried every position of such a line again."""
        message = b"From: a\r\n" + b"a" * (128 * 1024) + b"\r\n\r\nbody"
        with self.assertRaises(UnreadableHeader):
            read_fields(message)

    test_long_line_without_a_colon_is_refused_in_one_pass.timeout = 20  # quadratic: minutes

    def test_folded_field_costs_no_python_line_per_fold(self):
        message = b"X: a\r\n" + b" \r\n" * 20000 + b"\r\nbody"
        self.assertGreater(python_lines(DKIMPY["rfc822_parse"], message)[1], 100000)
        self.assertLess(python_lines(read_fields, message)[1], 100)


class SelectHeadersTests(unittest.TestCase):
    def test_random_selections_as_dkimpy_makes_them(self):
        rng = random.Random(7)
        names = [b"from", b"From", b"to", b"subject", b"x"]
        for _ in range(5000):
            headers = [(rng.choice(names), b"%d" % i) for i in range(rng.randrange(8))]
            include = [rng.choice(names).lower() for _ in range(rng.randrange(8))]
            self.assertEqual(select_headers(headers, include), DKIMPY["select_headers"](headers, include))

    def test_absent_names_cost_no_walk_of_the_fields(self):
        headers = [(b"a", b"\r\n")] * 300
        include = [b"x%d" % i for i in range(300)]
        self.assertGreater(python_lines(DKIMPY["select_headers"], headers, include)[1], 90000)
        self.assertLess(python_lines(select_headers, headers, include)[1], 2000)
        self.assertIs(dkim.select_headers, select_headers, "installed where dkimpy's verification looks it up")
        verifier = read_message(b"From: a\r\n\r\nbody\r\n")
        self.assertEqual((verifier.headers, verifier.body), ([[b"From", b" a\r\n"]], b"body\r\n"))


class BodyCanonicalizationTests(unittest.TestCase):
    def test_random_bodies_as_dkimpy_makes_them(self):
        rng = random.Random(11)
        for _ in range(20000):
            body = random_bytes(rng, 12)
            self.assertEqual(strip_trailing_lines(body), DKIMPY["strip_trailing_lines"](body), body)
            self.assertEqual(strip_trailing_whitespace(body), DKIMPY["strip_trailing_whitespace"](body), body)
            self.assertEqual(compress_whitespace(body), DKIMPY["compress_whitespace"](body), body)

    def test_a_long_run_of_spaces_is_passed_once(self):
        """dkimpy's pattern tried every position of a run not followed by CRLF again: 2 s for 40,000 spaces."""
        body = b" " * (1024 * 1024) + b"x \r\n"
        self.assertEqual(strip_trailing_whitespace(body), b" " * (1024 * 1024) + b"x\r\n")

    test_a_long_run_of_spaces_is_passed_once.timeout = 20  # quadratic: hours

    def test_trailing_empty_lines_cost_no_python_line_each(self):
        body = b"text\r\n" + b"\r\n" * 30000
        self.assertEqual(strip_trailing_lines(body), b"text\r\n")
        self.assertGreater(python_lines(DKIMPY["strip_trailing_lines"], body)[1], 30000)
        self.assertLess(python_lines(strip_trailing_lines, body)[1], 20)

    def test_later_signatures_reuse_the_canonical_body(self):
        calls = []
        body = b"a  b \r\n"
        relaxed = CanonicalizationPolicy(Relaxed, Relaxed)
        self.patch(Relaxed, "canonicalize_body", staticmethod(lambda b: calls.append(b) or b"canonical"))
        self.addCleanup(forget_body)
        self.assertEqual(relaxed.canonicalize_body(body), b"canonical")
        self.assertEqual(relaxed.canonicalize_body(body), b"canonical")
        self.assertEqual(CanonicalizationPolicy(Simple, Simple).canonicalize_body(body), b"a  b \r\n")
        self.assertEqual(len(calls), 1)
        forget_body()
        relaxed.canonicalize_body(body)
        self.assertEqual(len(calls), 2, "forgotten after the message")


class SignatureFieldTests(unittest.TestCase):
    def test_b_tag_removed_as_dkimpy_removes_it(self):
        rng = random.Random(3)
        pieces = [b" ", b"\r\n", b"\n", b"\t", b"\r", b";", b"b", b"=", b"a", b"+", b"!", b"h=", b" b ="]
        for _ in range(20000):
            value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(16)))
            self.assertEqual(B_TAG.sub(b"\\1", value), DKIMPY["RE_BTAG"].sub(b"\\1", value), value)
        self.assertIs(dkim.RE_BTAG, B_TAG, "installed where dkimpy hashes a signature field")

    def test_folding_before_the_next_tag_is_passed_once(self):
        value = b" v=1; b=AAAA" + b" \r\n " * 80000 + b"; d=x"
        self.assertEqual(B_TAG.sub(b"\\1", value), b" v=1; b=" + b" \r\n " * 80000 + b"; d=x")

    test_folding_before_the_next_tag_is_passed_once.timeout = 20  # dkimpy's: minutes

    def test_long_runs(self):
        folded = b" v=1; a=rsa-sha256; b=dOdFEyhrk/tw5wl3vMIogoxhaVsKJkrkEhnAcq2XqOLSQhPpGzhGBJzR7k1sWGokon3TmQ\r\n\t\t 7TX9zQ==; bh=x="
        self.assertIsNone(long_run(folded))
        self.assertIsNone(long_run(b"b=a" + b" " * MAX_RUN + b"a"))
        self.assertIsNotNone(long_run(b"b=a" + b" " * (MAX_RUN + 1) + b"!"))
        self.assertIsNotNone(long_run(b"b=a" + b"= \r\n" * 20))
        self.assertIsNotNone(long_run(b" " * 200000))
