"""
The end of SMTP DATA, found in bulk.

DATA is read in whole buffers rather than a Python call per line: the reader
looks for CRLF "." and undoes dot-stuffing on slices, carrying a possible
partial terminator (at most four bytes) across reads. Only CRLF "." CRLF ends
the data: a bare LF or CR never does, so a "." between bare line endings is
message text, not an end of data (SMTP smuggling).
"""

from typing import Callable


MAX_LINE = 128 * 1024


def size_refusal(limit: int) -> bytes:
    """The 552 text, stating the limit in bytes, for SIZE= and for DATA."""
    return b"5.3.4 Message size exceeds fixed maximum message size of %d bytes" % limit


class DotReader:
    """
    C{refusal} is None while the data is acceptable, else the reply to give at
    the end of DATA: the rest is still read (to stay in step with the client)
    but no longer passed to the sink.
    """

    def __init__(self, sink: Callable[[bytes], None], limit: int, max_line: int = MAX_LINE):
        # The CRLF that ended the DATA command: a "." at the very start of the
        # data is at the start of a line. It is not part of the message.
        self._carry = b"\r\n"
        self._skip = 2
        self._sink = sink
        self._limit = limit
        self._max_line = max_line
        self._line = 0
        self.size = 0
        self.refusal: tuple[int, bytes] | None = None

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
            # A search for the dot alone (memchr) first: most of a large
            # message (base64) has none, and a search for CRLF "." over a
            # buffer costs several times more. A CRLF "." starts at most two
            # bytes before the first dot.
            dot = buf.find(b".", pos)
            i = -1 if dot < 0 else buf.find(b"\r\n.", max(pos, dot - 2))
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
        if self.refusal is not None:
            return
        if self.size > self._limit:
            self.refuse(552, size_refusal(self._limit))
        elif self._too_long(chunk):
            self.refuse(500, b"5.5.2 Message line longer than %d bytes" % self._max_line)
        else:
            self._sink(chunk)

    def refuse(self, code: int, reply: bytes) -> None:
        if self.refusal is None:
            self.refusal = (code, reply)

    def _too_long(self, chunk: bytes) -> bool:
        """Lines are counted across chunks; only bytes in a line are held, never the line."""
        first = chunk.find(b"\n")
        if first < 0:
            self._line += len(chunk)
            return self._line > self._max_line
        if self._line + first > self._max_line:
            return True
        last = chunk.rfind(b"\n")
        # Only a chunk whose whole lines span more than the limit can hold a line over it.
        if last - first > self._max_line and max(map(len, chunk[first:last].split(b"\n"))) > self._max_line:
            return True
        self._line = len(chunk) - last - 1
        return self._line > self._max_line
