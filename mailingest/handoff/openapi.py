"""The OpenAPI 3.1 description of the JSON API, served at C{/v1/openapi.json}."""

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
_ERRORS = {
    "401": {"description": "no or unknown bearer token (error: unauthorized)"},
    "404": {"description": "no such id, or another organisation's (error: not_found)"},
    "429": {"description": "too many wrong tokens from this address: try again after Retry-After seconds (error: too_many_failures)"},
}


def _get(summary: str, ok: str, parameters=(), content_type: str = "application/json") -> dict:
    return {
        "get": {
            "summary": summary,
            "parameters": list(parameters),
            "responses": {"200": {"description": ok, "content": {content_type: {}}}, **_ERRORS},
        }
    }


DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "mailingest API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/messages": _get(
            "Messages, newest first; follow next_cursor for the next page",
            "a page of messages",
            [
                {"name": "status", "in": "query", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
        ),
        "/v1/messages/{id}": _get("One message and its documents", "the message", [_ID]),
        "/v1/messages/{id}/raw": _get("The message as received (MIME)", "the raw message", [_ID], "message/rfc822"),
        "/v1/documents/{id}": _get("One document", "the document", [_ID]),
        "/v1/documents/{id}/content": _get("The document's bytes", "the content", [_ID], "application/octet-stream"),
        "/v1/openapi.json": _get("This document", "the OpenAPI document"),
    },
}
