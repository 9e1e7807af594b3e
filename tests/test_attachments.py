"""Tests for L{mailingest.extraction.attachments}."""

import ast
import base64
import binascii
import hashlib
import os
import quopri
import random
import struct
import time
import tracemalloc
from email import errors, message_from_bytes, policy
from email.feedparser import BytesFeedParser
from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailingest.extraction import attachments, decoding, documents, mimeparse
from mailingest.extraction.attachments import Attachment, ExtractionResult, UnparseableMessage, extract_attachments
from mailingest.extraction.filenames import MAX_FILENAME_BYTES
from tests import tnef_builder
from tnefparse.mapi import IMESSAGE_SIG, decode_mapi
from tnefparse.tnef import TNEF
from tests.corpus import sample_messages


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def entity(*headers: str, body: bytes = b"") -> bytes:
    """One MIME entity: its headers, a blank line, its body (CRLF throughout)."""
    return "".join(h + "\r\n" for h in headers).encode("utf-8", "surrogateescape") + b"\r\n" + body


def multipart(*parts: bytes, subtype: str = "mixed", boundary: str = "b-mixed") -> bytes:
    body = b"preamble\r\n"
    for part in parts:
        body += b"--" + boundary.encode() + b"\r\n" + part + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\n"
    return entity(f'Content-Type: multipart/{subtype}; boundary="{boundary}"', body=body)


def message(body_entity: bytes) -> bytes:
    """A complete message as the daemon stores it: our Received header first."""
    return (
        b"Received: from mx.example.net by ingest.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: Buyer <buyer@example.net>\r\n"
        b"To: orders+acme@ingest.example.com\r\n"
        b"Subject: order\r\n"
        b"Message-ID: <1@example.net>\r\n"
        b"MIME-Version: 1.0\r\n" + body_entity
    )


def text_body(text: str = "Please find the order attached.") -> bytes:
    return entity("Content-Type: text/plain; charset=utf-8", body=text.encode())


def pdf_part(filename: str | None = "order.pdf", data: bytes = PDF, disposition: str = "attachment") -> bytes:
    if filename is None:
        return entity(
            "Content-Type: application/pdf",
            f"Content-Disposition: {disposition}",
            "Content-Transfer-Encoding: base64",
            body=b64(data),
        )
    return entity(
        f'Content-Type: application/pdf; name="{filename}"',
        f'Content-Disposition: {disposition}; filename="{filename}"',
        "Content-Transfer-Encoding: base64",
        body=b64(data),
    )


def forwarded(inner: bytes, filename: str | None = "Fwd.eml") -> bytes:
    disposition = (
        f'Content-Disposition: attachment; filename="{filename}"' if filename else "Content-Disposition: inline"
    )
    return entity("Content-Type: message/rfc822", disposition, body=inner)


class ExtractionTestCase(SynchronousTestCase):
    def extract(self, raw: bytes, **kwargs) -> ExtractionResult:
        raw_path = self.mktemp()
        with open(raw_path, "wb") as f:
            f.write(raw)
        self.out_dir = self.mktemp()
        os.makedirs(self.out_dir)
        result = extract_attachments(raw_path, self.out_dir, **kwargs)
        self.assertWellFormed(result)
        return result

    def assertWellFormed(self, result: ExtractionResult) -> None:
        """Every document is a file named by its index in out_dir, described truthfully."""
        self.assertIsInstance(result, ExtractionResult)
        for index, attachment in enumerate(result.attachments):
            self.assertIsInstance(attachment, Attachment)
            self.assertEqual(attachment.path, os.path.join(self.out_dir, f"{index}.bin"))
            with open(attachment.path, "rb") as f:
                data = f.read()
            self.assertEqual(attachment.size, len(data))
            self.assertEqual(attachment.sha256, hashlib.sha256(data).hexdigest())
            self.assertTrue(attachment.filename)
            self.assertNotIn("/", attachment.filename)
            self.assertNotIn("\\", attachment.filename)
            self.assertFalse(attachment.filename.startswith("."))
            self.assertLessEqual(len(attachment.filename.encode("utf-8")), MAX_FILENAME_BYTES)
            self.assertEqual(attachment.content_type, attachment.content_type.lower())
        self.assertEqual(sorted(os.listdir(self.out_dir)), sorted(f"{i}.bin" for i in range(len(result.attachments))))
        if not result.attachments:
            self.assertIn("no attachments", result.warnings)

    def names(self, result: ExtractionResult) -> list[str]:
        return [a.filename for a in result.attachments]

    def data(self, attachment: Attachment) -> bytes:
        with open(attachment.path, "rb") as f:
            return f.read()


class DocumentSelectionTests(ExtractionTestCase):
    def test_pdf(self):
        msg = EmailMessage()
        msg["From"] = "buyer@example.net"
        msg["To"] = "orders+acme@ingest.example.com"
        msg.set_content("Order attached.")
        msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="PO-1042.pdf")
        result = self.extract(msg.as_bytes(policy=policy.SMTP))
        self.assertEqual(result.warnings, [])
        [pdf] = result.attachments
        self.assertEqual((pdf.filename, pdf.content_type, pdf.size), ("PO-1042.pdf", "application/pdf", len(PDF)))
        self.assertEqual(pdf.sha256, hashlib.sha256(PDF).hexdigest())
        self.assertEqual(self.data(pdf), PDF)

    def test_spreadsheet(self):
        xlsx = b"PK\x03\x04" + random.Random(1).randbytes(5000)
        msg = EmailMessage()
        msg.set_content("Prices.")
        msg.add_attachment(xlsx, maintype="application", subtype=XLSX_TYPE.split("/")[1], filename="prices.xlsx")
        [sheet] = self.extract(msg.as_bytes(policy=policy.SMTP)).attachments
        self.assertEqual((sheet.filename, sheet.content_type), ("prices.xlsx", XLSX_TYPE))
        self.assertEqual(self.data(sheet), xlsx)

    def test_csv_attachment(self):
        csv = b"sku;qty\n4711;12\n\xe9t\xe9;3\n"
        msg = EmailMessage()
        msg.set_content("Order attached.")
        msg.add_attachment(csv, maintype="text", subtype="csv", filename="order.csv")
        [doc] = self.extract(msg.as_bytes(policy=policy.SMTP)).attachments
        self.assertEqual((doc.filename, doc.content_type), ("order.csv", "text/csv"))
        self.assertEqual(self.data(doc), csv)

    def test_7bit_csv_without_filename(self):
        """An attachment's bytes as sent, CRLF included; its name comes from its type."""
        csv = b"sku,qty\r\n4711,12\r\n"
        raw = message(
            multipart(text_body(), entity("Content-Type: text/csv", "Content-Disposition: attachment", body=csv))
        )
        [doc] = self.extract(raw).attachments
        self.assertEqual((doc.filename, doc.content_type), ("attachment-1.csv", "text/csv"))
        self.assertEqual(self.data(doc), csv)

    def test_text_with_filename_keeps_its_bytes(self):
        """Decoded from quoted-printable only, never re-encoded through its charset."""
        raw = message(
            multipart(
                text_body(),
                entity(
                    'Content-Type: text/plain; charset="iso-8859-1"; name="notes.txt"',
                    "Content-Transfer-Encoding: quoted-printable",
                    body=b"caf=E9 cr=E8me=\r\n br=FBl=E9e\r\n",
                ),
            )
        )
        [doc] = self.extract(raw).attachments
        self.assertEqual(doc.filename, "notes.txt")
        self.assertEqual(self.data(doc), b"caf\xe9 cr\xe8me br\xfbl\xe9e\r\n")

    def test_bodies_are_not_documents(self):
        raw = message(
            multipart(
                text_body(),
                entity("Content-Type: text/html; charset=utf-8", body=b"<p>Hello</p>"),
                subtype="alternative",
            )
        )
        result = self.extract(raw)
        self.assertEqual(result.attachments, [])
        self.assertEqual(result.warnings, ["no attachments"])

    def test_garbage_disposition_is_ignored(self):
        raw = message(entity("Content-Type: text/html", "Content-Disposition: =?utf-8?Q?invalid?=", body=b"<p>Hi</p>"))
        self.assertEqual(self.extract(raw).attachments, [])

    def test_inline_logo_in_related_is_skipped(self):
        logo = entity(
            "Content-Type: image/png",
            "Content-ID: <logo@example.net>",
            "Content-Transfer-Encoding: base64",
            body=b64(b"\x89PNG logo"),
        )
        html = entity("Content-Type: text/html", body=b'<img src="cid:logo@example.net">')
        raw = message(multipart(multipart(html, logo, subtype="related", boundary="b-rel"), pdf_part()))
        result = self.extract(raw)
        self.assertEqual(self.names(result), ["order.pdf"])

    def test_related_image_marked_attachment_is_kept(self):
        scan = entity(
            "Content-Type: image/jpeg",
            "Content-ID: <scan@example.net>",
            'Content-Disposition: attachment; filename="scan.jpg"',
            "Content-Transfer-Encoding: base64",
            body=b64(b"\xff\xd8\xff scan"),
        )
        raw = message(multipart(entity("Content-Type: text/html", body=b"<p>scan</p>"), scan, subtype="related"))
        self.assertEqual(self.names(self.extract(raw)), ["scan.jpg"])

    def test_inline_image_beside_text_is_a_document(self):
        """A mail client shows it as an attachment: nothing in the message displays it."""
        image = entity(
            "Content-Type: image/jpeg",
            'Content-Disposition: inline; filename="photo.jpg"',
            "Content-Transfer-Encoding: base64",
            body=b64(b"\xff\xd8\xff photo"),
        )
        [doc] = self.extract(message(multipart(text_body(), image))).attachments
        self.assertEqual((doc.filename, doc.disposition), ("photo.jpg", "inline"))

    def test_image_without_disposition_is_a_document(self):
        image = entity("Content-Type: image/tiff", "Content-Transfer-Encoding: base64", body=b64(b"II*\x00 fax"))
        [doc] = self.extract(message(multipart(text_body(), image))).attachments
        self.assertEqual((doc.filename, doc.content_type), ("attachment-1.tiff", "image/tiff"))

    def test_apple_mail_inline_pdf_is_kept(self):
        raw = message(multipart(text_body(), pdf_part("x.pdf", disposition="inline"), text_body("Thanks")))
        [doc] = self.extract(raw).attachments
        self.assertEqual((doc.filename, doc.content_type), ("x.pdf", "application/pdf"))
        self.assertEqual(self.data(doc), PDF)

    def test_tnef_is_a_document(self):
        tnef = entity(
            'Content-Type: application/ms-tnef; name="winmail.dat"',
            "Content-Transfer-Encoding: base64",
            body=b64(b"\x78\x9f\x3e\x22 tnef"),
        )
        [doc] = self.extract(message(multipart(text_body(), tnef))).attachments
        self.assertEqual((doc.filename, doc.content_type), ("winmail.dat", "application/ms-tnef"))

    def test_single_part_message_that_is_a_document(self):
        raw = message(entity("Content-Type: application/pdf", "Content-Transfer-Encoding: base64", body=b64(PDF)))
        [doc] = self.extract(raw).attachments
        self.assertEqual((doc.filename, self.data(doc)), ("attachment-1.pdf", PDF))

    def test_message_order_and_generated_names(self):
        raw = message(
            multipart(
                text_body(),
                pdf_part("first.pdf"),
                pdf_part(None),
                entity(
                    "Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64", body=b64(b"\x00\x01")
                ),
                pdf_part("last.pdf"),
            )
        )
        self.assertEqual(
            self.names(self.extract(raw)), ["first.pdf", "attachment-2.pdf", "attachment-3.bin", "last.pdf"]
        )

    def test_no_attachments(self):
        result = self.extract(message(text_body()))
        self.assertEqual((result.attachments, result.warnings), ([], ["no attachments"]))

    def test_empty_file(self):
        result = self.extract(b"")
        self.assertEqual((result.attachments, result.warnings), ([], ["no attachments"]))

    def test_not_a_mime_message(self):
        """An Outlook .msg sent as is, say: no headers, nothing to extract."""
        result = self.extract(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + random.Random(2).randbytes(4096))
        self.assertEqual(result.attachments, [])


class ForwardedMessageTests(ExtractionTestCase):
    def inner(self, *parts: bytes, subject: str = "inner") -> bytes:
        return (f"From: supplier@example.org\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n").encode() + multipart(
            text_body("forwarded text"), *parts, boundary=f"b-{subject}"
        )

    def test_attachments_inside_are_extracted(self):
        raw = message(multipart(text_body(), forwarded(self.inner(pdf_part("inner.pdf")))))
        result = self.extract(raw)
        self.assertEqual(self.names(result), ["Fwd.eml", "inner.pdf"])
        self.assertEqual(result.attachments[0].content_type, "message/rfc822")
        self.assertEqual(self.data(result.attachments[1]), PDF)
        self.assertIn(b"Subject: inner\r\n", self.data(result.attachments[0]))

    def test_inline_forward_is_walked_only(self):
        raw = message(multipart(text_body(), forwarded(self.inner(pdf_part("inner.pdf")), filename=None)))
        self.assertEqual(self.names(self.extract(raw)), ["inner.pdf"])

    def test_built_with_email_package(self):
        inner = EmailMessage()
        inner["Subject"] = "quote"
        inner.set_content("see quote")
        inner.add_attachment(PDF, maintype="application", subtype="pdf", filename="quote.pdf")
        outer = EmailMessage()
        outer.set_content("forwarding")
        outer.add_attachment(inner, filename="quote.eml")
        self.assertEqual(self.names(self.extract(outer.as_bytes(policy=policy.SMTP))), ["quote.eml", "quote.pdf"])

    def test_nested_two_deep(self):
        deepest = self.inner(pdf_part("two.pdf"), subject="deepest")
        middle = self.inner(pdf_part("one.pdf"), forwarded(deepest), subject="middle")
        raw = message(multipart(text_body(), pdf_part("zero.pdf"), forwarded(middle), pdf_part("after.pdf")))
        self.assertEqual(
            self.names(self.extract(raw)), ["zero.pdf", "Fwd.eml", "one.pdf", "Fwd.eml", "two.pdf", "after.pdf"]
        )

    def test_depth_limit(self):
        deepest = self.inner(pdf_part("two.pdf"), subject="deepest")
        middle = self.inner(pdf_part("one.pdf"), forwarded(deepest), subject="middle")
        raw = message(multipart(text_body(), forwarded(middle)))
        result = self.extract(raw, max_depth=1)
        self.assertEqual(self.names(result), ["Fwd.eml", "one.pdf", "Fwd.eml"])
        self.assertEqual(result.warnings, ["part 2.3: depth limit reached, skipped"])
        result = self.extract(raw, max_depth=0)
        self.assertEqual(self.names(result), ["Fwd.eml"])
        self.assertEqual(result.warnings, ["part 2: depth limit reached, skipped"])

    def test_base64_encoded_forward(self):
        """Wrong (RFC 2046 allows no encoding there) but sent by some clients."""
        inner = self.inner(pdf_part("inner.pdf"))
        part = entity("Content-Type: message/rfc822", "Content-Transfer-Encoding: base64", body=b64(inner))
        result = self.extract(message(multipart(text_body(), part)))
        self.assertEqual(self.names(result), ["inner.pdf"])
        self.assertEqual(self.data(result.attachments[0]), PDF)

    def test_forward_that_is_not_a_message_is_kept(self):
        body = b"this is not an email\r\n\x00\x01"
        part = entity(
            "Content-Type: message/rfc822", 'Content-Disposition: attachment; filename="broken.eml"', body=body
        )
        doc, pdf = self.extract(message(multipart(text_body(), part, pdf_part()))).attachments
        self.assertEqual((doc.filename, doc.content_type), ("broken.eml", "message/rfc822"))
        self.assertEqual(self.data(doc), body)
        self.assertEqual(pdf.filename, "order.pdf")

    def test_unnamed_reports_are_not_documents(self):
        status = entity(
            "Content-Type: message/delivery-status",
            body=b"Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; a@example.org\r\n",
        )
        raw = message(multipart(text_body(), status, subtype="report"))
        self.assertEqual(self.extract(raw).attachments, [])

    def test_attached_report_is_a_document(self):
        """Issue 14, defect 6: an attached delivery report C{DSN57BAC498.txt}."""
        report = b"Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; a@example.org\r\n"
        status = entity(
            "Content-Type: message/delivery-status",
            'Content-Disposition: attachment; filename="DSN57BAC498.txt"',
            body=report,
        )
        [doc] = self.extract(message(multipart(text_body(), status, subtype="report"))).attachments
        self.assertEqual((doc.filename, doc.content_type), ("DSN57BAC498.txt", "message/delivery-status"))
        self.assertIn(b"Final-Recipient: rfc822; a@example.org", self.data(doc))


class DecodingTests(ExtractionTestCase):
    def test_every_byte_value_survives_base64(self):
        data = bytes(range(256)) * 1000 + random.Random(3).randbytes(100000)
        [doc] = self.extract(message(multipart(text_body(), pdf_part(data=data)))).attachments
        self.assertEqual(self.data(doc), data)

    def test_binary_transfer_encoding_keeps_line_endings(self):
        """CR and LF inside a binary part are data: the parser must not translate them."""
        data = b"\x00\r\x01\n\x02\r\n\x03\n\r\xff\r\rend"
        part = entity("Content-Type: application/octet-stream", "Content-Transfer-Encoding: binary", body=data)
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(self.data(doc), data)

    def test_quoted_printable(self):
        data = b"line one\r\n\x00\xff=\tend"
        part = entity(
            "Content-Type: application/octet-stream",
            "Content-Transfer-Encoding: quoted printable",
            body=quopri.encodestring(data),
        )
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(self.data(doc), data)

    def test_uuencode(self):
        data = random.Random(4).randbytes(1000)
        lines = [b"begin 644 data.bin"]
        lines += [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
        lines += [b"`", b"end"]
        part = entity(
            "Content-Type: application/octet-stream", "Content-Transfer-Encoding: x-uuencode", body=b"\r\n".join(lines)
        )
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(self.data(doc), data)

    def test_unknown_transfer_encoding_is_stored_as_is(self):
        part = entity("Content-Type: application/pdf", "Content-Transfer-Encoding: x-gzip64", body=b"H4sIAAAA")
        result = self.extract(message(multipart(text_body(), part)))
        self.assertEqual(self.data(result.attachments[0]), b"H4sIAAAA")
        self.assertEqual(result.warnings, ["part 2: unknown transfer encoding 'x-gzip64', stored undecoded"])

    def test_base64_as_the_email_package_decodes_it(self):
        """
        Decoding in chunks gives the email package's bytes, for clean and damaged
        base64 alike, wherever the chunks are cut.
        """
        data = random.Random(7).randbytes(3000)
        clean = b64(data)
        bodies = {
            "clean": clean,
            "missing padding": b64(data[:-1]).rstrip(b"="),
            "one padding character missing": b64(data[:-2])[:-1],
            "trailing spaces": clean.replace(b"\r\n", b" \t\r\n"),
            "stray characters": clean[:100] + b"!*\xe9" + clean[100:],
            "padding in the middle": b64(data[:10]) + b"\r\n" + clean,
            "bare LF": clean.replace(b"\r\n", b"\n"),
            "truncated by two": clean[:-6],
            "truncated by one": clean[:-5],
            "impossible length": clean[:-7],
            "empty": b"",
            "only whitespace": b" \r\n\t",
            "only padding": b"====",
        }
        for chunk_chars in (5, 8, 77, 1 << 20):
            self.patch(decoding, "DECODE_CHUNK_CHARS", chunk_chars)
            for label, body in bodies.items():
                part = entity("Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64", body=body)
                raw = message(multipart(text_body(), part))
                stdlib_part = message_from_bytes(raw, policy=policy.compat32).get_payload(1)
                expected = stdlib_part.get_payload(decode=True)
                if any(isinstance(d, errors.InvalidBase64LengthDefect) for d in stdlib_part.defects):
                    self.assertRaises(UnparseableMessage, self.extract, raw)
                    continue
                result = self.extract(raw)
                self.assertEqual(self.data(result.attachments[0]), expected, f"{label}, chunks of {chunk_chars}")
        self.assertEqual(len(b"".join(bodies["impossible length"].split())) % 4, 1)

    def test_clean_base64_is_streamed(self):
        """Large clean attachments never go through the whole-text decoder."""

        def refuse(data):
            raise AssertionError("decoded in one piece")

        self.patch(decoding, "DECODE_CHUNK_CHARS", 1000)
        self.patch(decoding, "_decode_base64_leniently", refuse)
        data = random.Random(5).randbytes(50000)
        [doc] = self.extract(message(multipart(text_body(), pdf_part(data=data)))).attachments
        self.assertEqual(self.data(doc), data)

    def test_repaired_base64_is_reported(self):
        body = b64(PDF[:-1]).rstrip(b"=")
        part = entity('Content-Type: application/pdf; name="a.pdf"', "Content-Transfer-Encoding: base64", body=body)
        result = self.extract(message(multipart(text_body(), part)))
        self.assertEqual(self.data(result.attachments[0]), PDF[:-1])
        self.assertEqual(result.warnings, ["part 2: base64 padding repaired"])

    def test_undecodable_base64_attachment(self):
        """The only document cannot be read: nothing of the message can, it fails."""
        body = b64(PDF[:3000]) + b"\r\nQ"  # 4n+1 base64 characters
        part = entity('Content-Type: application/pdf; name="a.pdf"', "Content-Transfer-Encoding: base64", body=body)
        error = self.assertRaises(UnparseableMessage, self.extract, message(multipart(text_body(), part)))
        self.assertEqual(str(error), "part 2 (application/pdf, 'a.pdf'): base64 content cannot be decoded, skipped")

    def test_undecodable_part_beside_a_good_one(self):
        """Issue 14, defect 4: a GIF whose base64 is a placeholder sentence, a good PDF beside it."""
        gif = entity(
            'Content-Type: image/gif; name="spacer.gif"',
            "Content-Transfer-Encoding: base64",
            body=b"The file was removed",  # 17 base64 characters: 4n+1
        )
        result = self.extract(message(multipart(text_body(), gif, pdf_part())))
        self.assertEqual(self.names(result), ["order.pdf"])
        self.assertEqual(self.data(result.attachments[0]), PDF)
        reason = "part 2 (image/gif, 'spacer.gif'): base64 content cannot be decoded, skipped"
        self.assertEqual(result.skipped, [reason])
        self.assertIn(reason, result.warnings)

    def test_undecodable_base64_body_is_ignored(self):
        """Only documents are decoded."""
        body = entity("Content-Type: text/plain", "Content-Transfer-Encoding: base64", body=b"not base64 at all.")
        result = self.extract(message(multipart(body, pdf_part())))
        self.assertEqual(self.names(result), ["order.pdf"])

    def test_uuencode_without_begin_line(self):
        part = entity("Content-Type: application/pdf", "Content-Transfer-Encoding: x-uuencode", body=b"plain text")
        self.assertRaises(UnparseableMessage, self.extract, message(multipart(text_body(), part)))


class FilenameTests(ExtractionTestCase):
    def extract_names(self, *dispositions: str) -> list[str]:
        parts = [
            entity("Content-Type: application/pdf", disposition, "Content-Transfer-Encoding: base64", body=b64(PDF))
            for disposition in dispositions
        ]
        return self.names(self.extract(message(multipart(text_body(), *parts))))

    def test_rfc2231_continuations_with_charset(self):
        names = self.extract_names(
            "Content-Disposition: attachment;\r\n"
            " filename*0*=iso-8859-1''Bestellung%20f%FCr;\r\n"
            " filename*1*=%20M%FCller.pdf"
        )
        self.assertEqual(names, ["Bestellung f\u00fcr M\u00fcller.pdf"])

    def test_rfc2047_name(self):
        part = entity(
            'Content-Type: application/pdf;\r\n name="=?UTF-8?Q?Auftragsbest=C3=A4tigung?= =?UTF-8?Q?_Nr=2E_7.pdf?="',
            "Content-Transfer-Encoding: base64",
            body=b64(PDF),
        )
        self.assertEqual(
            self.names(self.extract(message(multipart(text_body(), part)))), ["Auftragsbest\u00e4tigung Nr. 7.pdf"]
        )

    def test_encoded_words_inside_quoted_filename(self):
        names = self.extract_names('Content-Disposition: attachment; filename="=?utf-8?B?5rOo5paH5pu4LnBkZg==?="')
        self.assertEqual(names, ["\u6ce8\u6587\u66f8.pdf"])

    def test_missing_filename(self):
        self.assertEqual(
            self.extract_names("Content-Disposition: attachment", "Content-Disposition: attachment"),
            ["attachment-1.pdf", "attachment-2.pdf"],
        )

    def test_hostile_names(self):
        hostile = [
            'filename="../../etc/passwd"',
            'filename="..\\\\..\\\\boot.ini"',
            "filename*=utf-8''in%00vo%1Bi%7Fce%C2%9B.pdf",
            'filename=".htaccess"',
            'filename="' + "a" * 1000 + '.pdf"',
            'filename=""',
            "filename*=utf-8''%2E%2E%2F%2E%2E%2F",
        ]
        names = self.extract_names(*(f"Content-Disposition: attachment; {p}" for p in hostile))
        self.assertEqual(
            names,
            [
                "passwd",
                "boot.ini",
                "invoice.pdf",
                "htaccess",
                "a" * 251 + ".pdf",
                "attachment-6.pdf",
                "attachment-7.pdf",
            ],
        )
        self.assertEqual(sorted(os.listdir(self.out_dir)), [f"{i}.bin" for i in range(7)])

    def test_undecodable_charset_is_reported(self):
        result = self.extract(
            message(multipart(text_body(), pdf_part(None, disposition="attachment; filename*=x-klingon''%FCber.pdf")))
        )
        self.assertEqual(self.names(result), ["\u00fcber.pdf"])
        self.assertEqual(result.warnings, ["part 2: undecodable charset in filename"])


class MalformedStructureTests(ExtractionTestCase):
    def test_deterministic(self):
        raw = message(
            multipart(
                text_body(),
                pdf_part("../a.pdf"),
                pdf_part(None),
                forwarded(b"From: x@example.org\r\n" + multipart(pdf_part("inner.pdf"), boundary="b-in")),
                entity("Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64", body=b"QUJD"),
            )
        )
        first = self.extract(raw)
        first_files = [(os.path.basename(a.path), self.data(a)) for a in first.attachments]
        second = self.extract(raw)
        self.assertEqual(
            [(a.filename, a.content_type, a.size, a.sha256, os.path.basename(a.path)) for a in first.attachments],
            [(a.filename, a.content_type, a.size, a.sha256, os.path.basename(a.path)) for a in second.attachments],
        )
        self.assertEqual(first.warnings, second.warnings)
        self.assertEqual(first_files, [(os.path.basename(a.path), self.data(a)) for a in second.attachments])

    def test_part_limit(self):
        raw = message(multipart(*(pdf_part(f"{i}.pdf") for i in range(10))))
        result = self.extract(raw, max_parts=5)
        self.assertEqual(self.names(result), ["0.pdf", "1.pdf", "2.pdf", "3.pdf"])
        self.assertEqual(result.warnings, ["more than 5 MIME parts, the rest skipped"])

    def test_very_deep_nesting(self):
        depth = 3000
        raw = b"".join(
            f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode() for i in range(depth)
        )
        raw = b"From: x@example.org\r\n" + raw + pdf_part()
        result = self.extract(raw)
        self.assertTrue(
            {"more than 1000 MIME parts, the rest skipped", "MIME parts nested too deeply, the rest skipped"}
            & set(result.warnings),
            result.warnings,
        )

    def test_nested_multipart_reusing_the_boundary(self):
        """The inner close ends the outer one too; the parts after it are recovered."""
        inner = multipart(
            text_body(), entity("Content-Type: text/html", body=b"<p>x</p>"), subtype="alternative", boundary="same"
        )
        raw = message(multipart(inner, pdf_part("after.pdf"), boundary="same"))
        result = self.extract(raw)
        self.assertEqual(self.names(result), ["after.pdf"])
        self.assertEqual(self.data(result.attachments[0]), PDF)
        self.assertIn("message: damaged boundary, 1 part(s) recovered", result.warnings)

    def test_many_parts_after_a_reused_boundary_take_linear_memory(self):
        """Twice the parts after an early close take about twice the memory, not four times."""

        def peak(count: int) -> int:
            part = b"--same\r\n" + entity("Content-Type: text/plain", body=b"x" * 8000) + b"\r\n--same--\r\n"
            raw = message(entity('Content-Type: multipart/mixed; boundary="same"', body=part * count))
            tracemalloc.start()
            try:
                result = self.extract(raw)
                used = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertIn(f"message: damaged boundary, {count - 1} part(s) recovered", result.warnings)
            return used

        self.assertLess(peak(120), 2.5 * peak(60))

    def test_semicolons_inside_quoted_parameters_parse_quickly(self):
        """The stdlib's parameter parser is quadratic in them (6 s for this one); the boundary is still read."""
        header = 'Content-Type: multipart/mixed; x="' + ";" * 64_000 + '"; boundary="b-mixed"'
        raw = message(entity(header, body=b"--b-mixed\r\n" + pdf_part() + b"\r\n--b-mixed--\r\n"))
        started = time.monotonic()
        result = self.extract(raw)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(self.names(result), ["order.pdf"])

    def test_declared_boundary_never_used(self):
        body = b"--actual\r\n" + text_body() + b"\r\n--actual\r\n" + pdf_part("found.pdf") + b"\r\n--actual--\r\n"
        raw = message(entity('Content-Type: multipart/mixed; boundary="declared"', body=body))
        result = self.extract(raw)
        self.assertEqual(self.names(result), ["found.pdf"])
        self.assertIn("part 1: damaged boundary, 2 part(s) recovered", result.warnings)

    def test_missing_boundary_parameter(self):
        body = b"--x\r\n" + pdf_part("found.pdf") + b"\r\n--x--\r\n"
        result = self.extract(message(entity("Content-Type: multipart/mixed", body=body)))
        self.assertEqual(self.names(result), ["found.pdf"])

    def test_malformed_parts_are_reported(self):
        raw = message(entity('Content-Type: multipart/mixed; boundary="never"', body=b"just text\r\n"))
        result = self.extract(raw)
        self.assertEqual(result.attachments, [])
        self.assertIn(
            "message: malformed MIME (StartBoundaryNotFoundDefect, MultipartInvariantViolationDefect)", result.warnings
        )

    def test_unreadable_boundary_parameter(self):
        """The email package raises reading this boundary; it counts as missing, and the body shows the real one."""
        raw = (
            b"From: x@example.org\r\n"
            b"Content-Type: multipart/mixed; boundary*0=a; boundary*=b\r\n"
            b"\r\n--a\r\n" + pdf_part() + b"\r\n--a--\r\n"
        )
        self.assertEqual(self.names(self.extract(raw)), ["order.pdf"])

    def test_parser_error(self):
        """A parser that fails on the input fails the message, for good."""

        class BrokenParser(mimeparse.LineRunBytesFeedParser):
            def feed(self, data):
                raise IndexError("parser bug")

        self.patch(mimeparse, "LineRunBytesFeedParser", BrokenParser)
        error = self.assertRaises(UnparseableMessage, self.extract, message(text_body()))
        self.assertEqual(str(error), "the MIME structure cannot be parsed (IndexError: parser bug)")


class CorpusTests(ExtractionTestCase):
    def test_corpus(self):
        """Every sample extracts (well formed, see assertWellFormed) or fails with L{UnparseableMessage}."""
        samples = sample_messages()
        self.assertGreater(len(samples), 100)
        for path in samples:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                self.extract(raw)
            except UnparseableMessage:
                pass


def tnef_part(data: bytes, name: str | None = "winmail.dat", content_type: str = "application/ms-tnef") -> bytes:
    headers = [f'Content-Type: {content_type}; name="{name}"' if name else f"Content-Type: {content_type}"]
    return entity(*headers, "Content-Transfer-Encoding: base64", body=b64(data))


class TnefTests(ExtractionTestCase):
    """Issue 14, defect 1: the files inside Outlook's winmail.dat, built by L{tests.tnef_builder}."""

    def extract_tnef(self, sample: str, **part) -> ExtractionResult:
        return self.extract(message(multipart(text_body(), tnef_part(tnef_builder.samples()[sample], **part))))

    def test_one_file(self):
        [doc] = self.extract_tnef("one-file.dat").attachments
        self.assertEqual((doc.filename, doc.content_type), ("Order 2024-117.pdf", "application/pdf"))
        self.assertTrue(self.data(doc).startswith(b"%PDF-1.4\n"))

    def test_two_files(self):
        result = self.extract_tnef("two-files.dat")
        self.assertEqual(self.names(result), ["Order 2024-117.pdf", "NOTES.TXT"])
        self.assertEqual(result.attachments[1].content_type, "text/plain")
        self.assertEqual(self.data(result.attachments[1]), b"deliver to gate 4\r\n")

    def test_long_filename_over_the_8_3_title(self):
        [doc] = self.extract_tnef("long-filename.dat").attachments
        self.assertEqual(doc.filename, "Quarterly order forecast for all warehouses.docx")
        self.assertEqual(doc.content_type, "application/vnd.openxmlformats-officedocument.wordprocessingml.document")

    def test_umlaut_name(self):
        [doc] = self.extract_tnef("umlaut-name.dat").attachments
        self.assertEqual((doc.filename, doc.original_filename), ("Bestellübersicht.txt", "Bestellübersicht.txt"))
        self.assertEqual(self.data(doc), "Bestellung über 5 Stück\r\n".encode("cp1252"))

    def test_rtf_body_only_keeps_the_tnef_part(self):
        [doc] = self.extract_tnef("rtf-body-only.dat").attachments
        self.assertEqual((doc.filename, doc.content_type), ("winmail.dat", "application/ms-tnef"))

    def test_truncated_keeps_what_was_read(self):
        result = self.extract_tnef("truncated.dat")
        self.assertEqual(self.names(result), ["ORDER.PDF"])
        self.assertIn("part 2: TNEF: truncated, the rest skipped", result.warnings)

    def test_found_by_name_whatever_its_type(self):
        result = self.extract_tnef("two-files.dat", content_type="application/octet-stream")
        self.assertEqual(self.names(result), ["Order 2024-117.pdf", "NOTES.TXT"])

    def test_not_tnef_is_kept_as_it_is(self):
        result = self.extract(message(multipart(text_body(), tnef_part(b"not a TNEF stream"))))
        self.assertEqual(self.names(result), ["winmail.dat"])
        self.assertIn("part 2: not TNEF, kept as it is", result.warnings)

    def test_attach_data_property_wins_over_attribute(self):
        """Issue 23, item 1: PR_ATTACH_DATA_BIN is the file, cut to its size (not its 4-byte padding)."""
        pdf = b"%PDF-1.4\n" + bytes(range(200)) + b"%%EOF\r"
        data = tnef_builder.tnef(tnef_builder.File("ORDER.PDF", b"an older copy", "Order.pdf", data_bin=pdf))
        self.assertTrue(pdf + b"\0" in data and len(pdf) % 4)
        [doc] = self.extract(message(multipart(text_body(), tnef_part(data)))).attachments
        self.assertEqual((doc.filename, doc.size, self.data(doc)), ("Order.pdf", len(pdf), pdf))

    def test_embedded_message_gives_its_attachments(self):
        """Issue 23, item 1: an embedded message (ATTACH_EMBEDDED_MSG) gives its files, not Outlook's placeholder."""
        inner = tnef_builder.tnef(
            tnef_builder.File("ORDER.PDF", None, "Order 7.pdf", data_bin=PDF),
            tnef_builder.File("NOTES.TXT", b"gate 4\r\n"),
        )
        outer = tnef_builder.tnef(
            tnef_builder.File("INVOICE.TXT", b"invoice\r\n"),
            tnef_builder.File("Untitled Attachment", tnef_builder.PLACEHOLDER, embedded=inner),
        )
        result = self.extract(message(multipart(text_body(), tnef_part(outer))))
        self.assertEqual(self.names(result), ["INVOICE.TXT", "Order 7.pdf", "NOTES.TXT"])
        self.assertEqual(self.data(result.attachments[1]), PDF)
        self.assertNotIn(tnef_builder.PLACEHOLDER, [self.data(a) for a in result.attachments])

    def test_embedded_messages_within_the_depth_and_part_budgets(self):
        data = tnef_builder.tnef(tnef_builder.File("L6.TXT", b"6"))
        for level in range(5, -1, -1):
            data = tnef_builder.tnef(
                tnef_builder.File(f"L{level}.TXT", str(level).encode()),
                tnef_builder.File("Untitled Attachment", tnef_builder.PLACEHOLDER, embedded=data),
            )
        result = self.extract(message(multipart(text_body(), tnef_part(data))))
        self.assertEqual(self.names(result), [f"L{level}.TXT" for level in range(6)])
        self.assertIn("part 2: TNEF: messages embedded more than 5 deep, skipped", result.warnings)
        result = self.extract(message(multipart(text_body(), tnef_part(data))), max_parts=6)
        # The message, the multipart, the text body: three parts, three files left.
        self.assertEqual(self.names(result), ["L0.TXT", "L1.TXT", "L2.TXT"])
        self.assertTrue(any(w.startswith("part 2: TNEF: more than 1 files") for w in result.warnings), result.warnings)

    def test_absurd_counts_are_bounded(self):
        """A property count of 2**32 over a few bytes, and 5,000 files: read in linear time, bounded."""
        absurd = struct.pack("<IH", tnef_builder.SIGNATURE, 1) + tnef_builder.attribute(
            2, tnef_builder.ATT_ATTACH_REND_DATA, bytes(14)
        )
        absurd += tnef_builder.attribute(2, tnef_builder.ATT_ATTACH_DATA, b"data")
        absurd += tnef_builder.attribute(
            2, tnef_builder.ATT_ATTACHMENT, struct.pack("<IHHI", 0xFFFFFFFF, 0x1002, 0x3707, 0xFFFFFFFF) + bytes(8)
        )
        many = struct.pack("<IH", tnef_builder.SIGNATURE, 1) + 5000 * (
            tnef_builder.attribute(2, tnef_builder.ATT_ATTACH_REND_DATA, bytes(14))
            + tnef_builder.attribute(2, tnef_builder.ATT_ATTACH_DATA, b"x")
        )
        started = time.monotonic()
        result = self.extract(message(multipart(text_body(), tnef_part(absurd), tnef_part(many), pdf_part())), max_parts=100)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("part 2: TNEF: an attachment's MAPI properties are damaged, ignored", result.warnings)
        # The TNEF files count against max_parts like MIME parts.
        self.assertTrue(any(w.startswith("part 3: TNEF: more than ") for w in result.warnings), result.warnings)
        self.assertLessEqual(len(result.attachments), 100)
        self.assertEqual(result.attachments[0].filename, "attachment-1.bin")
        self.assertEqual(result.attachments[-1].filename, "order.pdf")


TNEF_DATA = os.path.join(os.path.dirname(__file__), "data", "tnef")
# Every document of each real winmail.dat in tests/data/tnef (see its LICENSES): name, type, size, sha256.
# A winmail.dat with no file inside (only a body, a distribution list) is kept whole.
REAL_TNEF_DOCUMENTS = {
    'IPM-DistList.tnef': [
        ('winmail.dat', 'application/ms-tnef', 28629, 'ec54bb032c3062078193ed4fd5d23c904ef5dd4fbe2b2bd57b9b8d3c11c66ee5'),
    ],
    'MAPI_ATTACH_DATA_OBJ.tnef': [
        ('VIA_Nytt_1402.doc', 'application/msword', 61952, '9955935516d1407e0f833d91242f7416c68a66eae69e73d855ae17724e04fe60'),
        ('VIA_Nytt_1402.pdf', 'application/pdf', 213685, '968c9c4a8a6a02ff9a6c4e2621d5f5d512593a30d57379f704c4274ead48d72e'),
        ('VIA_Nytt_14021.htm', 'text/html', 68919, 'c2ee04f99e59079afa8661913dbd8b9002ea005c7540aaec85a67ed113e9a7b8'),
    ],
    'MAPI_OBJECT.tnef': [
        ('Untitled_Attachment', 'application/octet-stream', 628224, 'f89a1afbdfb2fc38b8888b8e0fd84509a801fa6d5491306f6f8d34a3d62931e3'),
    ],
    'bad_checksum.tnef': [
        ('image001.png', 'image/png', 1533127, 'b9bdadaf568ade343cbe80e04412a4d5bde780133311c8f7e14ca456e7371a2e'),
    ],
    'body.tnef': [
        ('winmail.dat', 'application/ms-tnef', 7769, '4b359d052533280415538bcc807a73bcf4363a816a10d6ab05fe9c9975f352ea'),
    ],
    'data-before-name.tnef': [
        ('AUTOEXEC.BAT', 'text/plain', 0, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'),
        ('CONFIG.SYS', 'application/octet-stream', 0, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'),
        ('boot.ini', 'application/octet-stream', 289, 'a815374e31481bbb939d99e73ecfe1de7914363ecd5c670c60a9022474251bce'),
    ],
    'duplicate_filename.tnef': [
        ('file_abcdefgh.txt', 'text/plain', 61952, '9955935516d1407e0f833d91242f7416c68a66eae69e73d855ae17724e04fe60'),
        ('file_abcdefgh.txt', 'text/plain', 213685, '968c9c4a8a6a02ff9a6c4e2621d5f5d512593a30d57379f704c4274ead48d72e'),
        ('VIA_Nytt_14021.htm', 'text/html', 68919, 'c2ee04f99e59079afa8661913dbd8b9002ea005c7540aaec85a67ed113e9a7b8'),
    ],
    'garbage-at-end.tnef': [
        ('winmail.dat', 'application/ms-tnef', 4184, 'b9ed22cb9635d979f9e95eb93e8deb490d5f8e855438fc2eacfc4d89a9dfc311'),
    ],
    'long-filename.tnef': [
        ('allproductsmar2000.dat', 'application/octet-stream', 279, 'de2ad5d4e20a2456ad12808dee82af2d0d1236ddf5bd55832581a7886cdcd807'),
    ],
    'missing-filenames.tnef': [
        ('generpts.src', 'application/x-wais-source', 61210, '69ebd0e9c298f62d1bcced07a66fce16c43f0e6e0228336e1a56d8df8874b3b9'),
        ('TechlibDEC99.doc', 'application/msword', 33792, 'd1a592c2e3729270860ec3dcac357799e2667fa9859febd1b258c6ca3612f532'),
        ('TechlibDEC99-JAN00.doc', 'application/msword', 34304, '360db5c11b1f21c60ffbf7aa040a91f48fdef402663c303cfeddd4ef4a3dc9cd'),
        ('TechlibNOV99.doc', 'application/msword', 33792, 'b1e6b103cc5a9b759dd0a436d45bba131e69ca06a8b4c99d9beebf76d95cde93'),
    ],
    'multi-name-property.tnef': [
        ('winmail.dat', 'application/ms-tnef', 3039, 'd329eb40b34ae25f6da9a7a392004bdccab90c0d5bc4113383a767aa32a154c6'),
    ],
    'multi-value-attribute.tnef': [
        ('208225__5_seconds__Voice_Mail.mp3', 'audio/mp3', 10656, 'cf2e3cd4175a3acd5cd193623cd8f79fda1c22f4823560213e561851c3fdd4e8'),
    ],
    'node-tnef-attachments.dat': [
        ('zappa_av1.jpg', 'image/jpeg', 2937, 'bea844f30e0fcc20fad419a0d11032a6465da93c1da185a1196949955994409a'),
        ('bookmark.htm', 'text/html', 85805, '1e08d6e23c75ff80ac992eebc24c2943c7843b7dfee235966b37de5eb4362599'),
    ],
    'node-tnef-badchecksum.dat': [
        ('winmail.dat', 'application/ms-tnef', 98184, '232cc6d3ada0ef45a955abf336ddeefd2ad75ce00c69515f4949ed68cb9d38bb'),
    ],
    'node-tnef-panic.dat': [
        ('image001.jpg', 'image/jpeg', 11250, 'ee9bec688ebc6b535fa1c06b3c7f388510f501509a2d6ae17e964a3eda92f8db'),
        ('image002.jpg', 'image/jpeg', 9583, 'a497dd22b4a1f2de15da0929f17429edb502f94d767a0fa2ce67da35162cc62f'),
        ('image003.png', 'image/png', 7147, '7c65885b27f3cd66501fdb7a4711c22ba8b6f64e51ea6c2a3ec9db6fa968a7b8'),
    ],
    'one-file.tnef': [
        ('AUTHORS', 'application/octet-stream', 244, '36c47da7d11846caf0474a4b3df83bb4eba9ea01d2bca500c288fa108e123d28'),
    ],
    'rtf.tnef': [
        ('winmail.dat', 'application/ms-tnef', 2445, '4b9a7deed17028f0ccb853441824a9f444f24c59f31402e00bb529f719ee66e6'),
    ],
    'triples.tnef': [
        ('winmail.dat', 'application/ms-tnef', 3270, 'decd9776fd45155f1827e7a6d01e2d7a89f1d091faf24a62621e6bd1b7302c8a'),
    ],
    'two-files.tnef': [
        ('AUTHORS', 'application/octet-stream', 244, '36c47da7d11846caf0474a4b3df83bb4eba9ea01d2bca500c288fa108e123d28'),
        ('README', 'application/octet-stream', 893, 'd0f163180d6ad5d8d3b4e7c6bc0cc948d05888bff0f69dba375b946ea4c6b0fa'),
    ],
    'umlaut.tnef': [
        ('TBZ PARIV GmbH.jpg', 'image/jpeg', 44764, '67597116a0dbb64f7576edbf4285183441536529aa5643b4127de7d4e0097822'),
        ('image003.jpg', 'image/jpeg', 1001, '49b597682736b44a6ce499a05bcadf60d996244b5679d46cfe37ad5cc820fb00'),
        ('UmlautAnhang-äüö.txt', 'text/plain', 14, '9b34b140af86a7de1be22a13fd6bc8abf03abb8094c0e65751b2f221188a3b41'),
    ],
    'unicode-mapi-attr-name.tnef': [
        ('spaconsole2.cfg', 'application/octet-stream', 8387, '4d9639506fa4bf42ede43ffbaa8ed5a8f8fe2338bc2562f9b9aef7970bc4a25e'),
        ('image001.png', 'image/png', 3815, '037f9d1fa06bccd31878332853814a43e6ed86b3893770b42b057597b49d19c9'),
        ('image002.png', 'image/png', 3573, 'ea179fb97a7e850e58b830f51a1fe411d5a4e5ffb1620c895abe9788cfac6f07'),
        ('image003.png', 'image/png', 3792, '20c51557b9c7ec0a5da9ccfd4c2efb0ff7be72d15b05e1ddecc3d1c69fc8eaa9'),
    ],
    'unicode-mapi-attr.tnef': [
        ('example.dat', 'application/octet-stream', 1024, 'b188960490adc65828dc99f6183137bd9951725ed739982920c9814bc842ccb5'),
    ],
}


def tnefparse_files(data: bytes, sizes: list[int]) -> list[tuple[str, bytes]]:
    """
    The files tnefparse reads from C{data}, each with its bytes: those of
    property 0x3701 cut to the declared size given in C{sizes} (tnefparse
    keeps the padding; what is cut off must be padding), else attAttachData.
    An embedded message gives its own files.
    """
    parsed = TNEF(data)
    found: list[tuple[str, bytes]] = []
    attachments = iter(parsed.attachments)
    attachment = None
    for obj in parsed.objects:
        if obj.name == TNEF.ATTATTACHRENDDATA:
            attachment = next(attachments)
            found.append((attachment.long_filename(), obj))
        elif obj.name == TNEF.ATTATTACHDATA:
            found[-1] = (found[-1][0], obj.data)
        elif obj.name == TNEF.ATTATTACHMENT:
            for prop in decode_mapi(obj.data):
                if prop.name != 0x3701:
                    continue
                raw = prop.raw_data[0]
                if prop.attr_type == 0x000D and raw.startswith(IMESSAGE_SIG):
                    found[-1:] = tnefparse_files(raw[len(IMESSAGE_SIG) :], sizes)
                    break
                if prop.attr_type == 0x000D:
                    raw = raw[16:]
                size = sizes[len(found) - 1]
                assert raw[size:] == bytes(len(raw) - size) and len(raw) - size < 4, "more than padding cut off"
                found[-1] = (found[-1][0], raw[:size])
    return [(name, data) for name, data in found if isinstance(data, bytes)]


class RealTnefFileTests(ExtractionTestCase):
    """
    Issue 23, item 1: real winmail.dat files from tnefparse's and node-tnef's
    test data; each document is exactly the sender's file, as tnefparse reads it.
    """

    def test_documents_are_the_attached_files(self):
        samples = [name for name in os.listdir(TNEF_DATA) if name.endswith((".tnef", ".dat"))]
        self.assertEqual(sorted(REAL_TNEF_DOCUMENTS), sorted(samples))
        for file_name, expected in REAL_TNEF_DOCUMENTS.items():
            with open(os.path.join(TNEF_DATA, file_name), "rb") as f:
                data = f.read()
            result = self.extract(message(multipart(text_body(), tnef_part(data))))
            found = [(a.filename, a.content_type, a.size, a.sha256) for a in result.attachments]
            self.assertEqual(found, expected, file_name)

    def test_tnefparse_reads_the_same_files(self):
        """The table above, checked against tnefparse: same names, same bytes (less the MAPI padding only)."""
        compared = 0
        for file_name, expected in REAL_TNEF_DOCUMENTS.items():
            if expected[0][1] == "application/ms-tnef":
                continue
            with open(os.path.join(TNEF_DATA, file_name), "rb") as f:
                data = f.read()
            sizes = [size for _name, _type, size, _digest in expected]
            theirs = [(name, len(d), hashlib.sha256(d).hexdigest()) for name, d in tnefparse_files(data, sizes)]
            self.assertEqual(theirs, [(name, size, digest) for name, _type, size, digest in expected], file_name)
            compared += len(theirs)
        self.assertEqual(compared, 33)

    def test_padding_is_not_content(self):
        """The PDF ended %%EOF\r and three NULs, the HTML file had one NUL appended."""
        with open(os.path.join(TNEF_DATA, "MAPI_ATTACH_DATA_OBJ.tnef"), "rb") as f:
            result = self.extract(message(multipart(text_body(), tnef_part(f.read()))))
        doc, pdf, html = (self.data(a) for a in result.attachments)
        self.assertTrue(pdf.endswith(b"%%EOF\r"), pdf[-8:])
        self.assertTrue(html.rstrip().endswith(b"</html>"), html[-8:])
        # The Word file's own trailing NULs are content: its declared size is kept.
        self.assertEqual((doc[:4], len(doc)), (b"\xd0\xcf\x11\xe0", 61952))

    def test_embedded_distribution_list_is_not_its_placeholder(self):
        with open(os.path.join(TNEF_DATA, "IPM-DistList.tnef"), "rb") as f:
            data = f.read()
        self.assertTrue(b"This attachment is a MAPI 1.0 embedded message" in data)
        [doc] = self.extract(message(multipart(text_body(), tnef_part(data)))).attachments
        self.assertEqual((doc.filename, doc.size), ("winmail.dat", len(data)))



def parse_dump(raw: bytes, parser_class: type, chunk: int) -> list:
    """What the feed parser made of C{raw}, fed C{chunk} bytes at a time: every part's headers, texts and defects."""
    parser = parser_class(policy=policy.compat32)
    for start in range(0, len(raw), chunk):
        parser.feed(raw[start : start + chunk])
    dump = []
    for part in parser.close().walk():
        payload = None if part.is_multipart() else part.get_payload()
        defects = [type(d).__name__ for d in part.defects]
        dump.append((part.get_unixfrom(), part.items(), part.preamble, part.epilogue, payload, defects))
    return dump


class LineShapeTests(ExtractionTestCase):
    """Issue 22, item 15: the parser's memory whatever the line shape."""

    def test_one_character_per_line(self):
        """Valid base64, one character per line: about 60 bytes per line on main, a few bytes now."""
        data = random.Random(15).randbytes(300_000)
        body = b"\r\n".join(bytes([c]) for c in base64.b64encode(data))
        part = entity(
            'Content-Type: application/pdf; name="order.pdf"', "Content-Transfer-Encoding: base64", body=body
        )
        raw = message(multipart(text_body(), part))
        tracemalloc.start()
        try:
            [doc] = self.extract(raw).attachments
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(self.data(doc), data)
        self.assertLess(used, 6 * len(raw))

    def test_the_parse_is_the_same(self):
        """Lines handed over in runs change nothing the parser makes, fed whole or in odd chunks."""
        crafted = [
            message(multipart(text_body("Hi\r\nJohn\r\n!\r\n x\r\nFrom here\r\na: b"), pdf_part())),
            message(entity("Content-Type: text/plain", body=b"=\r\nabc=\r\ndef\r\n-\r\n\r\nend")),
            b"From sender Mon Jan 1\r\nSubject: x\r\nnot a header\r\nTo: y\r\n\r\nbody\r\n",
            b"Subject: x\rTo: y\r\rA\rB\r--b\rC\n",
            message(
                entity(
                    'Content-Type: multipart/report; report-type=delivery-status; boundary="r"',
                    body=b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n"
                    b"junk\r\nmore\r\n\r\nFinal-Recipient: rfc822; a@b\r\n\r\n--r\r\n"
                    b"Content-Type: message/rfc822\r\n\r\nnot a header\r\nSubject: in body\r\n\r\nx\r\n--r--\r\nepi\r\nlogue\r\n",
                )
            ),
            message(entity('Content-Type: multipart/mixed; boundary="q"', body=b"pre\r\namble\r\n--q\r\n\r\nA\r\nB\r\n--q--")),
        ]
        samples = crafted + [open(path, "rb").read() for path in sample_messages()]
        for raw in samples:
            for chunk in (7, 1 << 20):
                self.assertEqual(
                    parse_dump(raw, mimeparse.LineRunBytesFeedParser, chunk), parse_dump(raw, BytesFeedParser, chunk), raw[:200]
                )

class InlineImageTests(ExtractionTestCase):
    """Issue 14, defect 2: images are documents unless the HTML body shows them."""

    def test_iphone_photo_alone(self):
        photo = entity(
            "Content-Type: image/jpeg",
            'Content-Disposition: inline; filename="IMG_0412.jpeg"',
            "Content-Transfer-Encoding: base64",
            body=b64(b"\xff\xd8\xff photographed paper order"),
        )
        [doc] = self.extract(message(photo)).attachments
        self.assertEqual((doc.filename, doc.content_type, doc.disposition), ("IMG_0412.jpeg", "image/jpeg", "inline"))

    def outlook_logo_message(self) -> bytes:
        """Outlook's signature logo: inline, named, referenced by cid: from the HTML body, not in multipart/related."""
        logo = entity(
            'Content-Type: image/png; name="image001.png"',
            'Content-Disposition: inline; filename="image001.png"',
            "Content-ID: <image001.png@01DA0000.12345670>",
            "Content-Transfer-Encoding: base64",
            body=b64(b"\x89PNG logo"),
        )
        html = entity(
            "Content-Type: text/html; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            body=b'<p>Regards</p><img width=3D"120" src=3D"cid:image001.png@01DA0000.12345670">',
        )
        return message(multipart(multipart(text_body(), html, subtype="alternative", boundary="b-alt"), logo, pdf_part()))

    def test_outlook_signature_logo_stays_skipped(self):
        self.assertEqual(self.names(self.extract(self.outlook_logo_message())), ["order.pdf"])

    def test_keep_stores_the_logo_too(self):
        result = self.extract(self.outlook_logo_message(), inline_images="keep")
        self.assertEqual(self.names(result), ["image001.png", "order.pdf"])
        self.assertEqual(result.attachments[0].content_id, "image001.png@01DA0000.12345670")

    def test_referenced_by_content_location(self):
        logo = entity("Content-Type: image/gif", "Content-Location: http://example.net/logo.gif", body=b"GIF89a")
        html = entity("Content-Type: text/html", body=b'<img src="http://example.net/logo.gif">')
        self.assertEqual(self.names(self.extract(message(multipart(html, logo, pdf_part())))), ["order.pdf"])


class HeaderRepairTests(ExtractionTestCase):
    def test_malformed_content_type(self):
        """Issue 14, defect 3: a missing ';' is no content type."""
        part = entity(
            'Content-Type: application/pdfname="invoice.pdf"',
            "Content-Disposition: attachment",
            "Content-Transfer-Encoding: base64",
            body=b64(PDF),
        )
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(doc.content_type, "application/octet-stream")
        self.assertEqual(doc.content_type_raw, 'application/pdfname="invoice.pdf"')

    def test_unreadable_content_type_of_a_body_is_text(self):
        """A body whose Content-Type has no subtype is read as text/plain (RFC 2045 5.2), not a file."""
        body = entity("Content-Type: text; charset=us-ascii", body=b"Please find our order below.\r\n")
        self.assertEqual(self.extract(message(body)).attachments, [])

    def test_content_type_is_normalised(self):
        part = entity('Content-Type: Application/PDF ; name="a.pdf"', "Content-Transfer-Encoding: base64", body=b64(PDF))
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(doc.content_type, "application/pdf")

    def test_original_filename_is_kept(self):
        """Issue 14, defect 5."""
        [doc] = self.extract(message(multipart(text_body(), pdf_part("/tmp/whoa")))).attachments
        self.assertEqual((doc.filename, doc.original_filename), ("whoa", "/tmp/whoa"))

    def test_old_file_parameter_and_description(self):
        old = entity("Content-Type: application/pdf", "Content-Disposition: attachment; file=old.pdf", body=b"%PDF")
        described = entity("Content-Type: application/pdf", "Content-Description: =?utf-8?q?Rechnung_M=C3=A4rz.pdf?=", body=b"%PDF")
        result = self.extract(message(multipart(text_body(), old, described)))
        self.assertEqual(self.names(result), ["old.pdf", "Rechnung März.pdf"])

    def test_rfc2231_bytes_invalid_in_charset_keep_the_raw_value(self):
        """Issue 14, defect 7: replacement characters, the raw header kept."""
        part = entity("Content-Type: application/octet-stream; name*=iso-2022-jp'ja'Dij%8aat.mp3", body=b"x")
        [doc] = self.extract(message(multipart(text_body(), part))).attachments
        self.assertEqual(doc.filename, "Dij\ufffdat.mp3")
        self.assertEqual(doc.original_filename, "application/octet-stream; name*=iso-2022-jp'ja'Dij%8aat.mp3")


class SignedAndEncryptedTests(ExtractionTestCase):
    def test_signatures_are_not_documents(self):
        signed = multipart(
            multipart(text_body(), pdf_part(), boundary="b-inner"),
            entity('Content-Type: application/pkcs7-signature; name="smime.p7s"', body=b"MIIsig"),
            subtype='signed; protocol="application/pkcs7-signature"',
            boundary="b-signed",
        )
        self.assertEqual(self.names(self.extract(message(signed))), ["order.pdf"])

    def test_encrypted_message_is_one_document_with_a_warning(self):
        enveloped = entity(
            'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"',
            "Content-Transfer-Encoding: base64",
            body=b64(b"0\x80\x06\x09enveloped"),
        )
        result = self.extract(message(enveloped))
        self.assertEqual(self.names(result), ["smime.p7m"])
        self.assertIn("part 1: S/MIME encrypted, kept as one document", result.warnings)

    def test_pgp_encrypted(self):
        encrypted = multipart(
            entity("Content-Type: application/pgp-encrypted", body=b"Version: 1"),
            entity('Content-Type: application/octet-stream; name="encrypted.asc"', body=b"-----BEGIN PGP MESSAGE-----"),
            subtype='encrypted; protocol="application/pgp-encrypted"',
            boundary="b-enc",
        )
        result = self.extract(message(encrypted))
        self.assertEqual(self.names(result), ["encrypted.asc"])
        self.assertIn("message: encrypted, kept as one document", result.warnings)


class StructureTests(SynchronousTestCase):
    """Issue 24: no class over 250 lines, so each piece of the walk can be read on its own."""

    def test_no_class_over_250_lines(self):
        sizes = {}
        for module in (attachments, decoding, documents, mimeparse):
            with open(module.__file__) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    sizes[f"{module.__name__}.{node.name}"] = node.end_lineno - node.lineno + 1
        self.assertIn("mailingest.extraction.attachments._AttachmentWalk", sizes)
        self.assertEqual({name: size for name, size in sizes.items() if size > 250}, {})

    def test_decoded_sinks_provide_their_contract(self):
        path = self.mktemp()
        with decoding.FileSink(path) as sink:
            for each in (sink, decoding.MemorySink(None)):
                verifyObject(decoding.IDecodedSink, each)
