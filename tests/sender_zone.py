"""
The test zone and signed messages for the sender checks: a DKIM key made in
the test (cryptography), SPF, DKIM key and DMARC records for the outcomes
each check can have, and messages signed with dkimpy.
"""

import base64
from functools import lru_cache

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from twisted.names import dns

from tests.dns_server import Zone, txt

# The sending server's address in the tests: SPF passes it for sender.example.
GOOD_IP = "127.0.0.1"
OTHER_IP = "192.0.2.1"


@lru_cache(maxsize=1)
def key_pair() -> tuple[bytes, str]:
    """(PKCS#1 PEM private key for dkimpy, base64 public key for p=)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(public).decode("ascii")


def dkim_key_record() -> str:
    return "v=DKIM1; k=rsa; p=" + key_pair()[1]


def includes(count: int) -> str:
    return "v=spf1 " + " ".join(f"include:n{i}.many.example" for i in range(count)) + " -all"


def zone(**extra) -> Zone:
    """The sender domains of the tests; C{extra} is passed to L{Zone} (servfail, silent)."""
    key = dkim_key_record()
    records = {
        # SPF
        "sender.example": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "soft.example": [txt("v=spf1 ~all")],
        "neutral.example": [txt("v=spf1 ?all")],
        "loop.example": [txt("v=spf1 include:loop2.example -all")],
        "loop2.example": [txt("v=spf1 include:loop.example -all")],
        "many.example": [txt(includes(11))],
        "longlabel.example": [txt("v=spf1 a:." + "a" * 4000 + ".example -all")],
        "helo.sender.example": [txt("v=spf1 ip4:127.0.0.1 -all")],
        # DKIM keys
        "sel._domainkey.sender.example": [txt(key)],
        "sel._domainkey.forwarder.example": [txt(key)],
        "sel._domainkey.attacker.example": [txt(key)],
        "sel._domainkey.customer.example": [txt(key)],
        "sel._domainkey.bigkey.example": [txt("v=DKIM1; k=rsa; p=" + "A" * 6000)],
        "sel._domainkey.badkey.example": [txt("v=DKIM1; k=rsa; p=notbase64!!")],
        # DMARC
        "_dmarc.sender.example": [txt("v=DMARC1; p=reject; sp=quarantine")],
        "_dmarc.forwarder.example": [txt("v=DMARC1; p=none")],
        "_dmarc.strict.example": [txt("v=DMARC1; p=reject; adkim=s; aspf=s")],
        "strict.example": [txt("v=spf1 ip4:127.0.0.1 -all")],
        "_dmarc.badpolicy.example": [txt("v=DMARC1; p=maybe")],
        "_dmarc.customer.example": [txt("v=DMARC1; p=reject")],
    }
    for i in range(11):
        records[f"n{i}.many.example"] = [txt("v=spf1 ip4:198.51.100.1 -all")]
    # SPF ptr (RFC 7208 5.5): the client PTR_IP names broken.ptr.example
    # (give it SERVFAIL) and mail.ptr.example, which validates; the RFC 7208
    # test suite's ptr-cname-loop (client LOOP_IP).
    records["ptr.example"] = [txt("v=spf1 ptr:ptr.example -all")]
    records["mail.ptr.example"] = [dns.Record_A(PTR_IP, ttl=60)]
    records["loop.example.com"] = [txt("v=spf1 ptr")]
    records["loop4.example.com"] = [dns.Record_CNAME("CNAME.example.com", ttl=60)]
    records["cname.example.com"] = [dns.Record_CNAME("CNAME.example.com", ttl=60)]
    return Zone(records, **extra)


# Clients whose reverse names are in L{reverse_zone}.
PTR_IP = "192.0.2.5"
LOOP_IP = "192.0.2.4"


def reverse_zone(**extra) -> Zone:
    """in-addr.arpa for the ptr tests; C{extra} as for L{zone}."""
    records = {
        "5.2.0.192.in-addr.arpa": [dns.Record_PTR("broken.ptr.example", ttl=60), dns.Record_PTR("mail.ptr.example", ttl=60)],
        "4.2.0.192.in-addr.arpa": [dns.Record_PTR("loop4.example.com", ttl=60)],
        "7.2.0.192.in-addr.arpa": [dns.Record_PTR("quiet.ptr.example", ttl=60)],
    }
    return Zone(records, origin="in-addr.arpa", **extra)


def message(from_domain: str = "sender.example", body: bytes = b"Please find our order.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: Buyer <buyer@" + from_domain.encode() + b">\r\n"
        b"To: orders+acme@ingest.test\r\n"
        b"Subject: Order 1\r\n"
        b"Message-ID: <order-1@" + from_domain.encode() + b">\r\n"
        + extra
        + b"\r\n"
        + body
    )


class _ExtraTags(dkim.DKIM):
    """dkimpy's signer writing more tags after C{d=}, all covered by the signature (dkimpy ignores unknown ones)."""

    def __init__(self, message: bytes, tags: list[tuple[bytes, bytes]]):
        super().__init__(message)
        self.tags = tags

    def gen_header(self, fields, *args, **kwargs):
        at = [name for name, _ in fields].index(b"d") + 1
        return super().gen_header(fields[:at] + self.tags + fields[at:], *args, **kwargs)


def signed(text: bytes, domain: str = "sender.example", selector: str = "sel", extra_tags: dict[str, str] | None = None) -> bytes:
    """C{text} signed by C{domain}; C{extra_tags} adds signed tags of the attacker's choosing (C{{"D": ...}})."""
    signer = _ExtraTags(text, [(name.encode(), value.encode()) for name, value in (extra_tags or {}).items()])
    signature = signer.sign(
        selector.encode(), domain.encode(), key_pair()[0], include_headers=[b"from", b"to", b"subject", b"message-id"]
    )
    return signature + text


def arc_forwarded(text: bytes, forwarder: str = "forwarder.example", seal: bool = True) -> bytes:
    """
    C{text} as a list or forwarder passes it on: its footer breaks the DKIM
    signature, its ARC set vouches for it (without its ARC-Seal if not C{seal}).
    """
    separator = text.index(b"\r\n\r\n")
    forwarded = text[:separator] + text[separator:] + b"-- \r\nsent through the list\r\n"
    results = f"Authentication-Results: {forwarder}; dkim=pass header.d=sender.example; spf=pass; dmarc=pass\r\n".encode()
    forwarded = results + forwarded
    arc_set = dkim.arc_sign(forwarded, b"sel", forwarder.encode(), key_pair()[0], forwarder.encode())
    if not seal:
        arc_set = [field for field in arc_set if not field.startswith(b"ARC-Seal:")]
    return b"".join(arc_set) + forwarded
