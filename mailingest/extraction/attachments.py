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

The pieces: parsing within the part budget and repairing broken boundaries
(L{mailingest.extraction.mimeparse}), undoing transfer encodings
(L{mailingest.extraction.decoding}), writing the documents and dropping the
images an HTML body shows (L{mailingest.extraction.documents}).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import field
from email.generator import BytesGenerator
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.policy import compat32
from io import BytesIO

from mailingest.extraction.decoding import MemorySink, Undecodable, decode, transfer_encoding
from mailingest.extraction.documents import Attachment, Documents, ShownImages, content_id, disposition
from mailingest.extraction.filenames import decode_filename, raw_header
from mailingest.extraction.mimeparse import Budget, MimeParser, UnparseableMessage, encoded_body
from mailingest.extraction.tnef import NotTnef, tnef_files

__all__ = ["Attachment", "ExtractionResult", "UnparseableMessage", "extract_attachments"]

_FORWARDED_TYPES = frozenset({"message/rfc822", "message/global"})
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_SIGNATURE_TYPES = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature", "application/pgp-signature"})
_SMIME_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
_CONTENT_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")
_HEADER_REGISTRY = HeaderRegistry()


@dataclasses.dataclass(frozen=True)
class ExtractionResult:
    attachments: list[Attachment]
    warnings: list[str]
    # The parts that could not be read, each named with its reason (also in warnings).
    skipped: list[str] = field(default_factory=list)


def extract_attachments(
    raw_path: str, out_dir: str, *, max_depth: int = 5, max_parts: int = 1000, inline_images: str = "skip"
) -> ExtractionResult:
    """
    Write the documents of the message in C{raw_path} to the empty C{out_dir}.
    C{inline_images="keep"} also keeps the images the HTML body shows.
    """
    walk = _AttachmentWalk(out_dir, Budget(max_parts, max_depth), keep_inline_images=inline_images == "keep")
    walk.walk(walk.parser.parse_file(raw_path))
    documents = walk.documents
    if not walk.keep_inline_images:
        documents.drop(walk.shown_images.shown())
    if documents.skipped and not documents.attachments:
        raise UnparseableMessage("; ".join(documents.skipped))
    if not documents.attachments:
        walk.warn("no attachments")
    return ExtractionResult(documents.attachments, walk.warnings, documents.skipped)


class _AttachmentWalk:
    """The walk of one message's parts: which part is a document, and the warnings so far."""

    def __init__(self, out_dir: str, budget: Budget, keep_inline_images: bool = False):
        self.keep_inline_images = keep_inline_images
        self.budget = budget
        self.warnings: list[str] = []
        self.parser = MimeParser(budget, self.warn)
        self.documents = Documents(out_dir, self.warn)
        self.shown_images = ShownImages()

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

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
                children, recovered = self.parser.children(part)
                if recovered > 0:
                    self.warn(f"{_label(section)}: damaged boundary, {recovered} part(s) recovered")
                stack.extend(
                    reversed([(child, _child(section, i), depth, inner, False) for i, child in enumerate(children, 1)])
                )
            elif not part.is_multipart():
                self._leaf(part, section, within)

    def _message_part(self, part: Message, section: str, content_type: str, depth: int, stack: list) -> None:
        """
        A C{message/*} part: a document when it is named or an attachment
        (an attached C{.eml}, a delivery report C{DSN....txt}); forwarded
        messages are walked as well.
        """
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        named = name is not None or disposition(part) == "attachment"
        payload = part.get_payload()
        label = _label(section)
        if content_type in _FORWARDED_TYPES:
            inner = payload[0] if isinstance(payload, list) and payload else None
            if named and isinstance(inner, Message) and inner.keys():
                self.documents.store_bytes(part, label, content_type, _body_bytes(part), name, name_warnings)
            self._forwarded(part, section, content_type, depth, stack, named)
        elif named and isinstance(payload, list):
            self.documents.store_bytes(part, label, content_type, _body_bytes(part), name, name_warnings)
        elif named:
            self.documents.store_part(part, label, content_type, name, name_warnings)

    def _forwarded(self, part: Message, section: str, content_type: str, depth: int, stack: list, named: bool) -> None:
        """Walk a forwarded message; one that holds no message is kept as a C{.eml}, as is a named one decoded."""
        if depth >= self.budget.max_depth:
            self.warn(f"{_label(section)}: depth limit reached, skipped")
            return
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if not isinstance(inner, Message):
            return
        if inner.keys():
            stack.append((inner, section, depth + 1, frozenset(), True))
            return
        encoding = transfer_encoding(part)
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        written = self.documents.write(encoded_body(inner), encoding, _label(section), content_type, name)
        if written is None:
            return
        path, size, digest = written
        if encoding in ("base64", "quoted-printable"):
            decoded = self.parser.parse_file(path)
            if decoded.keys():
                stack.append((decoded, section, depth + 1, frozenset(), True))
                if not named:
                    os.remove(path)
                    return
        self.documents.add(part, path, size, digest, _label(section), content_type, name, name_warnings)

    def _leaf(self, part: Message, section: str, within: frozenset) -> None:
        content_type = _normalised_type(part)
        # Whether a part is a body or a file goes by the type the parser read:
        # an unreadable Content-Type is text/plain there (RFC 2045 5.2), a body
        # a person reads, even though a file of that part would be stored as
        # application/octet-stream.
        maintype = _content_type(part).partition("/")[0]
        part_disposition = disposition(part)
        name_warnings: list[str] = []
        name = decode_filename(part, name_warnings)
        if content_type == "text/html" and part_disposition != "attachment":
            self.shown_images.read_html(part)
        if "signed" in within and content_type in _SIGNATURE_TYPES:
            return
        if "encrypted" in within and content_type == "application/pgp-encrypted":
            return
        if maintype == "image" and part_disposition != "attachment" and "related" in within and content_id(part):
            if not self.keep_inline_images:
                return
        if maintype == "text" and part_disposition != "attachment" and name is None:
            return
        if content_type in _SMIME_TYPES:
            smime_type = str(part.get_param("smime-type", "") or "").lower()
            opaque = "signed, not readable here" if smime_type == "signed-data" else "encrypted"
            self.warn(f"{_label(section)}: S/MIME {opaque}, kept as one document")
        if content_type in _TNEF_TYPES or (name or "").strip().lower() == "winmail.dat":
            self._tnef(part, section, content_type, name, name_warnings)
            return
        index = len(self.documents.attachments)
        self.documents.store_part(part, _label(section), content_type, name, name_warnings)
        if maintype == "image" and len(self.documents.attachments) > index:
            self.shown_images.add_image(index, part)

    def _tnef(self, part: Message, section: str, content_type: str, name: str | None, name_warnings: list[str]) -> None:
        """Each file inside a winmail.dat is a document; the TNEF part itself only when none could be taken out."""
        sink = MemorySink(None)
        try:
            decode(encoded_body(part), transfer_encoding(part), sink)
            files, warnings = tnef_files(sink.getvalue(), max(self.budget.parts_left, 1), self.budget.max_depth)
        except (Undecodable, NotTnef):
            files, warnings = [], ["not TNEF, kept as it is"]
        for warning in warnings:
            self.warn(f"{_label(section)}: {warning}")
        if not files:
            self.documents.store_part(part, _label(section), content_type, name, name_warnings)
            return
        self.budget.spend(len(files))
        self.documents.store_files(files)


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


def _body_bytes(part: Message) -> bytes:
    """A C{message/*} part's body (the attached message), as the email package writes it back."""
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(part)
    data = out.getvalue()
    return data.partition(b"\r\n\r\n")[2]


def _child(section: str, index: int) -> str:
    return f"{section}.{index}" if section else str(index)


def _label(section: str) -> str:
    return f"part {section}" if section else "message"
