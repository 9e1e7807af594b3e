"""
Messages for the rounds smtp-source cannot generate.

Each message has its own Message-ID: mailingest stores a message delivered
twice only once, so identical messages would measure deduplication, not
ingestion.
"""

import random
import re
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid

from bench.load import WireMessage
from bench.targets import DOMAIN, RECIPIENT, SENDER

LINE = b"X" * 76 + b"\r\n"
CHUNK_LINES = 13_000  # about 1 MB per chunk of whole lines


def wire(data: bytes) -> bytes:
    """CRLF line endings and dot-stuffing, as they go after DATA."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data)


def make_pdf(size: int, seed: int = 0) -> bytes:
    """
    A well-formed one-page PDF of about C{size} bytes (incompressible padding in
    its content stream, correct xref), so extraction handles a real-looking file.
    """
    padding = random.Random(seed).randbytes(max(0, size - 600))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(padding) + padding + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pdf_messages(count: int, size: int) -> list[WireMessage]:
    """C{count} purchase orders of about C{size} bytes each, one PDF attached to each."""
    # base64 with 76-character lines turns 57 bytes into 78.
    pdf = make_pdf(int((size - 1024) * 57 / 78))
    messages = []
    for n in range(count):
        message = EmailMessage(policy=policy.SMTP)
        message["From"] = SENDER
        message["To"] = RECIPIENT
        message["Subject"] = f"Purchase order {n}"
        message["Message-ID"] = make_msgid(f"po{n}", domain=DOMAIN)
        message.set_content(f"Please find purchase order {n} attached.\n")
        message.add_attachment(pdf, maintype="application", subtype="pdf", filename=f"PO-{n}.pdf")
        data = wire(message.as_bytes())
        messages.append(lambda data=data: (data,))
    return messages


def large_message(size: int) -> WireMessage:
    """
    A text message of C{size} bytes, streamed in ~1 MB chunks of whole lines:
    one text part in a multipart/mixed, so that a parser worker reads it all
    (a message that is one text body needs none, see extraction.text_body).
    """
    header = wire(
        f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: large message\n"
        f"Message-ID: {make_msgid('large', domain=DOMAIN)}\nMIME-Version: 1.0\n"
        "Content-Type: multipart/mixed; boundary=large\n\n--large\nContent-Type: text/plain\n\n".encode()
    )
    trailer = wire(b"--large--\n")
    chunk = LINE * CHUNK_LINES
    lines = max(1, (size - len(header) - len(trailer)) // len(LINE))

    def chunks():
        yield header
        full, rest = divmod(lines, CHUNK_LINES)
        for _ in range(full):
            yield chunk
        yield LINE * rest
        yield trailer

    return chunks
