"""
One spelling per domain: how a custom domain is stored and how a recipient's
domain is matched against it.

A domain may reach us as U-labels (C{bücher.example}, in an SMTPUTF8 RCPT or
typed by an operator), as A-labels (C{xn--bcher-kva.example}), in any case,
with a trailing dot, in any Unicode normalisation form, or with full-width
characters. L{domain_key} maps all of them to the one A-label form UTS 46
gives (the C{idna} package), so the forms of one domain are one row in
C{org_domain} (its UNIQUE column) and one key of the routing table: no form
of a domain can be added for a second organisation, nor miss the first.
A domain literal (C{[192.0.2.1]}) is never a custom domain.
"""

import re
import secrets

import idna

# What a domain key is made of: LDH labels of at most 63, at most 253 in all.
_LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
MAX_DOMAIN = 253


class BadDomain(ValueError):
    """Not a domain name that can be a custom domain; the text says why."""


def domain_key(text: str) -> str:
    """
    The A-label form of C{text}, lower case, without a trailing dot; raises
    L{BadDomain} for a domain literal, a single label, or anything IDNA refuses.
    """
    text = text.strip()
    if text.startswith("["):
        raise BadDomain("a domain literal is not a domain")
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 4 * MAX_DOMAIN:
        raise BadDomain("empty or too long")
    try:
        key = idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise BadDomain(f"not a valid domain name ({e})") from None
    labels = key.split(".")
    if len(key) > MAX_DOMAIN or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise BadDomain("not a valid domain name (two or more labels of letters, digits and hyphens)")
    return key


def recipient_domain_key(text: str) -> str | None:
    """
    L{domain_key} of a recipient's domain, None when it cannot be one of ours
    (the caller refuses it). ASCII is only lower-cased: a key is looked up,
    and only valid keys are stored, so an invalid A-label finds nothing.
    """
    if text.isascii() and not text.startswith("["):
        return text.strip().lower().removesuffix(".") or None
    try:
        return domain_key(text)
    except BadDomain:
        return None


def shown_domain(key: str) -> str:
    """The U-label form of a stored key, for people (the key itself when it has none)."""
    try:
        return idna.decode(key)
    except (idna.IDNAError, UnicodeError):
        return key


def local_parts_of(names) -> list[str]:
    """The local parts a domain is restricted to (none: any), lower case, each one mailbox name; L{BadDomain} otherwise."""
    parts = sorted({name.strip().lower() for name in names or () if name.strip()})
    if any(len(part) > 64 or not part.isprintable() or any(c in part for c in ',@+" ') for part in parts):
        raise BadDomain("a local part is one mailbox name of at most 64 characters, without , @ + quotes or spaces")
    return parts


def new_token() -> str:
    """The token a domain's TXT record must hold: 128 random bits, as hex (any DNS host takes it)."""
    return secrets.token_hex(16)
