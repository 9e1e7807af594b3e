"""
Finding the file attachments of a raw MIME message and writing each one to disk.

L{extract_attachments} runs in a parser worker process (L{mailingest.extraction.worker}),
once per message. It writes the
decoded bytes of each document to C{out_dir} as C{0.bin}, C{1.bin}, ... (names
from their position only) and returns them in message order with their decoded
and sanitised filenames (L{mailingest.extraction.filenames}). Its output depends on the
input alone, so extraction can be re-run after a crash.

What is a document (every file a mail client would show as an attachment):
  - a leaf part with C{Content-Disposition: attachment}, or with a filename, or
    of a non-text type, images included (an iPhone's C{inline;
    filename=IMG_0412.jpeg}), except the images an HTML body shows: those it
    references by C{cid:} or C{Content-Location} (signature logos), and those
    with a C{Content-ID} inside C{multipart/related} and no C{attachment}
    disposition (C{inline_images="keep"} keeps both). Shown images are found
    once the whole message is walked, so they are written and then dropped.
    The text and HTML bodies are not documents; a C{text/csv} is when it has a
    name or is an attachment.
  - C{application/ms-tnef} (or any part named winmail.dat): each file inside it
    (L{mailingest.extraction.tnef}); the TNEF part itself only when none could
    be taken out.
  - the signature of C{multipart/signed} is not; encrypted data
    (C{multipart/encrypted}, S/MIME C{pkcs7-mime}) is one document, with a warning.
  - Disposition values other than C{attachment} and C{inline} are treated as
    absent: in practice they are damage, and would turn bodies into documents.
  - C{multipart/*} containers are walked. C{message/rfc822} and
    C{message/global} parts (forwarded mail, attached or inline) are walked as
    messages of their own, up to C{max_depth} levels of nesting: the files inside
    them become documents, and the C{.eml} itself too when it is named or an
    attachment (as the email package writes it back). Beyond C{max_depth}: a
    warning, and nothing inside is extracted. A forwarded part that holds no
    message (not one header, even after undoing a base64 or quoted-printable
    transfer encoding, which some clients wrongly apply) is kept as a C{.eml}
    document. Other C{message/*} types (delivery and read reports,
    C{message/partial}, C{message/external-body}) are documents only when named
    or an attachment (an attached C{DSN57BAC498.txt}).
  - Content types are read with the email package's header registry (bounded
    to the 8 KiB L{raw_header} gives) and stored as C{type/subtype}; one that
    cannot be read is C{application/octet-stream}, the raw value kept.

Warnings name parts by IMAP section number (C{part 2.1}), so an operator can
find them; generated names count documents from 1 (C{attachment-1.pdf}).

Malformed MIME is parsed as far as possible and each part's defects are
reported as warnings. Two common breakages are repaired: a multipart whose
boundary is missing or never occurs although its body has parts delimited by
another (the boundary of the first C{--x} line followed by a C{Content-} header
is used), and parts left after the closing boundary because a nested multipart
reused its parent's boundary. A Content-Type parameter that cannot be read
counts as absent. Transfer encodings: base64, quoted-printable, x-uuencode and
the identity ones, with common misspellings (C{quoted printable}, C{7-bit},
C{base64;}); a document in any other is stored undecoded, as RFC 2045 section
6.4 says, with a warning.

A document part that cannot be decoded is skipped: its reason is in
C{skipped} and in the warnings, and the other parts are still extracted.
L{UnparseableMessage} (the message is marked failed at once) is raised only
when a retry can never help and nothing of the message can be read:
  - every document part was skipped, each because its base64 body cannot be
    decoded at all: once the characters
    outside the base64 alphabet are dropped (RFC 2045 says to ignore them),
    4n+1 remain, which no padding can complete. This is where the email package
    gives up (C{InvalidBase64LengthDefect}) and hands back the encoded text.
    Missing padding and stray characters are repaired as the email package
    repairs them, with a warning. Likewise a uuencoded body without a
    C{begin} line, or with a line that is not uuencoding;
  - the email parser itself raises on the input.
An empty file, or one without headers (an Outlook C{.msg} sent raw, say), is a
message without attachments. Other exceptions (C{OSError} writing C{out_dir})
are left to the caller to retry.

C{max_parts} bounds every MIME entity the parser creates (the message itself,
containers, leaves, forwarded messages): parsing stops there with a warning, so
a message of a million tiny parts cannot exhaust memory.

Parsing uses the email package's feed parser, fed 1 MiB at a time (the
BytesParser would turn CRLF into LF inside binary parts), with
C{policy.compat32}: its headers are plain strings, so reading one cannot raise,
while C{policy.default} runs each header through a parser that has had crash
and hang bugs on hostile input, and the parser reads Content-Type while
parsing, where an exception loses the whole message.

Memory: the parsed message holds each part's encoded text (about the size of
the file), and the parser holds few lines whatever their shape (L{_Lines}: a
part sent one character per line is not 60 bytes a line). Base64 is decoded 1 MiB at a time straight into the file and its
digest, so no second copy of a large attachment is made. Recovering the parts
after an early close is one pass over the epilogue, each part parsed once, so
time and memory stay linear in the number of parts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import quopri
import re
from collections.abc import Iterable
import urllib.parse
from dataclasses import field
from email.errors import MultipartInvariantViolationDefect
from email.feedparser import BufferedSubFile, BytesFeedParser, FeedParser, headerRE
from email.generator import BytesGenerator
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.policy import Policy, compat32
from io import BytesIO

from mailingest.extraction.filenames import (
    BYTES_REPLACED,
    decode_filename,
    described_filename,
    fallback_filename,
    header_parameter,
    raw_header,
    sanitise_filename,
)
from mailingest.extraction.tnef import NotTnef, tnef_files

READ_CHUNK_BYTES = 1 << 20
DECODE_CHUNK_CHARS = 1 << 20
PUSH_CHARS = 1 << 16

_FORWARDED_TYPES = frozenset({"message/rfc822", "message/global"})
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "8bits", "binary"})
_UUENCODE_NAMES = frozenset({"xuuencode", "uuencode", "xuue", "uue"})
_BASE64_IGNORED = b"\r\n\t "
# A delimiter line followed by a MIME header: "--boundary\r\nContent-Type: ...".
_DELIMITER_LINE = re.compile(r"^--(\S[^\r\n]{0,69}?)[ \t]*\r?\n(?i:content-)", re.MULTILINE)
_PART_LIMIT_WARNING = "more than {} MIME parts, the rest skipped"
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_SIGNATURE_TYPES = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature", "application/pgp-signature"})
_SMIME_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
_CONTENT_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
# What an HTML body shows from the message: src="cid:logo@x", also url(cid:...).
_CID_REFERENCE = re.compile(r"cid:([^\s\"'<>()]+)", re.IGNORECASE)
# HTML bodies are searched for references in their first 4 MiB.
HTML_SCAN_BYTES = 4 << 20
_HEADER_REGISTRY = HeaderRegistry()


@dataclasses.dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    sha256: str
    path: str
    # The name as the sender wrote it, decoded (the raw header when its bytes did not fit its charset).
    original_filename: str | None = None
    disposition: str | None = None
    content_id: str | None = None
    # The Content-Type header as received, when it says more than content_type.
    content_type_raw: str | None = None


@dataclasses.dataclass(frozen=True)
class ExtractionResult:
    attachments: list[Attachment]
    warnings: list[str]
    # The parts that could not be read, each named with its reason (also in warnings).
    skipped: list[str] = field(default_factory=list)


class UnparseableMessage(Exception):
    """A permanent failure: retrying cannot help (str(e) is stored as the reason)."""


class _PartLimitReached(Exception):
    pass


class _Undecodable(Exception):
    pass


def extract_attachments(
    raw_path: str, out_dir: str, *, max_depth: int = 5, max_parts: int = 1000, inline_images: str = "skip"
) -> ExtractionResult:
    """
    Write the documents of the message in C{raw_path} to the empty C{out_dir}.
    C{inline_images="keep"} also keeps the images the HTML body shows.
    """
    walk = _AttachmentWalk(out_dir, max_depth, max_parts, keep_inline_images=inline_images == "keep")
    walk.walk(walk.parse_file(raw_path))
    if not walk.keep_inline_images:
        walk.drop_shown_images()
    if walk.skipped and not walk.attachments:
        raise UnparseableMessage("; ".join(walk.skipped))
    if not walk.attachments:
        walk.warn("no attachments")
    return ExtractionResult(walk.attachments, walk.warnings, walk.skipped)


class _AttachmentWalk:
    """The walk of one message's parts: budget left, documents and warnings so far."""

    def __init__(self, out_dir: str, max_depth: int, max_parts: int, keep_inline_images: bool = False):
        self.out_dir = out_dir
        self.keep_inline_images = keep_inline_images
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.parts_left = max_parts
        self.attachments: list[Attachment] = []
        self.warnings: list[str] = []
        self.skipped: list[str] = []
        # What the HTML bodies show: Content-IDs (from cid: URLs) and the text to find Content-Locations in.
        self.shown_ids: set[str] = set()
        self.html: list[str] = []
        # Images the HTML bodies may show, by their index in attachments: (Content-ID, Content-Location).
        self.images: dict[int, tuple[str | None, str | None]] = {}

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def parse_file(self, path: str) -> Message:
        with open(path, "rb") as raw:
            return self.parse(iter(lambda: raw.read(READ_CHUNK_BYTES), b""), _BytesFeedParser)

    def parse(self, chunks: Iterable, parser_class: type[FeedParser]) -> Message:
        """Parse within the part budget, keeping what was parsed when it ran out."""
        first: list[Message] = []

        def new_part(policy: Policy) -> _Part:
            if self.parts_left <= 0:
                raise _PartLimitReached()
            self.parts_left -= 1
            part = _Part(policy)
            if not first:
                first.append(part)
            return part

        parser = parser_class(policy=compat32.clone(message_factory=new_part))
        try:
            for chunk in chunks:
                parser.feed(chunk)
            return parser.close()
        except _PartLimitReached:
            self.warn(_PART_LIMIT_WARNING.format(self.max_parts))
        except RecursionError:
            self.warn("MIME parts nested too deeply, the rest skipped")
        except (OSError, MemoryError):
            raise
        except Exception as e:
            raise UnparseableMessage(f"the MIME structure cannot be parsed ({type(e).__name__}: {e})") from e
        return first[0] if first else _Part()

    def walk(self, root: Message) -> None:
        """Depth first, in message order, without recursion (nesting is the sender's choice)."""
        # (part, IMAP section, forwarding depth, subtypes of the multiparts around it, is a message)
        stack: list[tuple[Message, str, int, frozenset, bool]] = [(root, "", 0, frozenset(), True)]
        while stack:
            part, section, depth, within, is_message = stack.pop()
            if part.defects:
                names = ", ".join(dict.fromkeys(type(d).__name__ for d in part.defects))
                self.warn(f"{_label(section)}: malformed MIME ({names})")
            if is_message and not part.is_multipart():
                section = _child(section, 1)
            content_type = _content_type(part)
            if content_type.startswith("message/"):
                self._message_part(part, section, content_type, depth, stack)
            elif content_type.startswith("multipart/"):
                if content_type == "multipart/encrypted":
                    self.warn(f"{_label(section)}: encrypted, kept as one document")
                inner = within | {content_type.partition("/")[2]}
                children = self._children(part, section)
                stack.extend(
                    reversed([(child, _child(section, i), depth, inner, False) for i, child in enumerate(children, 1)])
                )
            elif not part.is_multipart():
                self._leaf(part, section, within)

    def drop_shown_images(self) -> None:
        """Leave out the images an HTML body shows (by cid: or Content-Location): logos, not files."""
        html = "\n".join(self.html)
        shown = {
            index
            for index, (content_id, location) in self.images.items()
            if (content_id and content_id in self.shown_ids) or (location and location in html)
        }
        if not shown:
            return
        kept = []
        for index, attachment in enumerate(self.attachments):
            if index in shown:
                os.remove(attachment.path)
                continue
            path = os.path.join(self.out_dir, f"{len(kept)}.bin")
            if path != attachment.path:
                os.rename(attachment.path, path)
            kept.append(dataclasses.replace(attachment, path=path))
        self.attachments = kept

    def _children(self, part: Message, section: str) -> list[Message]:
        """The parts of a multipart, with those that a damaged boundary hid from the parser."""
        parsed = len(part.get_payload()) if part.is_multipart() else 0
        if not part.is_multipart():
            # The boundary is missing or never occurs, so the body was kept as text.
            match = _DELIMITER_LINE.search(_text(part))
            if match:
                part = self._reparse(_text(part), match.group(1))
        if not part.is_multipart():
            return []
        children = [child for child in part.get_payload() if isinstance(child, Message)]
        boundary = part.get_boundary()
        if boundary and part.epilogue:
            children += self._parts_after_close(part.epilogue, boundary)
        if len(children) > parsed:
            self.warn(f"{_label(section)}: damaged boundary, {len(children) - parsed} part(s) recovered")
        return children

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
        if self.parts_left <= 0:
            self.warn(_PART_LIMIT_WARNING.format(self.max_parts))
            return False
        # The line break before a delimiter belongs to the delimiter (RFC 2046).
        if text.startswith("\r\n", max(start, end - 2), end):
            end -= 2
        elif end > start and text[end - 1] in "\r\n":
            end -= 1
        part = self.parse([text[start:end]], _FeedParser)
        # The parser gives this defect to a top-level message only, and this was a part.
        part.defects[:] = [d for d in part.defects if not isinstance(d, MultipartInvariantViolationDefect)]
        parts.append(part)
        return True

    def _reparse(self, body: str, boundary: str) -> Message:
        """C{body} parsed as the body of a multipart with C{boundary}."""
        if '"' in boundary or "\\" in boundary:
            return _Part()
        header = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        return self.parse([header, body], _FeedParser)

    def _message_part(self, part: Message, section: str, content_type: str, depth: int, stack: list) -> None:
        """
        A C{message/*} part: a document when it is named or an attachment
        (an attached C{.eml}, a delivery report C{DSN....txt}); forwarded
        messages are walked as well.
        """
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        named = name is not None or _disposition(part) == "attachment"
        payload = part.get_payload()
        if content_type in _FORWARDED_TYPES:
            inner = payload[0] if isinstance(payload, list) and payload else None
            if named and isinstance(inner, Message) and inner.keys():
                self._store_bytes(part, section, content_type, _body_bytes(part), name, name_warnings)
            self._forwarded(part, section, content_type, depth, stack, named)
        elif named and isinstance(payload, list):
            self._store_bytes(part, section, content_type, _body_bytes(part), name, name_warnings)
        elif named:
            self._store_part(part, section, content_type, name, name_warnings)

    def _forwarded(self, part: Message, section: str, content_type: str, depth: int, stack: list, named: bool) -> None:
        """Walk a forwarded message; one that holds no message is kept as a C{.eml}, as is a named one decoded."""
        if depth >= self.max_depth:
            self.warn(f"{_label(section)}: depth limit reached, skipped")
            return
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if not isinstance(inner, Message):
            return
        if inner.keys():
            stack.append((inner, section, depth + 1, frozenset(), True))
            return
        encoding = _transfer_encoding(part)
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        written = self._write(_text(inner), encoding, section, content_type, name)
        if written is None:
            return
        path, size, digest = written
        if encoding in ("base64", "quoted-printable"):
            decoded = self.parse_file(path)
            if decoded.keys():
                stack.append((decoded, section, depth + 1, frozenset(), True))
                if not named:
                    os.remove(path)
                    return
        self._add_document(part, path, size, digest, section, content_type, name, name_warnings)

    def _leaf(self, part: Message, section: str, within: frozenset) -> None:
        content_type = _normalised_type(part)
        # Whether a part is a body or a file goes by the type the parser read:
        # an unreadable Content-Type is text/plain there (RFC 2045 5.2), a body
        # a person reads, even though a file of that part would be stored as
        # application/octet-stream.
        maintype = _content_type(part).partition("/")[0]
        disposition = _disposition(part)
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        content_id = _content_id(part)
        if content_type == "text/html" and disposition != "attachment":
            self._read_html(part)
        if "signed" in within and content_type in _SIGNATURE_TYPES:
            return
        if "encrypted" in within and content_type == "application/pgp-encrypted":
            return
        if maintype == "image" and disposition != "attachment" and "related" in within and content_id:
            if not self.keep_inline_images:
                return
        if maintype == "text" and disposition != "attachment" and name is None:
            return
        if content_type in _SMIME_TYPES:
            smime_type = str(part.get_param("smime-type", "") or "").lower()
            opaque = "signed, not readable here" if smime_type == "signed-data" else "encrypted"
            self.warn(f"{_label(section)}: S/MIME {opaque}, kept as one document")
        if content_type in _TNEF_TYPES or (name or "").strip().lower() == "winmail.dat":
            self._tnef(part, section, content_type, name, name_warnings)
            return
        index = len(self.attachments)
        self._store_part(part, section, content_type, name, name_warnings)
        if maintype == "image" and len(self.attachments) > index:
            self.images[index] = (content_id, _content_location(part))

    def _read_html(self, part: Message) -> None:
        """Note what an HTML body shows: the Content-IDs it names, and its text for Content-Locations."""
        sink = _MemorySink(HTML_SCAN_BYTES)
        try:
            _decode(_text(part)[: HTML_SCAN_BYTES * 2], _transfer_encoding(part), sink)
        except _Undecodable:
            return
        html = sink.getvalue().decode("latin-1")
        self.html.append(html)
        self.shown_ids.update(urllib.parse.unquote(m.group(1)).strip("<>") for m in _CID_REFERENCE.finditer(html))

    def _tnef(self, part: Message, section: str, content_type: str, name: str | None, name_warnings: list[str]) -> None:
        """Each file inside a winmail.dat is a document; the TNEF part itself only when none could be taken out."""
        sink = _MemorySink(None)
        try:
            _decode(_text(part), _transfer_encoding(part), sink)
            files, warnings = tnef_files(sink.getvalue(), max(self.parts_left, 1), self.max_depth)
        except (_Undecodable, NotTnef):
            files, warnings = [], ["not TNEF, kept as it is"]
        for warning in warnings:
            self.warn(f"{_label(section)}: {warning}")
        if not files:
            self._store_part(part, section, content_type, name, name_warnings)
            return
        self.parts_left -= len(files)
        for number, file in enumerate(files, 1):
            path = os.path.join(self.out_dir, f"{len(self.attachments)}.bin")
            with _Sink(path) as out:
                out.write(file.data)
            self.attachments.append(
                Attachment(
                    sanitise_filename(file.name, self._fallback(file.content_type)) if file.name else self._fallback(file.content_type),
                    file.content_type,
                    out.size,
                    out.digest.hexdigest(),
                    path,
                    original_filename=file.name,
                    disposition="attachment",
                )
            )

    def _store_part(self, part: Message, section: str, content_type: str, name: str | None, name_warnings: list[str]) -> None:
        written = self._write(_text(part), _transfer_encoding(part), section, content_type, name)
        if written is not None:
            self._add_document(part, *written, section, content_type, name, name_warnings)

    def _store_bytes(
        self, part: Message, section: str, content_type: str, data: bytes, name: str | None, name_warnings: list[str]
    ) -> None:
        path = os.path.join(self.out_dir, f"{len(self.attachments)}.bin")
        with _Sink(path) as sink:
            sink.write(data)
        self._add_document(part, path, sink.size, sink.digest.hexdigest(), section, content_type, name, name_warnings)

    def _write(self, text: str, encoding: str, section: str, content_type: str, name: str | None) -> tuple[str, int, str] | None:
        """
        Decode C{text} into the next document file: its path, size and
        SHA-256; None when it cannot be decoded (the part is skipped, with
        its reason).
        """
        path = os.path.join(self.out_dir, f"{len(self.attachments)}.bin")
        with _Sink(path) as sink:
            try:
                warning = _decode(text, encoding, sink)
                decoded = True
            except _Undecodable:
                decoded = False
        if not decoded:
            os.remove(path)
            described = f"{content_type}, {name!r}" if name else content_type
            reason = f"{_label(section)} ({described}): {encoding} content cannot be decoded, skipped"
            self.skipped.append(reason)
            self.warn(reason)
            return None
        if warning:
            self.warn(f"{_label(section)}: {warning}")
        return path, sink.size, sink.digest.hexdigest()

    def _fallback(self, content_type: str) -> str:
        return fallback_filename(len(self.attachments) + 1, content_type)

    def _add_document(
        self,
        part: Message,
        path: str,
        size: int,
        digest: str,
        section: str,
        content_type: str,
        name: str | None,
        name_warnings: list[str],
    ) -> None:
        for warning in name_warnings:
            self.warn(f"{_label(section)}: {warning}")
        original = name
        if BYTES_REPLACED in name_warnings:
            original = raw_header(part, "content-disposition") or raw_header(part, "content-type")
        if name is None:
            name = described_filename(part, [])
        fallback = self._fallback(content_type)
        filename = sanitise_filename(name, fallback) if name is not None else fallback
        raw_type = raw_header(part, "content-type")
        self.attachments.append(
            Attachment(
                filename,
                content_type,
                size,
                digest,
                path,
                original_filename=original,
                disposition=_disposition(part),
                content_id=_content_id(part),
                content_type_raw=raw_type.strip() if raw_type and raw_type.strip() != content_type else None,
            )
        )


class _Lines(BufferedSubFile):
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


class _FeedParser(FeedParser):
    """The feed parser reading through L{_Lines}."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._input = _Lines()


class _BytesFeedParser(BytesFeedParser, _FeedParser):
    pass


class _Part(Message):
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


class _MemorySink:
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


class _Sink:
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

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def _decode(text: str, encoding: str, sink: _Sink) -> str | None:
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


def _write_base64(text: str, sink: _Sink) -> str | None:
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
    raise _Undecodable()


def _write_uu(text: str, sink: _Sink) -> None:
    """uudecode: the lines between C{begin <mode> <name>} and C{end}, as the email package reads them."""
    lines = iter(text.encode("ascii", "surrogateescape").splitlines())
    for line in lines:
        if re.match(rb"begin\s+[0-7]+(\s|$)", line):
            break
    else:
        if text.strip():
            raise _Undecodable()
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
                raise _Undecodable() from None


def _transfer_encoding(part: Message) -> str:
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


def _content_type(part: Message) -> str:
    """The type the parser went by, for the structure: multiparts and messages."""
    return "".join(part.get_content_type().split())


def _normalised_type(part: Message) -> str:
    """
    C{type/subtype} in lower case as the email package's header registry
    reads the Content-Type (the default of C{part} when it has none);
    C{application/octet-stream} when the value cannot be read (a missing
    C{;}: C{application/pdfname="x.pdf"}).
    """
    raw = raw_header(part, "content-type")
    if raw is None or not raw.strip():
        return _content_type(part)
    try:
        parsed = _HEADER_REGISTRY("content-type", raw).content_type
    except Exception:
        return "application/octet-stream"
    declared = re.sub(r"\s+", "", raw.partition(";")[0]).lower()
    if declared != parsed or not _CONTENT_TYPE.fullmatch(parsed):
        return "application/octet-stream"
    return parsed


def _disposition(part: Message) -> str | None:
    """C{attachment} or C{inline}; other values are damage and count as absent."""
    value = part.get_content_disposition()
    return value if value in ("attachment", "inline") else None


def _content_id(part: Message) -> str | None:
    value = str(part.get("content-id", "") or "").strip()[:998].strip("<>").strip()
    return value or None


def _content_location(part: Message) -> str | None:
    value = "".join(str(part.get("content-location", "") or "").split())[:998]
    return value or None


def _body_bytes(part: Message) -> bytes:
    """A C{message/*} part's body (the attached message), as the email package writes it back."""
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(part)
    data = out.getvalue()
    return data.partition(b"\r\n\r\n")[2]


def _text(part: Message) -> str:
    """The encoded body of a leaf, 8-bit bytes as surrogate escapes."""
    return part.encoded_body() if isinstance(part, _Part) else ""


def _child(section: str, index: int) -> str:
    return f"{section}.{index}" if section else str(index)


def _label(section: str) -> str:
    return f"part {section}" if section else "message"
