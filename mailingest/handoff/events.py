"""
What a webhook says: the JSON body of an event and its Standard Webhooks
signature headers, made with the C{standardwebhooks} package so receivers
verify with the official library of their language.
"""

import base64
import json
import os
import uuid
from datetime import datetime
from typing import Any

from standardwebhooks import Webhook
from zope.interface import implementer

from mailingest.errors import MailingestError
from mailingest.interfaces import IWebhookEvents
from mailingest.timestamps import iso

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24

# The message statuses that raise a webhook event, and the event's type.
EVENT_TYPES = {
    "parsed": "message.parsed",
    "failed": "message.failed",
    "quarantined": "message.quarantined",
    "incinerated": "message.incinerated",
    "erased": "message.erased",
}


@implementer(IWebhookEvents)
class MessageEvents:
    """The events of a message's status changes, as the store writes them to its outbox."""

    def event_type(self, status: str) -> str | None:
        return EVENT_TYPES.get(status)

    def new_event_id(self) -> str:
        return "evt_" + uuid.uuid4().hex


MESSAGE_EVENTS = MessageEvents()


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


def as_datetime(value: Any) -> datetime:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def api_link(api_url: str | None, path: str) -> str:
    """A link into the API: absolute under C{--api-public-url}, else the path from the API's root (never from a request's Host)."""
    return path if not api_url else api_url.rstrip("/") + path


def message_object(message_id: int, row: dict, status: str, error: str | None, api_url: str | None) -> dict:
    """
    The fields a message has in the API and in a webhook alike, by the same
    names: C{id} is our row id, C{message_id_header} the sender's Message-ID;
    the envelope's C{domains} are those its recipients came in on (one of ours,
    or the organisation's own verified domain), empty for a message stored
    before they were recorded.
    """
    return {
        "id": message_id,
        "message_id_header": row["source_message_id"],
        "envelope": {
            "from": row["mail_from"],
            "to": row["rcpt_to"].split(", "),
            "domains": row["rcpt_domain"].split(", ") if row.get("rcpt_domain") else [],
        },
        "subject": row["subject"],
        "received_at": iso(row["received_at"]),
        "status": status,
        "error": error,
        "raw_url": api_link(api_url, f"/v1/messages/{message_id}/raw"),
        "virus": virus_object(row),
        "spam": spam_object(row),
        "unscanned": row.get("unscanned"),
    }


def virus_object(row: dict) -> dict | None:
    """clamd's verdict on a message or document row (None: not scanned)."""
    if row.get("virus") is None:
        return None
    return {"result": row["virus"], "detail": row.get("virus_detail")}


def spam_object(row: dict) -> dict | None:
    """rspamd's verdict on a message row (None: not scanned)."""
    if row.get("spam_action") is None:
        return None
    return {
        "action": row["spam_action"],
        "score": row.get("spam_score"),
        "required_score": row.get("spam_required"),
        "symbols": (row.get("spam_symbols") or "").split(),
        "detail": row.get("spam_detail"),
    }


def withheld(document: dict, message: dict) -> bool:
    """An infected document (or raw copy) no admin released with --allow-infected: never handed over."""
    return document.get("virus") == "infected" and message.get("infected_allowed_at") is None


def document_object(row: dict, api_url: str | None) -> dict:
    """The fields a document has in the API and in a webhook alike."""
    return {
        "id": row["id"],
        "filename": row["filename"],
        "content_type": row["content_type"],
        "size": row["size"],
        "sha256": row["sha256"],
        "content_url": api_link(api_url, f"/v1/documents/{row['id']}/content"),
        "virus": virus_object(row),
    }


def event_body(event: dict, api_url: str | None = None) -> bytes:
    """The event as the application receives it (a claimed outbox row: event, message and documents)."""
    body = {
        "type": event["event_type"],
        "id": event["event_id"],
        "organization": event["org_slug"],
        "message": message_object(event["message_id"], event, event["message_status"], event["message_error"], api_url),
        "documents": [document_object(document, api_url) for document in event["documents"]],
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
