"""
The files inside a TNEF stream: Outlook's C{winmail.dat} (C{application/ms-tnef}).

The attribute framing (MS-OXTNEF: a level, an id, a length, the data, a
checksum) is read here, with bounds; the attributes and MAPI property lists
are decoded by C{tnefparse}. Its own reader is not used on sender input as is:
it copies the rest of the stream for every attribute (quadratic in the
attribute count), follows property counts as given (a count of 2**32 loops
that many times over a few bytes) and parses embedded messages without a depth
limit. So every attribute's length must fit in the stream, every count in a
property list must fit in the bytes left before that list is decoded, there
are at most C{max_files} files and C{max_depth} levels of embedded messages.
Whatever breaks a bound ends the reading there with a warning: the files read
until then are kept.

Each file gets its long name (C{PR_ATTACH_LONG_FILENAME}), else its MAPI file
name, else the 8.3 C{attAttachTitle}; its type is C{PR_ATTACH_MIME_TAG}, else
what its extension says.

Its bytes are exactly the file the sender attached. Two places can hold them:
the C{attAttachData} attribute and, inside C{attAttachment}, the MAPI property
0x3701 (C{PR_ATTACH_DATA_BIN}, or C{PR_ATTACH_DATA_OBJ} for an object). When
both are present the property wins: MS-OXTNEF 2.1.3 says the values of
encapsulated properties are to be used instead of conflicting mapped
attributes, and Outlook puts its "embedded object not supported" placeholder
text in C{attAttachData} while the property holds the attachment. MAPI binary
values are padded to 4 bytes and that padding is not content, but C{tnefparse}
keeps it and drops the declared size; so the value's place and declared size
come from the walk that checks the property list's counts, and the bytes are
that span of the stream itself (no copy). An object value starts with its
interface id: C{IID_IMessage} (C{ATTACH_EMBEDDED_MSG}) is a message in TNEF of
its own, whose attachments are its files, as for a forwarded C{message/rfc822};
any other (an OLE C{IStorage}) is a file after its interface id.
"""

from __future__ import annotations

import logging
import mimetypes
import struct
from dataclasses import dataclass

from tnefparse import properties
from tnefparse.codepage import Codepage
from tnefparse.mapi import IMESSAGE_SIG, SZMAPI_BINARY, SZMAPI_INT, SZMAPI_OBJECT, decode_mapi
from tnefparse.tnef import TNEF

# tnefparse logs what it skips to stderr; what matters reaches our warnings.
logging.getLogger("tnefparse").addHandler(logging.NullHandler())
logging.getLogger("tnefparse").propagate = False

SIGNATURE = struct.pack("<I", TNEF.TNEF_SIGNATURE)
MAX_DEPTH = 5
MAX_ATTRIBUTES = 20000
ATTACH_EMBEDDED_MSG = 5
_ATTACH_DATA = properties.MAPI_ATTACH_DATA_OBJ
_FRAME = struct.Struct("<BHHI")
_U32 = struct.Struct("<I")
_BUILTIN_TYPES = mimetypes.MimeTypes()
_FIXED_SIZES = {0x0002: 2, 0x000B: 2, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x0001: 0}
_FIXED_SIZES.update({t: 8 for t in (0x0005, 0x0006, 0x0007, 0x0014, 0x0040)})
_FIXED_SIZES[0x0048] = 16
_COUNTED_TYPES = frozenset({0x0000, 0x000D, 0x001E, 0x001F, 0x0102})


@dataclass(frozen=True)
class TnefFile:
    name: str | None
    content_type: str
    # A view of the decoded winmail.dat: the file is never copied out of it.
    data: memoryview


class NotTnef(Exception):
    """The data does not start with the TNEF signature."""


def tnef_files(
    data: bytes | memoryview, max_files: int, max_depth: int = MAX_DEPTH, depth: int = 0
) -> tuple[list[TnefFile], list[str]]:
    """
    The files in the TNEF stream C{data}, at most C{max_files}, with those of
    messages embedded up to C{max_depth} levels, and warnings about the rest.
    """
    data = memoryview(data)
    if data[: len(SIGNATURE)] != SIGNATURE:
        raise NotTnef()
    files: list[TnefFile] = []
    warnings: list[str] = []
    codepage = "cp1252"
    current: _File | None = None
    offset, count = 6, 0
    while offset < len(data):
        count += 1
        if count > MAX_ATTRIBUTES:
            warnings.append(f"TNEF: more than {MAX_ATTRIBUTES} attributes, the rest skipped")
            break
        if len(data) - offset < _FRAME.size + 2:
            warnings.append("TNEF: truncated, the rest skipped")
            break
        level, name, _type, length = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        # A checksum cut off at the very end loses nothing: checksums are not checked.
        if end > len(data):
            warnings.append("TNEF: truncated, the rest skipped")
            break
        value = data[offset + _FRAME.size : end]
        offset = end + 2
        if name == TNEF.ATTATTACHRENDDATA:
            if current is not None:
                files += current.finish(max_files - len(files), max_depth, depth, warnings)
            if len(files) >= max_files:
                warnings.append(f"TNEF: more than {max_files} files, the rest skipped")
                current = None
                break
            current = _File(codepage)
        elif level == TNEF.LVL_ATTACHMENT and current is not None:
            current.add(name, value, warnings)
        elif name == TNEF.ATTOEMCODEPAGE and len(value) >= 4:
            codepage = Codepage(_U32.unpack_from(value)[0]).codepage()
    if current is not None and len(files) < max_files:
        files += current.finish(max_files - len(files), max_depth, depth, warnings)
    return files, warnings


class _File:
    """One attachment's attributes as they are read."""

    def __init__(self, codepage: str):
        self.codepage = codepage
        self.title: str | None = None
        # attAttachData, and the value of property 0x3701 with its MAPI type.
        self.data: memoryview | None = None
        self.attached: tuple[int, memoryview] | None = None
        self.mapi: dict[int, object] = {}

    def add(self, name: int, value: memoryview, warnings: list[str]) -> None:
        if name == TNEF.ATTATTACHTITLE:
            self.title = _text(bytes(value), self.codepage)
        elif name == TNEF.ATTATTACHDATA:
            self.data = value
        elif name == TNEF.ATTATTACHMENT:
            spans = _value_spans(value)
            if spans is None:
                warnings.append("TNEF: an attachment's MAPI properties are damaged, ignored")
                return
            for prop_type in (SZMAPI_BINARY, SZMAPI_OBJECT):
                span = spans.get((prop_type, _ATTACH_DATA))
                if span is not None and self.attached is None:
                    self.attached = (prop_type, value[span[0] : span[0] + span[1]])
            for prop in decode_mapi(bytes(value), self.codepage):
                # tnefparse's copy of the data (padded) is dropped here; self.attached has the exact bytes.
                if prop.name != _ATTACH_DATA:
                    self.mapi.setdefault(prop.name, prop)

    def finish(self, room: int, max_depth: int, depth: int, warnings: list[str]) -> list[TnefFile]:
        data = self.data
        if self.attached is not None:
            prop_type, data = self.attached
            if prop_type == SZMAPI_OBJECT:
                interface, data = data[: len(IMESSAGE_SIG)], data[len(IMESSAGE_SIG) :]
                if interface == IMESSAGE_SIG:
                    return self._embedded(data, room, max_depth, depth, warnings)
        elif self._number(properties.MAPI_ATTACH_METHOD) == ATTACH_EMBEDDED_MSG:
            warnings.append("TNEF: an embedded message without its content, skipped")
            return []
        if data is None:
            return []
        name = next(
            (
                value
                for value in (
                    self._string(properties.MAPI_ATTACH_LONG_FILENAME),
                    self._string(properties.MAPI_ATTACH_FILENAME),
                    self.title,
                    self._string(properties.MAPI_DISPLAY_NAME),
                )
                if value
            ),
            None,
        )
        content_type = (self._string(properties.MAPI_ATTACH_MIME_TAG) or "").strip().lower()
        if content_type.count("/") != 1 or not all(content_type.split("/")):
            content_type = (name and _BUILTIN_TYPES.guess_type(name, strict=False)[0]) or "application/octet-stream"
        return [TnefFile(name, content_type, data)]

    def _embedded(self, data: memoryview, room: int, max_depth: int, depth: int, warnings: list[str]) -> list[TnefFile]:
        if depth >= max_depth:
            warnings.append(f"TNEF: messages embedded more than {max_depth} deep, skipped")
            return []
        try:
            files, inner = tnef_files(data, room, max_depth, depth + 1)
        except NotTnef:
            warnings.append("TNEF: an embedded message that is not TNEF, skipped")
            return []
        warnings += inner
        return files

    def _string(self, prop_id: int) -> str | None:
        prop = self.mapi.get(prop_id)
        if prop is None:
            return None
        value = prop.data
        return value.strip("\x00").strip() if isinstance(value, str) else None

    def _number(self, prop_id: int) -> int | None:
        prop = self.mapi.get(prop_id)
        value = prop.data if prop is not None and prop.attr_type == SZMAPI_INT else None
        return value if isinstance(value, int) else None


def _text(value: bytes, codepage: str) -> str:
    try:
        return value.rstrip(b"\x00").decode(codepage, "replace").strip()
    except LookupError:
        return value.rstrip(b"\x00").decode("cp1252", "replace").strip()


def _value_spans(data: memoryview) -> dict[tuple[int, int], tuple[int, int]] | None:
    """
    Where the value of each single-valued counted property of the MAPI
    property list C{data} lies, by (type, id): its offset and declared size,
    which excludes the padding. None when a count does not fit in the bytes
    left, so that the list is decoded only when it takes time in proportion
    to its length.
    """
    end = len(data)
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    try:
        (count,) = _U32.unpack_from(data)
        offset = 4
        if count > end // 4:
            return None
        for _ in range(count):
            prop_type, prop_id = struct.unpack_from("<HH", data, offset)
            offset += 4
            if prop_id >= 0x8000:
                kind, size = struct.unpack_from("<II", data, offset + 16)
                offset += 24 if kind == 0 else 24 + size + (-size % 4)
            multiple = bool(prop_type & 0x1000)
            prop_type &= ~0x1000
            values = 1
            if multiple:
                (values,) = _U32.unpack_from(data, offset)
                offset += 4
            elif prop_type in _COUNTED_TYPES and _U32.unpack_from(data, offset)[0]:
                spans.setdefault((prop_type, prop_id), (offset + 8, _U32.unpack_from(data, offset + 4)[0]))
            if values > end - offset:
                return None
            for _ in range(values):
                offset = _skip_value(data, offset, prop_type, multiple)
                if offset > end:
                    return None
            if values % 2 and prop_type in (0x0002, 0x000B):
                offset += 2
    except (struct.error, ValueError):
        return None
    return spans if offset <= end else None


def _skip_value(data: memoryview, offset: int, prop_type: int, multiple: bool) -> int:
    if prop_type in _FIXED_SIZES:
        return offset + _FIXED_SIZES[prop_type]
    if prop_type not in _COUNTED_TYPES:
        raise ValueError("unknown MAPI type")
    items = 1
    if not multiple:
        (items,) = _U32.unpack_from(data, offset)
        offset += 4
        if items > (len(data) - offset) // 4:
            raise ValueError("count beyond the data")
    for _ in range(items):
        (size,) = _U32.unpack_from(data, offset)
        offset += 4 + size + (-size % 4)
    return offset
