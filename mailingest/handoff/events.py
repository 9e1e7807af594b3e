"""
What a webhook says: the JSON body of an event and its Standard Webhooks
signature headers, made with the C{standardwebhooks} package so receivers
verify with the official library of their language.
"""

import base64
import json
import os
from datetime import datetime, timezone
from typing import Any

from standardwebhooks import Webhook

from mailingest.errors import MailingestError

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24


class BadSecret(MailingestError):
    """A webhook secret the signing library cannot use."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def check_secret(secret: str) -> str:
    """C{secret} stripped, if it is a usable C{whsec_} secret; else L{BadSecret}."""
    secret = secret.strip()
    if not secret.startswith(SECRET_PREFIX):
        raise BadSecret("a webhook secret starts with whsec_ followed by base64")
    try:
        Webhook(secret)
    except Exception:
        raise BadSecret("a webhook secret starts with whsec_ followed by base64 (at least one byte)") from None
    return secret


def iso(value: Any) -> str | None:
    """A timestamp as ISO 8601 UTC, whether the database gave a datetime (PostgreSQL) or text (SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def as_datetime(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def document_url(api_url: str | None, document_id: int) -> str:
    """Where the API serves a document's content: a path, or a full URL with C{--api-public-url}."""
    path = f"/v1/documents/{document_id}/content"
    return path if not api_url else api_url.rstrip("/") + path


def event_body(event: dict, api_url: str | None = None) -> bytes:
    """The event as the application receives it (a claimed outbox row: event, message and documents)."""
    body = {
        "type": event["event_type"],
        "id": event["event_id"],
        "organization": event["org_slug"],
        "message": {
            "id": event["message_id"],
            "message_id": event["source_message_id"],
            "envelope": {"from": event["mail_from"], "to": event["rcpt_to"].split(", ")},
            "subject": event["subject"],
            "received_at": iso(event["received_at"]),
            "status": event["message_status"],
            "error": event["message_error"],
        },
        "documents": [
            {
                "id": document["id"],
                "filename": document["filename"],
                "content_type": document["content_type"],
                "size": document["size"],
                "sha256": document["sha256"],
                "url": document_url(api_url, document["id"]),
            }
            for document in event["documents"]
        ],
    }
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def signature_headers(secret: str, event_id: str, body: bytes, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers: the event id (the receiver's idempotency key), the time, the signature."""
    signature = Webhook(secret).sign(event_id, now, body.decode("utf-8"))
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
