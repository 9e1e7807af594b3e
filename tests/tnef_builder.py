"""
TNEF streams (Outlook's winmail.dat) built for the tests, following MS-OXTNEF.

A stream is the signature 0x223E9F78, a 16-bit key, then attributes: a level
(1 message, 2 attachment), a 32-bit id (attribute number in the low 16 bits,
its type in the high ones), a 32-bit length, the data and a 16-bit checksum
(the sum of the data bytes). Each attachment starts with attAttachRendData;
attAttachment holds its MAPI properties (a count, then type, id and value per
property, values padded to 4 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SIGNATURE = 0x223E9F78
LEVEL_MESSAGE = 1
LEVEL_ATTACHMENT = 2

ATT_TNEF_VERSION = 0x00089006
ATT_OEM_CODEPAGE = 0x00069007
ATT_MESSAGE_CLASS = 0x00078008
ATT_MSG_PROPS = 0x00069003
ATT_ATTACH_REND_DATA = 0x00069002
ATT_ATTACH_TITLE = 0x00018010
ATT_ATTACH_DATA = 0x0006800F
ATT_ATTACHMENT = 0x00069005

PT_LONG = 0x0003
PT_STRING8 = 0x001E
PT_UNICODE = 0x001F
PT_BINARY = 0x0102
PT_OBJECT = 0x000D

PR_ATTACH_DATA = 0x3701  # PR_ATTACH_DATA_BIN as PT_BINARY, PR_ATTACH_DATA_OBJ as PT_OBJECT
ATTACH_BY_VALUE = 1
ATTACH_EMBEDDED_MSG = 5
IID_IMESSAGE = bytes.fromhex("0703020000000000c000000000000046")
# What Outlook writes in attAttachData for an embedded message.
PLACEHOLDER = b"This attachment is a MAPI 1.0 embedded object and is not supported by this mail system."

PR_ATTACH_METHOD = 0x3705
PR_ATTACH_LONG_FILENAME = 0x3707
PR_ATTACH_MIME_TAG = 0x370E
PR_ATTACH_EXTENSION = 0x3703
PR_RTF_COMPRESSED = 0x1009


@dataclass
class File:
    title: str  # the 8.3 name of attAttachTitle
    data: bytes | None  # attAttachData (None: no such attribute)
    long_filename: str | None = None
    mime_tag: str | None = None
    data_bin: bytes | None = None  # PR_ATTACH_DATA_BIN in attAttachment
    embedded: bytes | None = None  # a TNEF message, as PR_ATTACH_DATA_OBJ with ATTACH_EMBEDDED_MSG


def attribute(level: int, attribute_id: int, data: bytes) -> bytes:
    checksum = sum(data) & 0xFFFF
    return struct.pack("<BII", level, attribute_id, len(data)) + data + struct.pack("<H", checksum)


def _padded(value: bytes) -> bytes:
    return struct.pack("<II", 1, len(value)) + value + b"\0" * (-len(value) % 4)


def mapi_properties(*properties: tuple[int, int, object]) -> bytes:
    """(type, id, value) triples as a MAPI property list: ints as PT_LONG, str and bytes counted."""
    out = struct.pack("<I", len(properties))
    for prop_type, prop_id, value in properties:
        out += struct.pack("<HH", prop_type, prop_id)
        if prop_type == PT_LONG:
            out += struct.pack("<i", value)
        elif prop_type == PT_UNICODE:
            out += _padded(value.encode("utf-16-le") + b"\0\0")
        elif prop_type == PT_STRING8:
            out += _padded(value.encode("cp1252") + b"\0")
        else:
            out += _padded(value)
    return out


def tnef(*files: File, codepage: int = 1252, rtf_body: bytes | None = None) -> bytes:
    """A winmail.dat holding C{files} (and an RTF body when given)."""
    out = struct.pack("<IH", SIGNATURE, 0x1234)
    out += attribute(LEVEL_MESSAGE, ATT_TNEF_VERSION, struct.pack("<I", 0x00010000))
    out += attribute(LEVEL_MESSAGE, ATT_OEM_CODEPAGE, struct.pack("<II", codepage, 0))
    out += attribute(LEVEL_MESSAGE, ATT_MESSAGE_CLASS, b"IPM.Microsoft Mail.Note\0")
    if rtf_body is not None:
        out += attribute(LEVEL_MESSAGE, ATT_MSG_PROPS, mapi_properties((PT_BINARY, PR_RTF_COMPRESSED, rtf_body)))
    for file in files:
        out += attribute(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, struct.pack("<HIHHI", 1, 0xFFFFFFFF, 0, 0, 0))
        out += attribute(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, file.title.encode("cp1252") + b"\0")
        if file.data is not None:
            out += attribute(LEVEL_ATTACHMENT, ATT_ATTACH_DATA, file.data)
        method = ATTACH_BY_VALUE if file.embedded is None else ATTACH_EMBEDDED_MSG
        properties: list[tuple[int, int, object]] = [(PT_LONG, PR_ATTACH_METHOD, method)]
        if file.data_bin is not None:
            properties.append((PT_BINARY, PR_ATTACH_DATA, file.data_bin))
        if file.embedded is not None:
            properties.append((PT_OBJECT, PR_ATTACH_DATA, IID_IMESSAGE + file.embedded))
        if file.long_filename is not None:
            properties.append((PT_UNICODE, PR_ATTACH_LONG_FILENAME, file.long_filename))
        if file.mime_tag is not None:
            properties.append((PT_STRING8, PR_ATTACH_MIME_TAG, file.mime_tag))
        out += attribute(LEVEL_ATTACHMENT, ATT_ATTACHMENT, mapi_properties(*properties))
    return out


def samples() -> dict[str, bytes]:
    """The TNEF samples of the tests and of C{bench.extraction_table}, by file name."""
    pdf = b"%PDF-1.4\n" + bytes(range(256)) + b"\n%%EOF\n"
    docx = b"PK\x03\x04" + b"word/document.xml" + bytes(200)
    one = tnef(File("ORDER.PDF", pdf, "Order 2024-117.pdf", "application/pdf"))
    return {
        "one-file.dat": one,
        "two-files.dat": tnef(
            File("ORDER.PDF", pdf, "Order 2024-117.pdf", "application/pdf"),
            File("NOTES.TXT", b"deliver to gate 4\r\n"),
        ),
        "long-filename.dat": tnef(
            File(
                "QUARTE~1.DOC",
                docx,
                "Quarterly order forecast for all warehouses.docx",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            )
        ),
        "umlaut-name.dat": tnef(File("BESTEL~1.TXT", "Bestellung über 5 Stück\r\n".encode("cp1252"), "Bestellübersicht.txt")),
        "rtf-body-only.dat": tnef(rtf_body=b"\x2d\x00\x00\x00\x2b\x00\x00\x00LZFu" + bytes(40)),
        "truncated.dat": one[: len(one) - 60],
    }
