"""The OpenAPI 3.1 description of the JSON API, served at C{/v1/openapi.json}."""

from mailingest.storage.store import MESSAGE_STATUSES

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
_TEXT = {"type": "string"}
_NULLABLE_TEXT = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_LINK = {
    "type": "string",
    "description": "absolute under the daemon's --api-public-url, else the path from the API's root",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict) -> dict:
    """Every property is always present (null where the schema allows it), so all are required."""
    return {"type": "object", "properties": properties, "required": list(properties)}


_NUMBER = {"type": ["number", "null"]}
_VIRUS = {
    "type": ["object", "null"],
    "description": "ClamAV's verdict (null: not scanned, no --clamd); a message's is the worst of its parts",
    "properties": {
        "result": {"type": "string", "enum": ["clean", "infected", "error"]},
        "detail": {**_NULLABLE_TEXT, "description": "the signature found, or why it could not be scanned"},
    },
    "required": ["result", "detail"],
}
_SPAM = {
    "type": ["object", "null"],
    "description": "rspamd's verdict (null: not scanned, no --rspamd)",
    "properties": {
        "action": {**_TEXT, "description": "rspamd's action (no action, add header, rewrite subject, greylist, reject), or error"},
        "score": _NUMBER,
        "required_score": _NUMBER,
        "symbols": {"type": "array", "items": _TEXT},
        "detail": {**_NULLABLE_TEXT, "description": "why it could not be scanned"},
    },
    "required": ["action", "score", "required_score", "symbols", "detail"],
}
_MESSAGE = {
    "id": {"type": "integer", "description": "the message's id in mailingest"},
    "message_id_header": {**_NULLABLE_TEXT, "description": "the sender's Message-ID header"},
    "envelope": _object({"from": _TEXT, "to": {"type": "array", "items": _TEXT}}),
    "subject": _NULLABLE_TEXT,
    "received_at": _TIME,
    "status": {"type": "string", "enum": list(MESSAGE_STATUSES)},
    "error": _NULLABLE_TEXT,
    "raw_url": {**_LINK, "description": "the raw message; " + _LINK["description"]},
    "virus": _VIRUS,
    "spam": _SPAM,
    "unscanned": {**_NULLABLE_TEXT, "description": "extracted although a scanner could not answer (--unscanned pass): why"},
    "organization": {**_TEXT, "description": "the organisation's slug"},
    "parsed_at": {"type": ["string", "null"], "format": "date-time"},
    "raw_size": {"type": "integer"},
    "raw_sha256": _TEXT,
}
_DOCUMENT = {
    "id": {"type": "integer"},
    "filename": _TEXT,
    "content_type": _TEXT,
    "size": {"type": "integer"},
    "sha256": _TEXT,
    "content_url": {**_LINK, "description": "the document's bytes; " + _LINK["description"]},
    "virus": _VIRUS,
    "message_id": {"type": "integer", "description": "the id of the message it came from (not its Message-ID header)"},
    "created_at": _TIME,
}
SCHEMAS = {
    "Message": _object(_MESSAGE),
    "Document": _object(_DOCUMENT),
    "MessageWithDocuments": _object({**_MESSAGE, "documents": {"type": "array", "items": _ref("Document")}}),
    "MessagePage": _object({"messages": {"type": "array", "items": _ref("Message")}, "next_cursor": _NULLABLE_TEXT}),
    "Error": _object({"error": _TEXT, "message": _TEXT}),
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


_ERRORS = {
    "401": _error("no or unknown bearer token (error: unauthorized)"),
    "404": _error("no such id, or another organisation's (error: not_found)"),
    "429": _error("too many wrong tokens from this address: try again after Retry-After seconds (error: too_many_failures)"),
}

_CONTENT_ERRORS = {
    **_ERRORS,
    "403": _error("infected, and no admin has released it with --allow-infected (error: infected)"),
}


def _get(summary: str, ok: str, parameters=(), content_type: str = "application/json", schema: str | None = None, errors=_ERRORS) -> dict:
    content = {content_type: {"schema": _ref(schema)} if schema else {}}
    return {
        "get": {
            "summary": summary,
            "parameters": list(parameters),
            "responses": {"200": {"description": ok, "content": content}, **errors},
        }
    }


DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "mailingest API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/messages": _get(
            "Messages, newest first; follow next_cursor for the next page",
            "a page of messages",
            [
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(MESSAGE_STATUSES)}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
            schema="MessagePage",
            errors={"400": _error("a query value it cannot use (error: bad_parameter or bad_cursor)"), **_ERRORS},
        ),
        "/v1/messages/{id}": _get("One message and its documents", "the message", [_ID], schema="MessageWithDocuments"),
        "/v1/messages/{id}/raw": _get(
            "The message as received (MIME)", "the raw message", [_ID], "message/rfc822", errors=_CONTENT_ERRORS
        ),
        "/v1/documents/{id}": _get("One document", "the document", [_ID], schema="Document"),
        "/v1/documents/{id}/content": _get(
            "The document's bytes", "the content", [_ID], "application/octet-stream", errors=_CONTENT_ERRORS
        ),
        "/v1/openapi.json": _get("This document", "the OpenAPI document", errors={}),
    },
}
