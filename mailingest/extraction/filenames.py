"""
Attachment filenames: decoding what senders put in headers, and making it safe.

Decoding (L{decode_filename}) takes the C{filename} parameter of
Content-Disposition, else the C{name} parameter of Content-Type, else the old
C{file} parameter of either (L{described_filename} reads Content-Description,
the last resort for naming a part, never a reason to make it a document), and handles
RFC 2231 (C{filename*=}, continuations C{filename*0*=}, any charset), RFC 2047
encoded words (also inside a quoted string, which many clients send although
the RFC forbids it) and raw 8-bit bytes (RFC 6532 UTF-8, or a legacy charset).

Only the first 8 KiB of a header are read (a name is at most 255 bytes once
sanitised), and the parameter and RFC 2047 parsing take linear time: the
stdlib's compat32 parameter splitter and C{email.header.decode_header} are
quadratic (a crafted C{filename} of 120 KB kept a worker busy for 13 s), so
this module does the same work in one pass, with the same results.

It works on the raw header text rather than through C{policy.default}'s header
parser, because that parser cuts an unquoted name at its first space
(C{filename=This is a test.txt} gives C{This}) and replaces undecodable bytes
with U+FFFD before another charset can be tried. Bytes that are not valid in
their declared charset are decoded in it with U+FFFD for the invalid ones,
reported as L{BYTES_REPLACED} (the caller keeps the raw header then). Bytes
whose charset is unknown, or that carry none, are tried as UTF-8, then
windows-1252, then latin-1, which cannot fail; anything but a clean decode is
reported as C{"undecodable charset in filename"}.

Sanitising (L{sanitise_filename}) makes a name safe to show and to save: NFC,
only the last path component (C{../../etc/passwd} gives C{passwd},
C{C:\\Users\\me\\order.pdf} gives C{order.pdf}, as browsers do for uploads), no
control characters nor invisible format ones such as bidirectional overrides
(ZWJ and ZWNJ excepted), whitespace collapsed, no leading
dots (C{.htaccess} gives C{htaccess}), no trailing dots or spaces, at most 255
UTF-8 bytes with the extension kept. The result is metadata only: files are
always stored under generated names.
"""

from __future__ import annotations

import mimetypes
import unicodedata
from email import utils
from email.errors import HeaderParseError
from email.message import Message

from mailingest.encoded_words import decode_header

MAX_FILENAME_BYTES = 255
MAX_HEADER_CHARS = 8192

# Longest suffix still treated as an extension worth keeping when truncating.
_MAX_EXTENSION_CHARS = 16

# Format characters (Unicode category Cf) are invisible and can disguise a name:
# "invoice\u202efdp.exe" shows as "invoiceexe.pdf". These two are needed to
# write some scripts (Persian, Indic) and emoji, so they stay.
_KEPT_FORMAT_CHARACTERS = frozenset("\u200c\u200d")

_EXTENSIONS = {
    "application/pdf": ".pdf",
    "text/csv": ".csv",
    "application/octet-stream": ".bin",
    "text/plain": ".txt",
    "text/calendar": ".ics",
    "image/jpg": ".jpg",
    "application/xml": ".xml",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "application/ms-tnef": ".dat",
    "application/vnd.ms-tnef": ".dat",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ".pptx",
}

BYTES_REPLACED = "filename bytes invalid in their charset, replaced"
_NAME_PARAMETERS = (
    ("content-disposition", "filename"),
    ("content-type", "name"),
    ("content-disposition", "file"),
    ("content-type", "file"),
)

# Python's built-in table only: the host's /etc/mime.types would make the
# generated names differ from one machine to another.
_BUILTIN_TYPES = mimetypes.MimeTypes()


def decode_filename(part: Message, warnings: list[str] | None = None) -> str | None:
    """
    The name the sender gave C{part}, decoded but not sanitised; None if it has none.

    C{part} comes from a parsed message. Problems that still allowed a name
    (an unknown charset, a garbled parameter) are appended to C{warnings}.
    """
    problems: list[str] = []
    for header, param in _NAME_PARAMETERS:
        raw = raw_header(part, header)
        if raw is None:
            continue
        value = _parameter(raw, header, param, problems)
        if value is not None and value.strip():
            break
    else:
        value = None
    if warnings is not None:
        warnings.extend(dict.fromkeys(problems))
    return value


def described_filename(part: Message, warnings: list[str]) -> str | None:
    """The Content-Description of C{part}, decoded, as a name for a part that has no other."""
    raw = raw_header(part, "content-description")
    if raw is None or not raw.strip():
        return None
    text = raw.encode("utf-8", "surrogateescape").decode("latin-1")
    return _decode_encoded_words(text, warnings).strip() or None


def sanitise_filename(name: str, fallback: str = "attachment") -> str:
    """C{name} made safe to display and save; C{fallback} if nothing usable is left."""
    name = unicodedata.normalize("NFC", "".join(_clean_character(c) for c in name))
    components = [c.strip() for c in name.replace("\\", "/").split("/")]
    meaningful = [c for c in components if c.strip(". ")]
    name = " ".join(meaningful[-1].split()) if meaningful else ""
    name = name.lstrip(". ").rstrip(". ")
    name = _truncate(name)
    return name or fallback


def fallback_filename(index: int, content_type: str) -> str:
    """The name for an attachment that came without one, e.g. C{attachment-2.pdf}."""
    content_type = content_type.lower()
    extension = _EXTENSIONS.get(content_type) or _BUILTIN_TYPES.guess_extension(content_type) or ".bin"
    return f"attachment-{index}{extension}"


def raw_header(part: Message, name: str) -> str | None:
    """The first C{name} header as received, unfolded, cut at MAX_HEADER_CHARS."""
    for key, value in part.raw_items():
        if key.lower() == name:
            return str(value)[: MAX_HEADER_CHARS * 2].replace("\r", "").replace("\n", "")[:MAX_HEADER_CHARS]
    return None


def _parameter(raw: str, header: str, param: str, problems: list[str]) -> str | None:
    """Parameter C{param} of header value C{raw}, decoded."""
    if len(raw) >= MAX_HEADER_CHARS:
        problems.append(f"{header} header longer than {MAX_HEADER_CHARS} characters, the rest ignored")
    # Every byte becomes one character (8-bit bytes arrive as surrogate escapes),
    # so the stdlib's compat32 parameter parser cannot lose any of them.
    text = raw.encode("utf-8", "surrogateescape").decode("latin-1")
    try:
        value = header_parameter(text, param)
    except (TypeError, ValueError, LookupError, IndexError):
        # e.g. "filename*=" mixed with "filename*0=" makes the stdlib compare None with int.
        problems.append("unreadable filename parameter")
        return None
    if value is None:
        return None
    if isinstance(value, tuple):
        charset, _language, text = value
        return _decode_bytes(text.encode("latin-1"), charset, problems)
    return _decode_encoded_words(value, problems)


def header_parameter(value: str, param: str, unquote: bool = True) -> str | tuple | None:
    """
    What compat32 C{Message.get_param(param, None, header, unquote)} returns
    for a header C{value}, in linear time (C{param} in lower case).
    """
    params = []
    for item in _split_parameters(value):
        name, equals, text = item.partition("=")
        params.append((name.strip(), text.strip()) if equals else (item.strip(), ""))
    for name, text in utils.decode_params(params):
        if name.lower() == param:
            if not unquote:
                return text
            if isinstance(text, tuple):
                return text[0], text[1], utils.unquote(text[2])
            return utils.unquote(text)
    return None


def _split_parameters(value: str) -> list[str]:
    """
    C{email.message._parseparam} in one pass: a C{;} inside a quoted string
    does not split. The stdlib counts the quotes from the start of the
    parameter again at every C{;}; here the count is carried along.
    """
    items = []
    length = len(value)
    start = 0
    while True:
        end = value.find(";", start)
        counted, quotes = start, 0
        while end > start:
            quotes += value.count('"', counted, end) - value.count('\\"', counted, end)
            if quotes % 2 == 0:
                break
            counted, end = end, value.find(";", end + 1)
        if end < 0:
            end = length
        item = value[start:end]
        name, equals, text = item.partition("=")
        if equals:
            item = name.strip().lower() + "=" + text.strip()
        items.append(item.strip())
        if end >= length:
            return items
        start = end + 1


def _decode_encoded_words(value: str, problems: list[str]) -> str:
    """RFC 2047 words wherever they are; text around them is raw bytes."""
    try:
        chunks = decode_header(value) if "=?" in value else [(value, None)]
    except (HeaderParseError, ValueError):
        chunks = [(value, None)]
    decoded = []
    for chunk, charset in chunks:
        data = chunk if isinstance(chunk, bytes) else chunk.encode("latin-1")
        decoded.append(_decode_bytes(data, charset and charset.partition("*")[0], problems))
    return "".join(decoded)


def _decode_bytes(data: bytes, charset: str | None, problems: list[str]) -> str:
    """C{data} in C{charset} if it is one and fits, else UTF-8, else windows-1252 / latin-1."""
    if charset:
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            problems.append(BYTES_REPLACED)
            return data.decode(charset, "replace")
        except (LookupError, ValueError):
            problems.append("undecodable charset in filename")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if not charset:
            problems.append("undecodable charset in filename")
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean_character(c: str) -> str:
    """Whitespace of any kind becomes a space; control, format and lone surrogate characters go."""
    if c.isspace():
        return " "
    category = unicodedata.category(c)
    if category in ("Cc", "Cs") or (category == "Cf" and c not in _KEPT_FORMAT_CHARACTERS):
        return ""
    return c


def _truncate(name: str) -> str:
    """At most MAX_FILENAME_BYTES of UTF-8, cutting the stem so the extension survives."""
    if len(name.encode("utf-8")) <= MAX_FILENAME_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > _MAX_EXTENSION_CHARS:
        stem, extension = name, ""
    else:
        extension = "." + extension
    room = MAX_FILENAME_BYTES - len(extension.encode("utf-8"))
    # The stem cannot become empty: the name does not start with a dot or space.
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(". ")
    return stem + extension
