"""
The spool: one file per SMTP transaction, written while DATA arrives.

The message is never held whole in memory: each chunk goes to the file and to
two running hashes, one over the stored copy (our C{Received:} header plus the
message) and one over the message exactly as the sender sent it, which names
a message that has no Message-ID. Only the header section is kept in memory,
bounded, to read Message-ID and Subject.
"""

import hashlib
import os
import tempfile
from email.message import Message
from email.parser import BytesHeaderParser
from email import policy

from twisted.internet.threads import deferToThread

HEADER_LIMIT = 256 * 1024


class Spool:
    def __init__(self, directory: str, prefix: bytes = b""):
        fd, self.path = tempfile.mkstemp(dir=directory, prefix="spool-", suffix=".eml")
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self._raw_hash = hashlib.sha256(prefix)
        self._sent_hash = hashlib.sha256()
        self._file.write(prefix)
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
    def sent_sha256(self) -> str:
        return self._sent_hash.hexdigest()

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._raw_hash.update(chunk)
        self._sent_hash.update(chunk)
        self.size += len(chunk)
        if not self._header_done:
            self._capture_header(chunk)

    def _capture_header(self, chunk: bytes) -> None:
        start = max(0, len(self._header) - 3)
        self._header += chunk[: HEADER_LIMIT - len(self._header)]
        if self._header.startswith(b"\r\n"):
            del self._header[:]
            self._header_done = True
            return
        end = self._header.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._header[end + 2 :]
            self._header_done = True
        elif len(self._header) >= HEADER_LIMIT:
            self._header_done = True
            self.header_too_large = True

    def headers(self) -> Message:
        """The header section as parsed by the email package (never raises)."""
        return BytesHeaderParser(policy=policy.compat32).parsebytes(bytes(self._header))

    def finish(self):
        """Flush and fsync in a thread; fires when the spool file is durable."""
        return deferToThread(self._finish)

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
