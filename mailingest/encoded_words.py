"""
RFC 2047 encoded words, decoded in linear time.

C{email.header.decode_header} finds encoded words with a regular expression
that rescans to the end of the line from every C{=?} that is not closed, so
its time grows with the square of the input.
L{decode_header} returns what the email package's does, finding the same
words with C{str.find}, so a sender-controlled header can be decoded on the
reactor thread.
"""

import binascii
import email.base64mime
import email.quoprimime
from collections.abc import Iterator
from email.errors import HeaderParseError

_ENCODINGS = ("q", "Q", "b", "B")


def _encoded_words(line: str) -> Iterator[tuple[int, int, str, str, str]]:
    """
    (start, end, charset, encoding, encoded text) of each encoded word of one
    line, leftmost first, as C{email.header.ecre} matches them. The closing
    C{?=} found for one candidate serves every later candidate before it, so
    each character is scanned a bounded number of times.
    """
    search = 0
    close = -1
    while (start := line.find("=?", search)) >= 0:
        mark = line.find("?", start + 2)
        if mark < 0:
            return
        if line[mark + 1 : mark + 2] not in _ENCODINGS or line[mark + 2 : mark + 3] != "?":
            search = start + 1
            continue
        text = mark + 3
        if close < text:
            close = line.find("?=", text)
            if close < 0:
                return
        yield start, close + 2, line[start + 2 : mark], line[mark + 1], line[text:close]
        search = close + 2


def decode_header(header: str) -> list[tuple[bytes | str, str | None]]:
    """The (text, charset) chunks of C{header}, as C{email.header.decode_header} gives them."""
    lines = header.splitlines()
    words: list[tuple[str, str | None, str | None]] = []
    for line in lines:
        end = 0
        for start, end_of_word, charset, encoding, encoded in _encoded_words(line):
            unencoded = line[end:start]
            if end == 0:
                unencoded = unencoded.lstrip()
            if unencoded:
                words.append((unencoded, None, None))
            words.append((encoded, encoding.lower(), charset.lower()))
            end = end_of_word
        unencoded = line[end:].lstrip() if end == 0 else line[end:]
        if unencoded:
            words.append((unencoded, None, None))
    if all(encoding is None for _, encoding, _ in words):
        return [(header, None)]
    # Whitespace between two encoded words is dropped (RFC 2047 section 6.2).
    kept = [
        word
        for n, word in enumerate(words)
        if not (0 < n < len(words) - 1 and words[n + 1][1] and words[n - 1][1] and word[0].isspace())
    ]
    runs: list[tuple[list[bytes], str | None]] = []
    for text, encoding, charset in kept:
        if not runs or runs[-1][1] != charset:
            runs.append(([], charset))
        runs[-1][0].append(_decoded(text, encoding))
    # Unencoded words are rejoined by a space, words of one charset run together.
    return [((b" " if charset is None else b"").join(parts), charset) for parts, charset in runs]


def _decoded(text: str, encoding: str | None) -> bytes:
    if encoding is None:
        return text.encode("raw-unicode-escape")
    if encoding == "q":
        return email.quoprimime.header_decode(text).encode("raw-unicode-escape")
    text += "==="[: -len(text) % 4]
    try:
        return email.base64mime.decode(text)
    except binascii.Error:
        raise HeaderParseError("Base64 decoding error") from None
