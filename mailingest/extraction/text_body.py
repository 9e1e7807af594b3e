"""
Which messages the parser workers need not see: a message that is one text
body (plain or HTML) has no document by the rules of
L{mailingest.extraction.attachments} (a text body without a name or an
C{attachment} disposition is not one), and its parse gives nothing but the
warning "no attachments". Telling so from the header section alone saves the
round trip to a worker for most small mail.

The test is strict, so that it never says "no documents" of a message the
parser would find one in, or a defect the parser would warn of: every line of
the header section is a well-formed field or the continuation of one, the
section ends within L{HEADER_LIMIT} bytes, there is at most one
C{Content-Type}, and it is absent, C{text/plain} or C{text/html}, without a
C{name}; there is no C{Content-Disposition} at all. Anything else goes to a
worker as before.
"""

import re

# The header section is read up to here; a longer one goes to a worker.
HEADER_LIMIT = 8192
# The result the parser gives for such a message.
WARNINGS = ["no attachments"]

_FIELD = re.compile(rb"[!-9;-~]+:")
_TEXT = re.compile(rb"[ \t]*text/(plain|html)[ \t]*(;.*)?", re.IGNORECASE | re.DOTALL)


def needs_no_parser(path: str) -> bool:
    """
    Whether the message in the file at C{path} is one text body (a
    blocking read of its first L{HEADER_LIMIT} bytes: call it in a thread).
    False when it cannot be read: the worker says why.
    """
    try:
        with open(path, "rb") as raw:
            start = raw.read(HEADER_LIMIT)
    except OSError:
        return False
    return one_text_body(start)


def one_text_body(start: bytes) -> bool:
    """
    Whether the message that begins with C{start} (its first L{HEADER_LIMIT}
    bytes) is a single text body by the strict test above.
    """
    end = start.find(b"\r\n\r\n")
    bare = start.find(b"\n\n")
    if end <= 0 or 0 <= bare < end:
        return False  # no complete CRLF header section within the limit (bare LF ends: the parser's business)
    content_types = []
    in_content_type = False
    for number, line in enumerate(start[:end].split(b"\r\n")):
        if line[:1] in (b" ", b"\t"):
            if number == 0:
                return False
            if in_content_type:
                content_types[-1] += line
            continue
        if not _FIELD.match(line):
            return False
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-disposition":
            return False
        in_content_type = name == b"content-type"
        if in_content_type:
            content_types.append(value)
    if not content_types:
        return True
    if len(content_types) > 1:
        return False
    (value,) = content_types
    return _TEXT.fullmatch(value) is not None and b"name" not in value.lower()
