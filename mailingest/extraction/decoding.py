"""
Undoing a part's Content-Transfer-Encoding, streamed into a sink.

Base64 is decoded 1 MiB at a time straight into the document file and its
digest, so no second copy of a large attachment is made; bodies that are not
clean base64 are repaired exactly as the email package repairs them, so the
bytes are the ones a mail client shows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import quopri
import re
from email.message import Message
from io import BytesIO

from zope.interface import Interface, implementer

DECODE_CHUNK_CHARS = 1 << 20

_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "8bits", "binary"})
_UUENCODE_NAMES = frozenset({"xuuencode", "uuencode", "xuue", "uue"})
_BASE64_IGNORED = b"\r\n\t "


class Undecodable(Exception):
    """The body cannot be decoded at all: no repair the email package knows gives bytes."""


class IDecodedSink(Interface):
    """Where decoded bytes go."""

    def write(data: bytes) -> None:
        """Take the next decoded bytes."""

    def restart() -> None:
        """Drop what was written: decoding starts over with a more lenient decoder."""


@implementer(IDecodedSink)
class MemorySink:
    """Decoded bytes kept in memory, at most C{limit} of them (None: all)."""

    def __init__(self, limit: int | None):
        self._buffer = BytesIO()
        self._limit = limit

    def write(self, data: bytes) -> None:
        if self._limit is None or self._buffer.tell() < self._limit:
            self._buffer.write(data)

    def restart(self) -> None:
        self._buffer = BytesIO()

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


@implementer(IDecodedSink)
class FileSink:
    """A document file being written, with its running size and digest."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.size = 0
        self.digest = hashlib.sha256()

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def decode(text: str, encoding: str, sink: IDecodedSink) -> str | None:
    """Write C{text} decoded into C{sink}; returns a warning if it needed care."""
    if encoding == "base64":
        return _write_base64(text, sink)
    if encoding == "quoted-printable":
        sink.write(quopri.decodestring(text.encode("ascii", "surrogateescape")))
        return None
    if encoding == "x-uuencode":
        _write_uu(text, sink)
        return None
    for start in range(0, len(text), DECODE_CHUNK_CHARS):
        sink.write(text[start : start + DECODE_CHUNK_CHARS].encode("ascii", "surrogateescape"))
    return f"unknown transfer encoding {encoding[:40]!r}, stored undecoded" if encoding else None


def _write_base64(text: str, sink: IDecodedSink) -> str | None:
    """
    Decode C{text} into C{sink} exactly as the email package would, in chunks.

    Clean base64 (the alphabet, line breaks, padding only at the very end) is
    decoded strictly a chunk at a time, which gives the same bytes as decoding
    it whole. Anything else starts over with L{_decode_base64_leniently} on the
    whole text. Returns a warning when the text needed repair.
    """
    carry = b""
    missing = 0
    for start in range(0, len(text), DECODE_CHUNK_CHARS):
        data = carry + text[start : start + DECODE_CHUNK_CHARS].encode("ascii", "surrogateescape")
        data = data.translate(None, _BASE64_IGNORED)
        if start + DECODE_CHUNK_CHARS >= len(text):
            missing = -len(data) % 4
            if missing == 3:
                break
            data, carry = data + b"=" * missing, b""
        else:
            cut = len(data) - len(data) % 4
            data, carry = data[:cut], data[cut:]
            if b"=" in data:
                break
        try:
            sink.write(binascii.a2b_base64(data, strict_mode=True))
        except binascii.Error:
            break
    else:
        return "base64 padding repaired" if missing else None
    sink.restart()
    decoded, warning = _decode_base64_leniently(text.encode("ascii", "surrogateescape").translate(None, b"\r\n"))
    sink.write(decoded)
    return warning


def _decode_base64_leniently(data: bytes) -> tuple[bytes, str | None]:
    """The email package's own repair (C{email._encoded_words.decode_b}), which is private."""
    missing = b"==="[: 4 - len(data) % 4] if len(data) % 4 else b""
    try:
        return base64.b64decode(data + missing, validate=True), "base64 padding repaired" if missing else None
    except binascii.Error:
        pass
    for attempt in (data, data + b"=="):
        try:
            return base64.b64decode(attempt), "invalid base64 content, decoded leniently"
        except binascii.Error:
            pass
    raise Undecodable()


def _write_uu(text: str, sink: IDecodedSink) -> None:
    """uudecode: the lines between C{begin <mode> <name>} and C{end}, as the email package reads them."""
    lines = iter(text.encode("ascii", "surrogateescape").splitlines())
    for line in lines:
        if re.match(rb"begin\s+[0-7]+(\s|$)", line):
            break
    else:
        if text.strip():
            raise Undecodable()
        return
    for line in lines:
        if line.strip() == b"end":
            return
        if not line.strip():
            continue
        try:
            sink.write(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders pad lines wrongly: keep the bytes the length character announces.
            try:
                sink.write(binascii.a2b_uu(line[: (((line[0] - 32) & 63) * 4 + 5) // 3]))
            except binascii.Error:
                raise Undecodable() from None


def transfer_encoding(part: Message) -> str:
    """
    The Content-Transfer-Encoding: C{base64}, C{quoted-printable},
    C{x-uuencode}, C{""} for none, or the unknown value as declared. Forgives spelling ("quoted
    printable", "7-bit", "base64;").
    """
    declared = str(part.get("content-transfer-encoding", ""))
    token = re.sub(r"[\s_-]", "", declared.partition(";")[0].lower())
    if token == "base64":
        return "base64"
    if token == "quotedprintable":
        return "quoted-printable"
    if token in _UUENCODE_NAMES:
        return "x-uuencode"
    if token in _IDENTITY_ENCODINGS:
        return ""
    return declared.strip()
