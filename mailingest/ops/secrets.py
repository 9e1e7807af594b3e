"""
Secrets in what a person or a log reads: where the database password is in a
C{--database} string, and masking secrets in any text.

The password is found by libpq's own rules (C{conninfo_uri_parse} and
C{conninfo_parse} in C{fe-connect.c}), the ones psycopg2 connects with, so
what is hidden is what libpq would send:

  - in a C{postgresql://} URL the user information ends at the FIRST C{@}, and
    only when no C{/} comes before it; the password is what follows the first
    C{:} in it, percent-decoded;
  - C{password} and C{sslpassword} may also be query parameters (names and
    values percent-decoded) or keywords of a C{key=value} string (values
    possibly single-quoted, with backslash escapes).

A URL whose password holds a raw C{@}, C{/} or C{?} cannot work: libpq reads
the rest as host, port or database name and names those pieces in its error
messages. L{url_problem} says so, the engine refuses such a URL before libpq
sees it, and L{redact_url} then hides everything before the last C{@}.

This module imports nothing of mailingest: every layer may use it.
"""

import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
SECRET_KEYWORDS = ("password", "sslpassword")
URI_PREFIXES = ("postgresql://", "postgres://")

_SCHEME = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*:")
_SPACE = " \t\n\r\f\v"
_KEYWORD = re.compile(r"\A[A-Za-z_]+\Z")
_UNESCAPE = re.compile(r"\\(.)", re.S)
_QUOTED_VALUE = re.compile(r"'((?:[^'\\]|\\.)*)'", re.S)
_BARE_VALUE = re.compile(r"(?:[^\\ \t\n\r\f\v]|\\.)*", re.S)


class _Secret:
    """One secret value in a connection string: its span, as written, and as libpq reads it."""

    def __init__(self, text: str, start: int, end: int, decoded: str):
        self.start = start
        self.end = end
        self.written = text[start:end]
        self.decoded = decoded


# libpq's two syntaxes


def _uri_prefix(url: str) -> int:
    for prefix in URI_PREFIXES:
        if url.startswith(prefix):
            return len(prefix)
    return 0


def _userinfo_end(url: str, start: int) -> int:
    """Index of the C{@} that ends the user information, or -1: libpq scans to the first C{@} or C{/}."""
    for index in range(start, len(url)):
        if url[index] in "@/":
            return index if url[index] == "@" else -1
    return -1


def _query_params(url: str, query_start: int) -> Iterator[tuple[str, _Secret]]:
    """The query's C{keyword=value} pairs; a malformed one has an empty keyword and spans the whole parameter."""
    position = query_start
    for param in url[query_start:].split("&"):
        key, eq, value = param.partition("=")
        if eq and _KEYWORD.match(unquote(key)):
            start = position + len(key) + 1
            yield unquote(key), _Secret(url, start, start + len(value), unquote(value))
        elif param:
            yield "", _Secret(url, position, position + len(param), unquote(param))
        position += len(param) + 1


def _query_secrets(url: str, query_start: int) -> Iterator[_Secret]:
    for keyword, value in _query_params(url, query_start):
        if (keyword in SECRET_KEYWORDS or not keyword) and value.written:
            yield value


def _uri_secrets(url: str, start: int) -> Iterator[_Secret]:
    at = _userinfo_end(url, start)
    after = start
    if at >= 0:
        colon = url.find(":", start, at)
        if 0 <= colon < at - 1:
            yield _Secret(url, colon + 1, at, unquote(url[colon + 1:at]))
        after = at + 1
    query = url.find("?", after)
    if query >= 0:
        yield from _query_secrets(url, query + 1)


def _conninfo(text: str) -> Iterator[tuple[str, _Secret]]:
    """
    The C{keyword = value} pairs as libpq reads them. A malformed string ends
    in a pair with an empty keyword spanning the rest: the caller cannot know
    what in it is secret.
    """
    index, size = 0, len(text)
    while index < size:
        if text[index] in _SPACE:
            index += 1
            continue
        name_start = index
        while index < size and text[index] != "=" and text[index] not in _SPACE:
            index += 1
        keyword = text[name_start:index]
        while index < size and text[index] in _SPACE:
            index += 1
        if index >= size or text[index] != "=":
            yield "", _Secret(text, name_start, size, text[name_start:])
            return
        index += 1
        while index < size and text[index] in _SPACE:
            index += 1
        if index < size and text[index] == "'":
            match = _QUOTED_VALUE.match(text, index)
            if match is None:
                yield "", _Secret(text, index, size, text[index + 1:])
                return
            yield keyword, _Secret(text, match.start(1), match.end(1), _UNESCAPE.sub(r"\1", match.group(1)))
            index = match.end()
        else:
            match = _BARE_VALUE.match(text, index)
            yield keyword, _Secret(text, match.start(), match.end(), _UNESCAPE.sub(r"\1", match.group()))
            index = match.end()


def _conninfo_secrets(text: str) -> Iterator[_Secret]:
    for keyword, value in _conninfo(text):
        if keyword in SECRET_KEYWORDS or not keyword:
            yield value


def _is_conninfo(text: str) -> bool:
    return not _SCHEME.match(text)


# ambiguous URLs


def url_problem(url: str) -> str | None:
    """Why libpq would read C{url} other than its writer meant, in words that name no part of it; None if fine."""
    start = _uri_prefix(url)
    if start:
        at = _userinfo_end(url, start)
        user_end = url.find(":", start, at) if at >= 0 else -1
        user = url[start:user_end if user_end >= 0 else max(at, start)]
        after = at + 1 if at >= 0 else start
        query = url.find("?", after)
        if "@" in url[after:query if query >= 0 else len(url)] or "?" in user:
            return (
                "the user name or password holds a raw '@', '/' or '?', which PostgreSQL reads as"
                " part of the host, port or database name; percent-encode them (%40, %2F, %3F)"
            )
        if query >= 0 and any(not keyword for keyword, _ in _query_params(url, query + 1)):
            return "a query parameter is not keyword=value (percent-encode '&' and '=' in values: %26, %3D)"
        return None
    if _is_conninfo(url) and any(not keyword for keyword, _ in _conninfo(url)):
        return "not a postgresql:// URL nor a valid key=value connection string (quote values holding spaces)"
    return None


def _ambiguous_userinfo_end(url: str, start: int) -> int:
    """For a URL libpq would misread: the last C{@} (everything before it may be secret), else -1."""
    if url_problem(url) is None:
        return -1
    query = url.find("?", url.rfind("@") + 1)
    return url.rfind("@", start, query if query >= 0 else len(url))


def _masked(text: str, secrets: list[_Secret]) -> str:
    for secret in sorted(secrets, key=lambda s: s.start, reverse=True):
        text = text[:secret.start] + MASK + text[secret.end:]
    return text


def _hidden(url: str) -> tuple[str, list[_Secret]]:
    """The C{--database} string as it may be shown, and the secrets in it."""
    start = _uri_prefix(url)
    if start:
        cut = _ambiguous_userinfo_end(url, start)
    elif _is_conninfo(url):
        secrets = list(_conninfo_secrets(url))
        return _masked(url, secrets), secrets
    else:
        # Another scheme (not ours, so not libpq's rules): all before the last "@" may be secret.
        start = url.find("://") + 3
        cut = url.rfind("@") if start >= 3 and not url.startswith("sqlite:") else -1
    if cut < 0:
        secrets = list(_uri_secrets(url, start))
        return _masked(url, secrets), secrets
    userinfo, tail = url[start:cut], url[cut:]
    colon = userinfo.find(":")
    secrets = [_Secret(userinfo, 0, len(userinfo), unquote(userinfo))]
    if colon >= 0:
        secrets.append(_Secret(userinfo, colon + 1, len(userinfo), unquote(userinfo[colon + 1:])))
    if "?" in userinfo:
        secrets += _query_secrets(userinfo, userinfo.find("?") + 1)
    query = tail.find("?")
    tail_secrets = list(_query_secrets(tail, query + 1)) if query >= 0 else []
    return url[:start] + MASK + _masked(tail, tail_secrets), secrets + tail_secrets


# what callers use


def redact_url(url: str) -> str:
    """The C{--database} string with its passwords replaced by C{***}, fit for logs and error messages."""
    return _hidden(url)[0]


def url_passwords(url: str) -> tuple[str, ...]:
    """Every form of the string's passwords that could show up in a message (as written and decoded), longest first."""
    found = {form for secret in _hidden(url)[1] for form in (secret.written, secret.decoded) if form}
    return tuple(sorted(found, key=len, reverse=True))


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}


def masker(secrets: Iterable[str]) -> Callable[[str], str]:
    """A function replacing every non-empty secret in a text, plain or URL-quoted, with C{***}."""
    forms = {form for secret in secrets if secret for form in _forms(secret)}
    if not forms:
        return lambda text: text
    # Longest first, so a secret that contains another is masked whole.
    pattern = re.compile("|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True)))
    return lambda text: pattern.sub(MASK, text)


def redact(text: str, secrets: Iterable[str]) -> str:
    """C{text} with every non-empty secret, plain or URL-quoted, replaced by C{***}."""
    return masker(secrets)(text)
