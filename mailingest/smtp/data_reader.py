"""
The end of SMTP DATA, found in bulk.

DATA is read in whole buffers rather than a Python call per line: the reader
looks for CRLF "." CRLF and undoes dot-stuffing with one C{bytes.replace} per
buffer, so its cost does not depend on how many lines the sender stuffed,
carrying a possible partial terminator (at most six bytes) across reads. Only CRLF "." CRLF ends
the data: a bare LF or CR never does, so a "." between bare line endings is
message text, not an end of data (SMTP smuggling).
"""

from typing import Callable


MAX_LINE = 128 * 1024


def size_refusal(limit: int) -> bytes:
    """The 552 text, stating the limit in bytes, for SIZE= and for DATA."""
    return b"5.3.4 Message size exceeds fixed maximum message size of %d bytes" % limit


def _unstuffed(data: bytes, first: int) -> bytes:
    """
    C{data} with the dot that starts each line removed (RFC 5321 4.5.2), in
    C code; C{first} is where its first CRLF "." is, if anywhere (-1).
    """
    if first < 0 or first >= len(data):
        return data
    return data.replace(b"\r\n.", b"\r\n")


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
        # A search for the dot alone (memchr) first: most of a large message
        # (base64) has none, and a search for CRLF "." costs several times
        # more. It starts at most two bytes before the first dot, and the
        # terminator, a CRLF "." too, no earlier than the first of them.
        dot = buf.find(b".")
        first = -1 if dot < 0 else buf.find(b"\r\n.", max(0, dot - 2))
        end = -1 if first < 0 else buf.find(b"\r\n.\r\n", first)
        if end >= 0:
            self._emit(_unstuffed(buf[: end + 2], first))
            self._carry = b""
            return end + 5 - base
        # Hold back what may begin a terminator or a CRLF "." still to come.
        keep = max(0, len(buf) - 4)
        if keep >= 2 and buf[keep - 2 : keep] == b"\r\n":
            keep -= 2
        elif keep >= 1 and buf[keep - 1 : keep] == b"\r":
            keep -= 1
        self._emit(_unstuffed(buf[:keep], first))
        self._carry = buf[keep:]
        return None

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
