"""
Parsing a message's MIME structure within a budget of parts, and repairing
the multiparts a damaged boundary broke.

Parsing uses the email package's feed parser, fed 1 MiB at a time (the
BytesParser would turn CRLF into LF inside binary parts), with
C{policy.compat32}: its headers are plain strings, so reading one cannot raise,
while C{policy.default} runs each header through a parser that has had crash
and hang bugs on hostile input, and the parser reads Content-Type while
parsing, where an exception loses the whole message.

Memory: the parsed message holds each part's encoded text (about the size of
the file), and the parser holds few lines whatever their shape (L{LineRuns}: a
part sent one character per line is not 60 bytes a line). Recovering the parts
after an early close is one pass over the epilogue, each part parsed once, so
time and memory stay linear in the number of parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from email.errors import MultipartInvariantViolationDefect
from email.feedparser import BufferedSubFile, BytesFeedParser, FeedParser, headerRE
from email.message import Message
from email.policy import Policy, compat32

from mailingest.extraction.filenames import header_parameter

READ_CHUNK_BYTES = 1 << 20
PUSH_CHARS = 1 << 16

# A delimiter line followed by a MIME header: "--boundary\r\nContent-Type: ...".
_DELIMITER_LINE = re.compile(r"^--(\S[^\r\n]{0,69}?)[ \t]*\r?\n(?i:content-)", re.MULTILINE)
_PART_LIMIT_WARNING = "more than {} MIME parts, the rest skipped"


class UnparseableMessage(Exception):
    """A permanent failure: retrying cannot help (str(e) is stored as the reason)."""


class _PartLimitReached(Exception):
    pass


class Budget:
    """
    What the sender may make the parse create: C{max_parts} MIME entities in
    all (parsed or taken out of a TNEF file), C{max_depth} levels of forwarded
    messages, so that a million tiny parts cannot exhaust memory.
    """

    def __init__(self, max_parts: int, max_depth: int):
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.parts_left = max_parts

    def take_part(self) -> None:
        """Count one more entity; raises L{_PartLimitReached} once none is left."""
        if self.parts_left <= 0:
            raise _PartLimitReached()
        self.parts_left -= 1

    def spend(self, parts: int) -> None:
        self.parts_left -= parts

    def exhausted(self) -> bool:
        return self.parts_left <= 0

    def limit_warning(self) -> str:
        return _PART_LIMIT_WARNING.format(self.max_parts)


class MimeParser:
    """Parses one message and the parts recovered from it, all within one L{Budget}."""

    def __init__(self, budget: Budget, warn: Callable[[str], None]):
        self.budget = budget
        self._warn = warn

    def parse_file(self, path: str) -> Message:
        with open(path, "rb") as raw:
            return self.parse(iter(lambda: raw.read(READ_CHUNK_BYTES), b""), LineRunBytesFeedParser)

    def parse(self, chunks: Iterable, parser_class: type[FeedParser]) -> Message:
        """Parse within the part budget, keeping what was parsed when it ran out."""
        first: list[Message] = []

        def new_part(policy: Policy) -> Part:
            self.budget.take_part()
            part = Part(policy)
            if not first:
                first.append(part)
            return part

        parser = parser_class(policy=compat32.clone(message_factory=new_part))
        try:
            for chunk in chunks:
                parser.feed(chunk)
            return parser.close()
        except _PartLimitReached:
            self._warn(self.budget.limit_warning())
        except RecursionError:
            self._warn("MIME parts nested too deeply, the rest skipped")
        except (OSError, MemoryError):
            raise
        except Exception as e:
            raise UnparseableMessage(f"the MIME structure cannot be parsed ({type(e).__name__}: {e})") from e
        return first[0] if first else Part()

    def children(self, part: Message) -> tuple[list[Message], int]:
        """
        The parts of a multipart, with those that a damaged boundary hid from
        the parser, and how many of them were so recovered.
        """
        parsed = len(part.get_payload()) if part.is_multipart() else 0
        if not part.is_multipart():
            # The boundary is missing or never occurs, so the body was kept as text.
            match = _DELIMITER_LINE.search(encoded_body(part))
            if match:
                part = self._reparse(encoded_body(part), match.group(1))
        if not part.is_multipart():
            return [], 0
        children = [child for child in part.get_payload() if isinstance(child, Message)]
        boundary = part.get_boundary()
        if boundary and part.epilogue:
            children += self._parts_after_close(part.epilogue, boundary)
        return children, len(children) - parsed

    def _parts_after_close(self, epilogue: str, boundary: str) -> list[Message]:
        """
        The parts left in the epilogue when a nested multipart that reused
        C{boundary} closed this one early, delimited as the feed parser
        delimits parts: a part starts after a C{--boundary} line (and any
        delimiter lines right after it), ends at the next delimiter line, and
        after a C{--boundary--} line text is skipped up to the next
        C{--boundary}. One pass over the epilogue, each part parsed once: the
        epilogue can hold a thousand such parts.
        """
        delimiters = re.compile(rf"^--{re.escape(boundary)}(--)?[ \t]*\r?(?:\n|\Z)", re.MULTILINE)
        parts: list[Message] = []
        start = None  # where the current part begins; None between parts
        for delimiter in delimiters.finditer(epilogue):
            closing = delimiter.group(1) is not None
            if start is not None and delimiter.start() > start:
                if not self._add_part(parts, epilogue, start, delimiter.start()):
                    return parts
                start = None if closing else delimiter.end()
            elif start is None and closing:
                break  # a close with no part since the last one: the parser stops there too
            else:
                start = delimiter.end()
        if start is not None:
            self._add_part(parts, epilogue, start, len(epilogue))
        return parts

    def _add_part(self, parts: list[Message], text: str, start: int, end: int) -> bool:
        """Parse C{text[start:end]} as one part onto C{parts}; False once the part budget is spent."""
        if self.budget.exhausted():
            self._warn(self.budget.limit_warning())
            return False
        # The line break before a delimiter belongs to the delimiter (RFC 2046).
        if text.startswith("\r\n", max(start, end - 2), end):
            end -= 2
        elif end > start and text[end - 1] in "\r\n":
            end -= 1
        part = self.parse([text[start:end]], LineRunFeedParser)
        # The parser gives this defect to a top-level message only, and this was a part.
        part.defects[:] = [d for d in part.defects if not isinstance(d, MultipartInvariantViolationDefect)]
        parts.append(part)
        return True

    def _reparse(self, body: str, boundary: str) -> Message:
        """C{body} parsed as the body of a multipart with C{boundary}."""
        if '"' in boundary or "\\" in boundary:
            return Part()
        header = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        return self.parse([header, body], LineRunFeedParser)


class LineRuns(BufferedSubFile):
    """
    The parser's input, with runs of lines handed over as one line where that
    cannot change the parse. The parser keeps a part's body as a list of its
    lines until the part ends, some 60 bytes per line: 20 times the part when
    base64 comes one character per line. It looks into a line only to find a
    header (C{headerRE}), a blank line (end of headers, of a report block) or a
    boundary (C{--...}); a body is its lines joined. So a run starts at a line
    that is none of these, which ends any header section it falls in, and goes
    on over lines that are neither blank nor start with C{-}: the parse is the
    same, holding a few strings per MiB whatever the line shape.
    """

    def push(self, data: str) -> None:
        # The stdlib splits what it is given into lines at once: 64 KiB at a time, they stay few.
        for start in range(0, len(data), PUSH_CHARS):
            super().push(data[start : start + PUSH_CHARS])

    def pushlines(self, lines: list[str]) -> None:
        bundled: list[str] = []
        run: list[str] = []
        for line in lines:
            if line[0] in "-\r\n":
                if run:
                    bundled.append("".join(run))
                    run = []
                bundled.append(line)
            elif run or not headerRE.match(line):
                run.append(line)
            else:
                bundled.append(line)
        if run:
            bundled.append("".join(run))
        super().pushlines(bundled)


class LineRunFeedParser(FeedParser):
    """The feed parser reading through L{LineRuns}."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._input = LineRuns()


class LineRunBytesFeedParser(BytesFeedParser, LineRunFeedParser):
    pass


class Part(Message):
    """A parsed part whose encoded body can be read as received, and whose parameters can always be read."""

    def get_param(self, param, failobj=None, header="content-type", unquote=True):
        """
        A parameter the email package cannot read counts as absent: it raises
        TypeError when one parameter has both numbered and unnumbered RFC 2231
        sections, and that would stop the parse of the whole message. Read in
        linear time: the stdlib's is quadratic in the semicolons inside quotes.
        """
        value = self.get(header)
        if value is None:
            return failobj
        try:
            found = header_parameter(str(value), param.lower(), unquote)
        except (TypeError, ValueError, LookupError, IndexError):
            return failobj
        return failobj if found is None else found

    def encoded_body(self) -> str:
        """
        The body, 8-bit bytes as surrogate escapes. get_payload() would turn
        those into U+FFFD through the part's charset, and the parser trims the
        body through C{_payload}, so that is what is read here.
        """
        return self._payload if isinstance(self._payload, str) else ""


def encoded_body(part: Message) -> str:
    """The encoded body of a leaf, 8-bit bytes as surrogate escapes."""
    return part.encoded_body() if isinstance(part, Part) else ""
