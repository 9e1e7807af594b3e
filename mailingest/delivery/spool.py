"""
The spool: what one SMTP transaction received, while DATA arrives.

A message up to C{MEMORY_LIMIT} stays in memory and goes to the blob store
from there (L{mailingest.interfaces.IBlobStore.put_bytes}): small messages
cost no spool file and no extra thread round trip. A larger one spills to its
file as it arrives and is never held whole.

Two digests are kept: of the stored copy (our C{Received:} header plus the
message), and of the body after the header section, which with the
originator headers tells a retry from another message reusing its
Message-ID. A message in memory is hashed chunk by chunk as it arrives; a
spilled one is hashed from its file once complete, in a thread, in one read
for every digest: hashlib releases the GIL, so the reactor goes on serving
other sessions meanwhile. The hash of the message exactly as the sender sent
it, which names a message that has no Message-ID, is computed at the end
only for such a message (in that same read). The header section is kept, bounded, to read Message-ID,
Subject and the originator headers.

The spool file is not fsynced: the blob store makes durable what it stores
(on local disk, the same inode, hard-linked), and S3 needs no local copy.
"""

import functools
import hashlib
import os
import tempfile
import re

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread

HEADER_LIMIT = 256 * 1024
# The email package ends the header section at the first empty line, lines
# ending in CRLF, LF or CR alike: a line end followed by another.
_BLANK_LINE = re.compile(rb"\n[\r\n]|\r\r")
MEMORY_LIMIT = 128 * 1024
# A line end as the email package splits lines: CRLF, or a CR or LF alone.
_EOL = rb"(?:\r\n|\r(?!\n)|\n)"
# After a line end: the start of a line that ends the header section, as the
# email package's headerRE has it: neither a continuation, nor NAME ":" (the
# name possibly empty), nor an mbox "From " line (skipped wherever it is).
# Two patterns, each led by one literal character the engine looks for fast:
# after a LF (a CRLF's too), and after a CR alone.
_NOT_A_FIELD = rb"(?![ \t]|From |[\x21-\x39\x3b-\x7e]*:)"
_NOT_A_FIELD_LINE = (re.compile(rb"\n" + _NOT_A_FIELD), re.compile(rb"\r(?!\n)" + _NOT_A_FIELD))
_LINE_END = re.compile(_EOL)


# A field's value: the rest of its line and its continuation lines, as far
# as VALUE_LIMIT bytes (a Subject is decoded to 4 KiB, a Message-ID is one
# line): a sender's 256 KiB of folded lines are not all read.
_FIELD_VALUE = re.compile(rb"[^\r\n]*(?:" + _EOL + rb"[ \t][^\r\n]*)*")
VALUE_LIMIT = 16 * 1024


@functools.lru_cache(maxsize=16)
def _searched(names: tuple[str, ...]) -> tuple[tuple[str, bytes, bytes], ...]:
    """Each name with what starts its field's line, lowercased: after a LF, after a CR."""
    keys = [name.lower().encode("ascii") + b":" for name in names]
    return tuple((name, b"\n" + key, b"\r" + key) for name, key in zip(names, keys))


class Spool:
    def __init__(self, directory: str, prefix: bytes = b""):
        self.directory = directory
        self.path: str | None = None
        self._file = None
        self._memory = bytearray(prefix)
        self._raw_hash = hashlib.sha256(prefix)
        self._body_hash = hashlib.sha256()
        self._sent_sha256: str | None = None
        self.prefix_size = len(prefix)
        self.size = 0
        self._header = bytearray()
        self._header_done = False
        self.header_too_large = False

    @property
    def raw_size(self) -> int:
        """Bytes of the stored copy."""
        return self.prefix_size + self.size

    @property
    def raw_sha256(self) -> str:
        return self._raw_hash.hexdigest()

    @property
    def body_sha256(self) -> str:
        """The sha256 of what follows the header section (its empty line included)."""
        return self._body_hash.hexdigest()

    @property
    def sent_sha256(self) -> str | None:
        """
        The sha256 of the message as the sender sent it (without our header),
        which names a message that has no Message-ID: None unless L{finish}
        was asked for it.
        """
        return self._sent_sha256

    def write(self, chunk: bytes) -> None:
        if self._file is not None:
            # Spilled: the digests are taken from the file at the end, in a
            # thread (L{finish}), not chunk by chunk on the reactor.
            self._file.write(chunk)
            if not self._header_done:
                self._capture_header(chunk)
            self.size += len(chunk)
            return
        self._memory += chunk
        self._raw_hash.update(chunk)
        if self._header_done:
            self._body_hash.update(chunk)
        else:
            self._capture_header(chunk)
            if self._header_done:
                # The header section holds every byte before the body.
                self._body_hash.update(memoryview(chunk)[len(self._header) - self.size :])
        self.size += len(chunk)
        if len(self._memory) > MEMORY_LIMIT:
            self._spill()

    def _capture_header(self, chunk: bytes) -> None:
        start = max(0, len(self._header) - 1)
        self._header += chunk[: HEADER_LIMIT - len(self._header)]
        if self._header[:1] in (b"\r", b"\n"):
            end = 0
        else:
            blank = _BLANK_LINE.search(self._header, start)
            end = -1 if blank is None else blank.start() + 1
        if end >= 0:
            del self._header[end:]
            self._header_done = True
        elif len(self._header) >= HEADER_LIMIT:
            self._header_done = True
            self.header_too_large = True

    def headers(self, *names: str) -> dict[str, str | None]:
        """
        The raw value of the first header of each of C{names}, continuation
        lines included, as the email package's compat32 policy reads it;
        8-bit bytes (RFC 6532) decoded as UTF-8; None when absent. One plain
        scan, since delivery needs a few headers of every message, not a parse:
        a search per name and one regular expression over the lines before the
        last one found, not a Python step per line.
        """
        text = b"\n" + self._header  # bytes, one copy of the bytearray
        lowered = text.lower()
        fields = {}
        for name, after_lf, after_cr in _searched(names):
            # The first line that starts with it, after a CRLF, a LF or a CR alone.
            at = lowered.find(after_lf)
            bare = lowered.find(after_cr, 0, at if at >= 0 else len(lowered))
            if bare >= 0 or at >= 0:
                at = bare if bare >= 0 else at
                fields[name] = (at, at + len(after_lf))
        if fields:
            # Only a field before the first line that ends the section counts.
            last = max(value for _, value in fields.values())
            ends = [found.start() for pattern in _NOT_A_FIELD_LINE if (found := pattern.search(text, 0, last))]
            if ends:
                fields = {name: at for name, at in fields.items() if at[0] < min(ends)}
        values = {}
        for name, (_, value) in fields.items():
            folded = _FIELD_VALUE.match(text, value, value + VALUE_LIMIT).group()
            values[name] = _LINE_END.sub(b"\r\n", folded).lstrip(b" \t").decode("utf-8", "replace")
        return {name: values.get(name) for name in names}

    def _open(self):
        fd, self.path = tempfile.mkstemp(dir=self.directory, prefix="spool-", suffix=".eml")
        return os.fdopen(fd, "wb", buffering=1 << 20)

    def _spill(self) -> None:
        self._file = self._open()
        self._file.write(self._memory)
        self._memory = bytearray()

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def data(self) -> bytes:
        """The stored copy of a message kept L{in_memory}."""
        return bytes(self._memory)

    def finish(self, sent: bool = False):
        """
        Fires when the message is complete: at once for one in memory; for a
        spilled one, when C{path} holds it all (the last write) and its
        digests are taken from it, in a thread: hashlib lets go of the GIL, so
        a large message is hashed beside the reactor rather than on it. With
        C{sent}, L{sent_sha256} is taken too, in the same pass.
        """
        if self.in_memory:
            if sent:
                self._sent_sha256 = hashlib.sha256(memoryview(self._memory)[self.prefix_size :]).hexdigest()
            return succeed(None)
        return deferToThread(self._close_and_hash, sent)

    def _close_and_hash(self, sent: bool) -> None:
        """One read of the file for every digest, each from where its part starts."""
        self._file.close()
        body_start = self.prefix_size + (len(self._header) if self._header_done else self.size)
        parts = [(hashlib.sha256(), 0), (hashlib.sha256(), body_start)]
        if sent:
            parts.append((hashlib.sha256(), self.prefix_size))
        offset = 0
        with open(self.path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                for digest, start in parts:
                    if offset + len(chunk) > start:
                        digest.update(memoryview(chunk)[max(0, start - offset) :])
                offset += len(chunk)
        self._raw_hash, self._body_hash = parts[0][0], parts[1][0]
        if sent:
            self._sent_sha256 = parts[2][0].hexdigest()

    def discard(self) -> None:
        """
        Throw the message away. A file whose write failed (a full disk) still
        holds buffered bytes its close fails to flush: those are being thrown
        away too, so the close's error is not one, and the file goes anyway.
        """
        self._memory = bytearray()
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
