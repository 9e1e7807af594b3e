"""
The end of SMTP DATA, found in bulk.

DATA is read in whole buffers rather than a Python call per line: the reader
looks for CRLF "." and undoes dot-stuffing on slices, carrying a possible
partial terminator (at most four bytes) across reads. Only CRLF "." CRLF ends
the data: a bare LF or CR never does, so a "." between bare line endings is
message text, not an end of data (SMTP smuggling).
"""

from typing import Callable


class DotReader:
    def __init__(self, sink: Callable[[bytes], None], limit: int):
        # The CRLF that ended the DATA command: a "." at the very start of the
        # data is at the start of a line. It is not part of the message.
        self._carry = b"\r\n"
        self._skip = 2
        self._sink = sink
        self._limit = limit
        self.size = 0
        self.overflow = False

    def feed(self, data: bytes) -> int | None:
        """
        Take the next bytes of the stream. Returns None when all of C{data} was
        message (more is needed), or how many bytes of C{data} were consumed
        up to and including the terminating CRLF "." CRLF.
        """
        buf = self._carry + data
        base = len(self._carry)
        pos = 0
        while True:
            i = buf.find(b"\r\n.", pos)
            if i < 0:
                keep = max(pos, len(buf) - 2)
                self._emit(buf[pos:keep])
                self._carry = buf[keep:]
                return None
            if len(buf) < i + 5:
                self._emit(buf[pos:i])
                self._carry = buf[i:]
                return None
            self._emit(buf[pos : i + 2])
            if buf[i + 3 : i + 5] == b"\r\n":
                self._carry = b""
                return i + 5 - base
            pos = i + 3

    def _emit(self, chunk: bytes) -> None:
        if self._skip:
            cut = min(self._skip, len(chunk))
            chunk = chunk[cut:]
            self._skip -= cut
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self._limit:
            self.overflow = True
        if not self.overflow:
            self._sink(chunk)
