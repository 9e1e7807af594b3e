"""
What dkimpy reads of a message, in time linear in its size, for the checks
of L{mailingest.verification.dkim_check}.

dkimpy's own steps cost a sender's crafted message far more than the intake
spent taking it: C{dkim.rfc822_parse} splits the whole message into lines
(a 10 MiB body of short lines: 0.4 s and a list of millions) and grows a
folded field by concatenation (one field folded over 256 KiB: 0.3 s);
C{dkim.select_headers} walks the header list once for each name of a
signature's C{h=} (10,000 absent names over 45,000 fields: tens of seconds);
and every signature canonicalizes the body again with regular expressions
and a Python loop over its trailing empty lines. Those seconds were spent in
the sender check process that every organisation's mail shares.

So: L{read_fields} gives dkimpy's C{(headers, body)} exactly as
C{rfc822_parse} would (tests compare the two on random sections), with
C{bytes} methods and one regular expression, and refuses a header section of
more than L{MAX_FIELDS} fields (every signature canonicalizes all of them);
L{install} puts in dkimpy's module the same header selection, b= removal
and body canonicalization with a cost linear in their input, the body's
reused by a message's later signatures of the same canonicalization; and
L{long_run} finds the signature fields whose tags dkimpy's own patterns would
take quadratic time over, which are not given to it.
"""

import re
import threading

import dkim
import dkim.canonicalization

# A real message has tens of fields; a long ARC chain and every list's
# headers a few hundred. dkimpy canonicalizes all of them for each signature.
MAX_FIELDS = 1000

# A field as dkimpy reads one, on lines ended by LF alone (CRLFs made LFs
# first): a name up to the first colon, the rest of its line, continuations.
_FIELD = re.compile(rb"([\x21-\x7e]+?):([^\n]*\n(?:[ \t][^\n]*\n)*)")
# dkimpy skips an mbox "From " line wherever it is.
_MBOX_FROM = re.compile(rb"^From [^\n]*\n", re.MULTILINE)
_BLANK_LINE = re.compile(rb"\n\r?\n")
_TRAILING_WHITESPACE = re.compile(rb"(?<![\t ])[\t ]++\r\n")
# dkimpy's pattern for a signature's b= value (RE_BTAG, kept by the b= removed
# before the field is hashed): its folding whitespace, (?:(?:\s*\r?\n)?\s+)?,
# matches just what \s* matches, in many ways each, and a long run of it
# before a ";" took dkimpy's quadratic time. The same match, with none.
B_TAG = re.compile(rb"([;\s]b\s*+=)(?:\s*+[a-zA-Z0-9+/=])*+(?:\r?\n\Z)?")
# A signature field's run of whitespace and "=" longer than any signer
# writes (folding and base64 padding take a few): dkimpy's checks of its tags
# (b=, bh=, h=) take time quadratic in such a run's length.
MAX_RUN = 64
_LONG_RUN = re.compile(rb"(?<![\s=])[\s=]{%d}" % (MAX_RUN + 1))


# dkimpy's own steps, which L{install} replaces: the tests compare each
# replacement with them, and compress_whitespace's slow path is dkimpy's.
DKIMPY = {
    "rfc822_parse": dkim.rfc822_parse,
    "select_headers": dkim.select_headers,
    "strip_trailing_lines": dkim.canonicalization.strip_trailing_lines,
    "strip_trailing_whitespace": dkim.canonicalization.strip_trailing_whitespace,
    "compress_whitespace": dkim.canonicalization.compress_whitespace,
    "canonicalize_body": dkim.canonicalization.CanonicalizationPolicy.canonicalize_body,
    "RE_BTAG": dkim.RE_BTAG,
}


class UnreadableHeader(Exception):
    """The header section is not one dkimpy can read, or has too many fields to check."""


def _crlf(text: bytes) -> bytes:
    """Every line end (CRLF or LF alone) made CRLF, as dkimpy joins the lines it split."""
    if text.count(b"\n") == text.count(b"\r\n"):
        return text
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def header_end(message: bytes) -> tuple[int, int] | None:
    """
    Where dkimpy's header section ends: the end of its last field's line,
    and the start of the body after the empty line; None when no line is
    empty (lines end in CRLF or LF alone).
    """
    if message.startswith((b"\n", b"\r\n")):
        return 0, message.index(b"\n") + 1
    blank = _BLANK_LINE.search(message)
    return None if blank is None else (blank.start() + 1, blank.end())


def read_fields(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """
    C{dkim.rfc822_parse(message)}: the header fields as C{[name, value]}
    (the value with its line ends, each CRLF), and the body after the
    empty line, its line ends CRLF. L{UnreadableHeader} where dkimpy raises
    or where there are more than L{MAX_FIELDS} fields.
    """
    if not message:
        return [], b""
    ends = header_end(message)
    if ends is None:
        section, body = message.replace(b"\r\n", b"\n"), b""  # every line a field's, the body empty
        if not section.endswith(b"\n"):
            section += b"\n"  # the last line ends where the message does (a CR before is the line's)
    else:
        section, body = message[: ends[0]].replace(b"\r\n", b"\n"), _crlf(message[ends[1] :])
    if b"From " in section:
        section = _MBOX_FROM.sub(b"", section)
    fields = section.count(b"\n") - section.count(b"\n ") - section.count(b"\n\t") - (section[:1] in (b" ", b"\t"))
    if fields > MAX_FIELDS:
        raise UnreadableHeader(f"message header cannot be read: {fields:,} fields (at most {MAX_FIELDS:,} are read)")
    headers = []
    end = 0
    # Each field matched where the last ended: a search would try every
    # position of a long line without a colon again (quadratic).
    while end < len(section) and (match := _FIELD.match(section, end)):
        headers.append([match.group(1), match.group(2).replace(b"\n", b"\r\n")])
        end = match.end()
    if end != len(section):
        line = section[end : section.find(b"\n", end)]
        raise UnreadableHeader(f"message header cannot be read: not a field: {line[:60]!r}")
    return headers, body


def long_run(value: bytes) -> str | None:
    """Why dkimpy must not be given this signature field (a run of whitespace and "=" past L{MAX_RUN}), or None."""
    if _LONG_RUN.search(value) is None:
        return None
    return f"a run of more than {MAX_RUN} spaces, line ends or '=' in the field"


def select_headers(headers: list, include_headers: list) -> list:
    """
    C{dkim.select_headers}: for each name of C{h=} in turn, the lowest of
    that name's fields not yet taken, counted from the bottom.
    """
    left: dict[bytes, list] = {}
    for field in headers:
        left.setdefault(field[0].lower(), []).append(field)
    selected = []
    for name in include_headers:
        fields = left.get(name)
        if fields:
            selected.append(fields.pop())
    return selected


def strip_trailing_lines(content: bytes) -> bytes:
    """C{dkim.canonicalization.strip_trailing_lines}: the body's trailing CRLFs but one removed (one added when none)."""
    kept = len(content.rstrip(b"\r\n"))
    tail = content[kept:]
    pairs = len(re.match(rb"(?:\n\r)*", tail[::-1]).group()) // 2
    if not pairs:
        return content + b"\r\n"
    return content[: len(content) - 2 * pairs + 2]


def strip_trailing_whitespace(content: bytes) -> bytes:
    """
    C{dkim.canonicalization.strip_trailing_whitespace}: spaces and tabs
    before a CRLF removed. dkimpy's pattern tries each position of a run of
    them not followed by CRLF again (a 40,000-space run: 2 s); this one
    starts only at a run's first byte and never gives back.
    """
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WHITESPACE.sub(b"\r\n", content)


def compress_whitespace(content: bytes) -> bytes:
    """C{dkim.canonicalization.compress_whitespace}, at once when there is no tab and no two spaces (base64, most text)."""
    if b"\t" not in content and b"  " not in content:
        return content
    return DKIMPY["compress_whitespace"](content)


class _BodyMemo(threading.local):
    """Per check thread: the last body canonicalized, by algorithm, for the next signature of the same message."""

    body: bytes | None = None
    done: dict | None = None


_memo = _BodyMemo()


def _canonicalize_body(policy, body: bytes) -> bytes:
    if _memo.body is not body:
        _memo.body, _memo.done = body, {}
    algorithm = policy.body_algorithm
    if algorithm not in _memo.done:
        _memo.done[algorithm] = algorithm.canonicalize_body(body)
    return _memo.done[algorithm]


def forget_body() -> None:
    """Let go of the last body this thread canonicalized (a message's checks are over)."""
    _memo.body = _memo.done = None


def install() -> None:
    """Put this module's linear steps in dkimpy's place (idempotent)."""
    dkim.select_headers = select_headers
    dkim.RE_BTAG = B_TAG
    dkim.canonicalization.strip_trailing_lines = strip_trailing_lines
    dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
    dkim.canonicalization.compress_whitespace = compress_whitespace
    dkim.canonicalization.CanonicalizationPolicy.canonicalize_body = _canonicalize_body
