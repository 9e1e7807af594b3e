"""The bulk end-of-DATA reader, against every way a stream can be split."""

import random

from twisted.trial import unittest

from mailingest.smtp.data_reader import DotReader

CASES = [
    (b".\r\n", b""),
    (b"hi\r\n.\r\n", b"hi\r\n"),
    (b"..x\r\n.\r\n", b".x\r\n"),
    (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
    (b"a\r\n...b\r\n.\r\n", b"a\r\n..b\r\n"),
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
    (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\rb\r\n"),
    (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n"),
    (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n"),
    (b"no final\r\n\r\n.\r\n", b"no final\r\n\r\n"),
    (b"a.b\r\nc.\r\n.\r\n", b"a.b\r\nc.\r\n"),
    (b"end.\r\n..\r\n.\r\n", b"end.\r\n.\r\n"),
]


def read(stream: bytes, cuts: list[int], limit: int = 10**9):
    out = []
    reader = DotReader(out.append, limit)
    position = 0
    for cut in cuts + [len(stream)]:
        if cut <= position:
            continue
        consumed = reader.feed(stream[position:cut])
        if consumed is not None:
            return b"".join(out), position + consumed, reader
        position = cut
    return b"".join(out), None, reader


class DotReaderTests(unittest.SynchronousTestCase):
    def test_every_split(self):
        rng = random.Random(1)
        for data, expected in CASES:
            stream = data + b"MAIL FROM:<next@x>\r\n"
            splits = [[]] + [[i] for i in range(1, len(stream))]
            splits += [sorted(rng.sample(range(1, len(stream)), min(4, len(stream) - 1))) for _ in range(50)]
            for cuts in splits:
                got, consumed, _ = read(stream, cuts)
                self.assertEqual((got, consumed), (expected, len(data)), (data, cuts))

    def test_incomplete_stream_waits(self):
        got, consumed, _ = read(b"hello\r\n.\r", [])
        self.assertEqual((got, consumed), (b"hello", None))

    def test_size_limit(self):
        got, consumed, reader = read(b"x" * 100 + b"\r\n.\r\n", [10, 50], limit=60)
        self.assertEqual(consumed, 105)
        self.assertEqual(reader.refusal[0], 552)
        self.assertEqual(reader.size, 102)

    def test_long_line_across_chunks(self):
        stream = b"short\r\n" + b"y" * 300 + b"\r\n.\r\n"
        for cuts in ([], [100], [7, 200], [50, 150, 250]):
            out = []
            reader = DotReader(out.append, 10**9, max_line=256)
            reader.feed(stream[: cuts[0]] if cuts else stream)
            position = cuts[0] if cuts else len(stream)
            for cut in cuts[1:] + [len(stream)]:
                if position < len(stream):
                    reader.feed(stream[position:cut])
                position = cut
            self.assertEqual(reader.refusal[0], 500, cuts)

    def test_lines_at_the_limit_pass(self):
        stream = (b"y" * 256 + b"\r\n") * 3 + b".\r\n"
        out = []
        reader = DotReader(out.append, 10**9, max_line=257)
        self.assertEqual(reader.feed(stream), len(stream))
        self.assertIsNone(reader.refusal)

    def test_random_streams_read_as_lines(self):
        """Against the RFC's own wording, line by line: a line of one dot ends the data, a leading dot is dropped."""

        def by_lines(stream):
            out, position = [], 0
            while True:
                end = stream.index(b"\r\n", position)
                line = stream[position:end]
                if line == b".":
                    return b"".join(out), end + 2
                out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
                position = end + 2

        rng = random.Random(7)
        pieces = [b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b"bc"]
        for _ in range(400):
            stream = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40))) + b"\r\n.\r\n"
            expected = by_lines(stream)
            for _ in range(5):
                cuts = sorted(rng.sample(range(1, len(stream)), min(rng.randrange(0, 6), len(stream) - 1)))
                got, consumed, _ = read(stream, cuts)
                self.assertEqual((got, consumed), expected, (stream, cuts))

    def test_stuffed_lines_cost_no_call_each(self):
        """A sender who starts every line with a dot gets the same few calls per buffer as any other."""
        stream = b"..x\r\n" * 10000 + b".\r\n"
        out = []
        reader = DotReader(out.append, 10**9)
        self.assertEqual(reader.feed(stream), len(stream))
        self.assertEqual(b"".join(out), b".x\r\n" * 10000)
        self.assertEqual(len(out), 1)
