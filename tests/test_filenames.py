"""Tests for L{mailingest.extraction.filenames}."""

import os
import time
import unicodedata
from email import message_from_bytes, policy

from twisted.trial.unittest import SynchronousTestCase

from mailingest.extraction.attachments import extract_attachments
from mailingest.extraction.filenames import (
    MAX_FILENAME_BYTES,
    MAX_HEADER_CHARS,
    decode_filename,
    fallback_filename,
    sanitise_filename,
)


def parsed_part(*headers: bytes):
    """A part as the extraction sees it: parsed from raw CRLF bytes."""
    return message_from_bytes(b"\r\n".join(headers) + b"\r\n\r\nbody", policy=policy.compat32)


class DecodeFilenameTests(SynchronousTestCase):
    def decode(self, *headers: bytes) -> tuple[str | None, list[str]]:
        warnings: list[str] = []
        return decode_filename(parsed_part(*headers), warnings), warnings

    def test_quoted(self):
        self.assertEqual(self.decode(b'Content-Disposition: attachment; filename="order 42.pdf"'), ("order 42.pdf", []))

    def test_no_name(self):
        self.assertEqual(self.decode(b"Content-Type: application/pdf", b"Content-Disposition: attachment"), (None, []))

    def test_content_type_name_is_the_fallback(self):
        self.assertEqual(
            self.decode(b'Content-Type: application/pdf; name="from-type.pdf"', b"Content-Disposition: attachment"),
            ("from-type.pdf", []),
        )

    def test_disposition_filename_wins(self):
        name, _ = self.decode(
            b'Content-Type: application/pdf; name="from-type.pdf"',
            b'Content-Disposition: attachment; filename="from-disposition.pdf"',
        )
        self.assertEqual(name, "from-disposition.pdf")

    def test_empty_filename_falls_back_to_name(self):
        name, _ = self.decode(
            b'Content-Type: application/pdf; name="n.pdf"', b'Content-Disposition: attachment; filename=""'
        )
        self.assertEqual(name, "n.pdf")
        self.assertEqual(self.decode(b'Content-Disposition: attachment; filename=""'), (None, []))

    def test_unquoted_with_spaces(self):
        """policy.default's parser would stop at the first space."""
        self.assertEqual(
            self.decode(b"Content-Disposition: attachment; filename=This is a test.txt"), ("This is a test.txt", [])
        )

    def test_rfc2231(self):
        self.assertEqual(
            self.decode(b"Content-Disposition: attachment; filename*=UTF-8''%C3%9Cberweisung%20M%C3%A4rz.pdf"),
            ("\u00dcberweisung M\u00e4rz.pdf", []),
        )

    def test_rfc2231_continuations_with_charset(self):
        """Encoded and plain continuations, folded, out of order, in ISO-8859-1."""
        name, warnings = self.decode(
            b"Content-Disposition: attachment;\r\n"
            b"\tfilename*1*=%E9%20Fran%E7ais;\r\n"
            b"\tfilename*0*=iso-8859-1'fr'R%E9sum;\r\n"
            b'\tfilename*2=" final.pdf"'
        )
        self.assertEqual((name, warnings), ("R\u00e9sum\u00e9 Fran\u00e7ais final.pdf", []))

    def test_rfc2231_utf8_continuations(self):
        name, _ = self.decode(
            b"Content-Disposition: attachment;\r\n"
            b" filename*0*=utf-8''%E3%81%8B%E3%81%8D%E3%81%8F;\r\n"
            b" filename*1*=%E3%81%91%E3%81%93.txt"
        )
        self.assertEqual(name, "\u304b\u304d\u304f\u3051\u3053.txt")

    def test_rfc2231_unknown_charset(self):
        """The bytes are read as UTF-8 if they can be, else windows-1252 / latin-1."""
        self.assertEqual(
            self.decode(b"Content-Disposition: attachment; filename*=x-unknown''Eelanal%FC%FCsi.jpg"),
            ("Eelanal\u00fc\u00fcsi.jpg", ["undecodable charset in filename"]),
        )
        self.assertEqual(
            self.decode(b"Content-Disposition: attachment; filename*=x-unknown''%C3%BC.jpg"),
            ("\u00fc.jpg", ["undecodable charset in filename"]),
        )

    def test_rfc2231_bytes_invalid_in_charset(self):
        name, warnings = self.decode(b"Content-Type: application/octet-stream; name*=iso-2022-jp'ja'Dij%8aat.mp3")
        self.assertEqual(name, "Dij\ufffdat.mp3")
        self.assertEqual(warnings, ["filename bytes invalid in their charset, replaced"])

    def test_rfc2047_unquoted(self):
        self.assertEqual(
            self.decode(b"Content-Disposition: attachment; filename==?utf-8?B?VGhpcyBpcyBhIHRlc3QucGRm?="),
            ("This is a test.pdf", []),
        )

    def test_rfc2047_in_content_type_name(self):
        name, _ = self.decode(b'Content-Type: application/pdf; name="=?iso-8859-1?Q?R=E9sum=E9.pdf?="')
        self.assertEqual(name, "R\u00e9sum\u00e9.pdf")

    def test_rfc2047_inside_quoted_filename(self):
        """Forbidden by RFC 2047 section 5, sent by real clients all the same."""
        name, _ = self.decode(b'Content-Disposition: attachment; filename="=?UTF-8?B?w5xiZXJ3ZWlzdW5nLnBkZg==?="')
        self.assertEqual(name, "\u00dcberweisung.pdf")

    def test_rfc2047_folded_words_and_plain_text(self):
        name, _ = self.decode(
            b'Content-Disposition: attachment; filename="Rechnung =?UTF-8?Q?M=C3=A4rz?=\r\n'
            b'        =?UTF-8?Q?_2024?= final.pdf"'
        )
        self.assertEqual(name, "Rechnung M\u00e4rz 2024 final.pdf")

    def test_rfc2047_unknown_charset(self):
        name, warnings = self.decode(b'Content-Disposition: attachment; filename="=?x-bogus?Q?R=E9sum=E9.pdf?="')
        self.assertEqual(name, "R\u00e9sum\u00e9.pdf")
        self.assertEqual(warnings, ["undecodable charset in filename"])

    def test_literal_question_marks_are_not_encoded_words(self):
        self.assertEqual(self.decode(b'Content-Disposition: attachment; filename="a=?b.pdf"'), ("a=?b.pdf", []))

    def test_raw_utf8(self):
        self.assertEqual(
            self.decode('Content-Disposition: attachment; filename="ci\u00eble.txt"'.encode()), ("ci\u00eble.txt", [])
        )

    def test_raw_legacy_8bit(self):
        name, warnings = self.decode(
            'Content-Disposition: attachment; filename="ci\u00eble \u2013 1.txt"'.encode("cp1252")
        )
        self.assertEqual((name, warnings), ("ci\u00eble \u2013 1.txt", ["undecodable charset in filename"]))

    def test_garbled_parameters(self):
        """The stdlib raises on this mix; the part simply has no usable name."""
        name, warnings = self.decode(
            b"Content-Disposition: attachment; filename*=utf-8''b.pdf; filename*0=x; filename*1=y"
        )
        self.assertIsNone(name)
        self.assertEqual(warnings, ["unreadable filename parameter"])


    def test_long_header_is_cut(self):
        name, warnings = self.decode(b'Content-Disposition: attachment; filename="' + b"a" * 10_000 + b'.pdf"')
        self.assertEqual(name, '"' + "a" * (MAX_HEADER_CHARS - len('attachment; filename="')))  # the quote never closes
        self.assertEqual(warnings, [f"content-disposition header longer than {MAX_HEADER_CHARS} characters, the rest ignored"])

    def test_names_still_decoded_after_a_semicolon_inside_quotes(self):
        name, _ = self.decode(b'Content-Disposition: attachment; filename="a;b.pdf"; size=3')
        self.assertEqual(name, "a;b.pdf")


class HostileFilenameTimeTests(SynchronousTestCase):
    """Headers that made the stdlib's parameter and RFC 2047 parsers quadratic."""

    def assertParsedQuickly(self, *parts: bytes) -> list[str]:
        body = b"".join(b"--B\r\n" + part + b"\r\n\r\n%PDF\r\n" for part in parts)
        raw = os.path.abspath(self.mktemp())
        with open(raw, "wb") as f:
            f.write(b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + body + b"--B--\r\n")
        self.assertLess(os.path.getsize(raw), 1_000_000)
        out = os.path.abspath(self.mktemp())
        os.mkdir(out)
        started = time.process_time()  # CPU time: a loaded machine must not fail the test, only a quadratic parse
        result = extract_attachments(raw, out)
        self.assertLess(time.process_time() - started, 2.0)
        self.assertEqual(len(result.attachments), len(parts))
        return result.warnings

    def test_unclosed_encoded_words(self):
        """The attack message: three parts, 369 KB, 40 s in a worker before."""
        part = b'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="' + b"=?a?q?x" * 17_554
        self.assertParsedQuickly(part, part, part)

    def test_semicolons_inside_quotes(self):
        """A megabyte of parts whose names hold a semicolon every character."""
        name = b'"' + b";" * 7000
        part = b"Content-Type: application/pdf; name=" + name + b"\r\nContent-Disposition: attachment; filename=" + name
        self.assertParsedQuickly(*[part] * 70)


class SanitiseFilenameTests(SynchronousTestCase):
    def assertSafe(self, name: str) -> None:
        self.assertTrue(name)
        self.assertNotIn("/", name)
        self.assertNotIn("\\", name)
        self.assertFalse(name.startswith("."))
        self.assertFalse(name.endswith((".", " ")))
        self.assertFalse(any(unicodedata.category(c) in ("Cc", "Cs") for c in name), repr(name))
        self.assertLessEqual(len(name.encode("utf-8")), MAX_FILENAME_BYTES)
        self.assertEqual(name, unicodedata.normalize("NFC", name))

    def test_ordinary_names_unchanged(self):
        for name in ["order.pdf", "Preisliste 2024 (final).xlsx", "\u304b\u304d.txt", "r\u00e9sum\u00e9.docx"]:
            self.assertEqual(sanitise_filename(name), name)

    def test_path_traversal(self):
        """Only the last path component is kept, as browsers do with uploaded files."""
        self.assertEqual(sanitise_filename("../../etc/passwd"), "passwd")
        self.assertEqual(sanitise_filename("..\\..\\boot.ini"), "boot.ini")
        self.assertEqual(sanitise_filename("C:\\Users\\me\\Desktop\\order.pdf"), "order.pdf")
        self.assertEqual(sanitise_filename("/etc/"), "etc")
        self.assertEqual(sanitise_filename("report.pdf/.."), "report.pdf")

    def test_control_characters(self):
        self.assertEqual(sanitise_filename("in\x00voice\x07\x7f\x9b.pdf"), "invoice.pdf")
        self.assertEqual(sanitise_filename("line\r\nbreak\tand\x0btab.pdf"), "line break and tab.pdf")

    def test_bidi_override(self):
        self.assertEqual(sanitise_filename("invoice\u202efdp.exe"), "invoicefdp.exe")

    def test_lone_surrogates(self):
        self.assertEqual(sanitise_filename("a\udcff.pdf"), "a.pdf")

    def test_leading_dots(self):
        self.assertEqual(sanitise_filename(".htaccess"), "htaccess")
        self.assertEqual(sanitise_filename(" . .bashrc"), "bashrc")

    def test_trailing_dots_and_spaces(self):
        self.assertEqual(sanitise_filename("report.pdf. . "), "report.pdf")

    def test_whitespace_collapsed(self):
        self.assertEqual(sanitise_filename("  a \u00a0  b\u3000.pdf "), "a b .pdf")

    def test_nfc(self):
        self.assertEqual(sanitise_filename("U\u0308berweisung.pdf"), "\u00dcberweisung.pdf")

    def test_long_name_keeps_extension(self):
        name = sanitise_filename("a" * 1000 + ".pdf")
        self.assertEqual(name, "a" * 251 + ".pdf")
        name = sanitise_filename("\u00fc" * 1000 + ".pdf")
        self.assertEqual(name, "\u00fc" * 125 + ".pdf")
        name = sanitise_filename("\u304b" * 1000 + ".xlsx")
        self.assertEqual(name, "\u304b" * 83 + ".xlsx")

    def test_long_name_without_usable_extension(self):
        self.assertEqual(sanitise_filename("a" * 1000), "a" * 255)
        self.assertSafe(sanitise_filename("a." + "b" * 1000))

    def test_nothing_left(self):
        for name in ["", "   ", ".", "...", "../..", "/", "\x00\x01", "\u202e"]:
            self.assertEqual(sanitise_filename(name), "attachment")
            self.assertEqual(sanitise_filename(name, "attachment-3.pdf"), "attachment-3.pdf")

    def test_hostile_names_are_safe(self):
        hostile = [
            "../../etc/passwd",
            "..\\..\\boot.ini",
            "\x00",
            ".htaccess",
            "a" * 1000,
            "\u00fc" * 300 + "." + "x" * 20,
            "...pdf",
            "a/\x00/..",
            " .\t.\n.",
            "\ud800\udc00.pdf",
            "x" * 300 + "\u0301" * 300 + ".pdf",
            "name.\u202e",
        ]
        for name in hostile:
            self.assertSafe(sanitise_filename(name))


class FallbackFilenameTests(SynchronousTestCase):
    def test_extensions(self):
        cases = {
            "application/pdf": "attachment-2.pdf",
            "APPLICATION/PDF": "attachment-2.pdf",
            "text/csv": "attachment-2.csv",
            "application/octet-stream": "attachment-2.bin",
            "application/x-never-registered": "attachment-2.bin",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "attachment-2.xlsx",
            "image/jpeg": "attachment-2.jpg",
            "message/rfc822": "attachment-2.eml",
            "application/ms-tnef": "attachment-2.dat",
        }
        for content_type, expected in cases.items():
            self.assertEqual(fallback_filename(2, content_type), expected)
