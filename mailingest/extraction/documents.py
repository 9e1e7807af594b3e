"""
The documents of one message as they are written to disk: C{0.bin}, C{1.bin},
... in message order, named from their position only, with their sanitised
filenames; and the images an HTML body shows, which are dropped at the end.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from email.message import Message

from mailingest.extraction.decoding import FileSink, MemorySink, Undecodable, decode, transfer_encoding
from mailingest.extraction.filenames import (
    BYTES_REPLACED,
    described_filename,
    fallback_filename,
    raw_header,
    sanitise_filename,
)
from mailingest.extraction.mimeparse import encoded_body
from mailingest.extraction.tnef import TnefFile

# What an HTML body shows from the message: src="cid:logo@x", also url(cid:...).
_CID_REFERENCE = re.compile(r"cid:([^\s\"'<>()]+)", re.IGNORECASE)
# HTML bodies are searched for references in their first 4 MiB.
HTML_SCAN_BYTES = 4 << 20


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


class Documents:
    """
    The documents written so far, and the parts skipped because they cannot
    be decoded. Warnings name the part by its C{label} (C{part 2.1}).
    """

    def __init__(self, out_dir: str, warn: Callable[[str], None]):
        self.out_dir = out_dir
        self.attachments: list[Attachment] = []
        self.skipped: list[str] = []
        self._warn = warn

    def store_part(self, part: Message, label: str, content_type: str, name: str | None, name_warnings: list[str]) -> None:
        written = self.write(encoded_body(part), transfer_encoding(part), label, content_type, name)
        if written is not None:
            self.add(part, *written, label, content_type, name, name_warnings)

    def store_bytes(
        self, part: Message, label: str, content_type: str, data: bytes, name: str | None, name_warnings: list[str]
    ) -> None:
        path = self._next_path()
        with FileSink(path) as sink:
            sink.write(data)
        self.add(part, path, sink.size, sink.digest.hexdigest(), label, content_type, name, name_warnings)

    def store_files(self, files: Iterable[TnefFile]) -> None:
        """The files taken out of a container (a winmail.dat): each one an attachment."""
        for file in files:
            path = self._next_path()
            with FileSink(path) as out:
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

    def write(self, text: str, encoding: str, label: str, content_type: str, name: str | None) -> tuple[str, int, str] | None:
        """
        Decode C{text} into the next document file: its path, size and
        SHA-256; None when it cannot be decoded (the part is skipped, with
        its reason).
        """
        path = self._next_path()
        with FileSink(path) as sink:
            try:
                warning = decode(text, encoding, sink)
                decoded = True
            except Undecodable:
                decoded = False
        if not decoded:
            os.remove(path)
            described = f"{content_type}, {name!r}" if name else content_type
            reason = f"{label} ({described}): {encoding} content cannot be decoded, skipped"
            self.skipped.append(reason)
            self._warn(reason)
            return None
        if warning:
            self._warn(f"{label}: {warning}")
        return path, sink.size, sink.digest.hexdigest()

    def add(
        self,
        part: Message,
        path: str,
        size: int,
        digest: str,
        label: str,
        content_type: str,
        name: str | None,
        name_warnings: list[str],
    ) -> None:
        """Record the file at C{path}, written from C{part}, as the next document."""
        for warning in name_warnings:
            self._warn(f"{label}: {warning}")
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
                disposition=disposition(part),
                content_id=content_id(part),
                content_type_raw=raw_type.strip() if raw_type and raw_type.strip() != content_type else None,
            )
        )

    def drop(self, indexes: set[int]) -> None:
        """Remove the documents at C{indexes}, numbering the files of the others from 0 again."""
        if not indexes:
            return
        kept = []
        for index, attachment in enumerate(self.attachments):
            if index in indexes:
                os.remove(attachment.path)
                continue
            path = os.path.join(self.out_dir, f"{len(kept)}.bin")
            if path != attachment.path:
                os.rename(attachment.path, path)
            kept.append(dataclasses.replace(attachment, path=path))
        self.attachments = kept

    def _next_path(self) -> str:
        return os.path.join(self.out_dir, f"{len(self.attachments)}.bin")

    def _fallback(self, content_type: str) -> str:
        return fallback_filename(len(self.attachments) + 1, content_type)


class ShownImages:
    """
    The images an HTML body shows (by C{cid:} or C{Content-Location}), which
    are logos, not files. Known only once the whole message is walked.
    """

    def __init__(self) -> None:
        # What the HTML bodies show: Content-IDs (from cid: URLs) and the text to find Content-Locations in.
        self._shown_ids: set[str] = set()
        self._html: list[str] = []
        # Images the HTML bodies may show, by their index in the documents: (Content-ID, Content-Location).
        self._images: dict[int, tuple[str | None, str | None]] = {}

    def read_html(self, part: Message) -> None:
        """Note what an HTML body shows: the Content-IDs it names, and its text for Content-Locations."""
        sink = MemorySink(HTML_SCAN_BYTES)
        try:
            decode(encoded_body(part)[: HTML_SCAN_BYTES * 2], transfer_encoding(part), sink)
        except Undecodable:
            return
        html = sink.getvalue().decode("latin-1")
        self._html.append(html)
        self._shown_ids.update(urllib.parse.unquote(m.group(1)).strip("<>") for m in _CID_REFERENCE.finditer(html))

    def add_image(self, index: int, part: Message) -> None:
        """The document at C{index} is an image an HTML body may show."""
        self._images[index] = (content_id(part), _content_location(part))

    def shown(self) -> set[int]:
        """The indexes of the images the HTML bodies show."""
        html = "\n".join(self._html)
        return {
            index
            for index, (image_id, location) in self._images.items()
            if (image_id and image_id in self._shown_ids) or (location and location in html)
        }


def disposition(part: Message) -> str | None:
    """C{attachment} or C{inline}; other values are damage and count as absent."""
    value = part.get_content_disposition()
    return value if value in ("attachment", "inline") else None


def content_id(part: Message) -> str | None:
    value = str(part.get("content-id", "") or "").strip()[:998].strip("<>").strip()
    return value or None


def _content_location(part: Message) -> str | None:
    value = "".join(str(part.get("content-location", "") or "").split())[:998]
    return value or None
