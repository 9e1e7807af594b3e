"""
What the API's custom domain endpoints (issue 27) read and send: the JSON of
a domain, the admin's request to add one, and the API's error type they share
with every endpoint.
"""

import json

from mailingest.delivery.domains import BadDomain, domain_key, local_parts_of, shown_domain
from mailingest.timestamps import iso
from mailingest.verification.domain_proof import txt_name

# An add request is a slug, a domain and a few local parts.
MAX_REQUEST_BODY = 8192


class ApiError(Exception):
    """An answer other than 200, as JSON: C{status}, a stable C{code} and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


def admin_only(scope: int | None) -> None:
    """Changing domains is the operator's business: the admin token's, not an organisation's."""
    if scope is not None:
        raise ApiError(403, "forbidden", "only the admin token adds or removes domains")


def domain_json(row: dict) -> dict:
    """A domain as the API shows it (never its token, but for the answer that made it)."""
    return {
        "id": row["id"],
        "organization": row["org_slug"],
        "domain": row["domain"],
        "unicode": shown_domain(row["domain"]),
        "status": row["status"],
        "local_parts": row["local_parts"],
        "txt_name": txt_name(row["domain"]),
        "created_at": iso(row["created_at"]),
        "checked_at": iso(row["checked_at"]) if row["checked_at"] else None,
        "verified_at": iso(row["verified_at"]) if row["verified_at"] else None,
        "txt_missing_since": iso(row["txt_missing_since"]) if row["txt_missing_since"] else None,
        "last_error": row["last_error"],
    }


def domain_request(body: bytes) -> tuple[str, str, list[str]]:
    """(slug, stored domain, local parts) of an add request: C{{"organization", "domain", "local_parts"?}}; 400 otherwise."""
    if len(body) > MAX_REQUEST_BODY:
        raise ApiError(413, "too_large", f"a request body is at most {MAX_REQUEST_BODY} bytes")
    try:
        given = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    if not isinstance(given, dict) or not isinstance(given.get("organization"), str) or not isinstance(given.get("domain"), str):
        raise ApiError(400, "bad_request", 'give {"organization": SLUG, "domain": DOMAIN, "local_parts": [NAME...]}')
    parts = given.get("local_parts") or []
    if not isinstance(parts, list) or not all(isinstance(part, str) for part in parts):
        raise ApiError(400, "bad_request", "local_parts is a list of names")
    try:
        return given["organization"].lower(), domain_key(given["domain"]), local_parts_of(parts)
    except BadDomain as e:
        raise ApiError(400, "bad_domain", str(e)) from None
