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
    "envelope": _object({
        "from": _TEXT,
        "to": {"type": "array", "items": _TEXT},
        "domains": {
            "type": "array", "items": _TEXT,
            "description": "the domains the recipients came in on: one of ours (LOCAL+SLUG@) or the organisation's own verified domain (A-label form)",
        },
    }),
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
    "incinerated_at": {"type": ["string", "null"], "format": "date-time", "description": "when its raw copy was deleted (status incinerated)"},
    "incinerated_reason": {"type": ["string", "null"], "enum": ["retention", "erasure", None]},
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
    "deleted_at": {"type": ["string", "null"], "format": "date-time", "description": "when its content was deleted (retention or erasure)"},
}
_AUDIT_ENTRY = {
    "id": {"type": "integer"},
    "at": _TIME,
    "actor": {**_TEXT, "description": "retention, api:admin, console: admin, cli:<user>"},
    "action": {"type": "string", "enum": ["incinerate", "erase", "delete_document", "hold_add", "hold_remove"]},
    "organization": _NULLABLE_TEXT,
    "message_id": {"type": ["integer", "null"]},
    "document_id": {"type": ["integer", "null"]},
    "hold_id": {"type": ["integer", "null"]},
    "reason": _NULLABLE_TEXT,
    "sha256": {**_NULLABLE_TEXT, "description": "the sha256 of what was deleted"},
}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_DOMAIN = {
    "id": {"type": "integer"},
    "organization": {**_TEXT, "description": "the organisation's slug"},
    "domain": {**_TEXT, "description": "the domain in A-label form, lower case, as it is stored and matched"},
    "unicode": {**_TEXT, "description": "the domain in U-label form, for people"},
    "status": {"type": "string", "enum": ["pending", "verified", "suspended"]},
    "local_parts": {"type": "array", "items": _TEXT, "description": "the local parts that take mail; empty: any"},
    "txt_name": {**_TEXT, "description": "where the TXT record with the token goes"},
    "created_at": _TIME,
    "checked_at": _NULLABLE_TIME,
    "verified_at": _NULLABLE_TIME,
    "txt_missing_since": {**_NULLABLE_TIME, "description": "a verified domain's TXT record missing since; suspended after the daemon's --domain-grace"},
    "last_error": {**_NULLABLE_TEXT, "description": "what the last check found missing"},
}
SCHEMAS = {
    "Message": _object(_MESSAGE),
    "Document": _object(_DOCUMENT),
    "MessageWithDocuments": _object({**_MESSAGE, "documents": {"type": "array", "items": _ref("Document")}}),
    "MessagePage": _object({"messages": {"type": "array", "items": _ref("Message")}, "next_cursor": _NULLABLE_TEXT}),
    "AuditEntry": _object(_AUDIT_ENTRY),
    "AuditPage": _object({"entries": {"type": "array", "items": _ref("AuditEntry")}, "next_cursor": _NULLABLE_TEXT}),
    "Error": _object({"error": _TEXT, "message": _TEXT}),
    "Domain": _object(_DOMAIN),
    "DomainList": _object({"domains": {"type": "array", "items": _ref("Domain")}}),
    "NewDomain": _object({
        **_DOMAIN,
        "token": {**_TEXT, "description": "publish mailingest-verification=TOKEN at txt_name; shown only here"},
        "dns_records": {"type": "array", "items": _TEXT, "description": "the TXT and MX records to publish, in zone file form"},
    }),
    "RemovedDomain": _object({**_DOMAIN, "status": {"type": "string", "enum": ["removed"]}}),
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
    "410": _error("deleted by retention or erasure: only the tombstone is left (error: incinerated or deleted)"),
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


def _change(method: str, summary: str, status: str, ok: str, schema: str, errors: dict, parameters=(), body: dict | None = None) -> dict:
    """A POST or DELETE, the admin token's: an organisation's token gets 403."""
    operation = {
        "summary": summary,
        "parameters": list(parameters),
        "responses": {
            status: {"description": ok, "content": {"application/json": {"schema": _ref(schema)}}},
            **errors, **_ERRORS, "403": _error("not the admin token (error: forbidden)"),
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return {method: operation}


DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "mailingest API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
    "security": [{"bearer": []}],
    "paths": {
        "/v1/messages": _get(
            "Messages, newest first (by id; with since, by received_at then id); follow next_cursor for the next page",
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
        "/v1/messages/{id}": {
            **_get("One message and its documents", "the message", [_ID], schema="MessageWithDocuments"),
            **_change(
                "delete", "Erase the message (admin token): raw copy and documents deleted, personal fields replaced, tombstone kept",
                "200", "the erased message (status incinerated, incinerated_reason erasure)", "MessageWithDocuments",
                {"409": _error("under a legal hold (error: held), or still being processed or erased already (error: not_erasable)")},
                [_ID],
            ),
        },
        "/v1/messages/{id}/raw": _get(
            "The message as received (MIME)", "the raw message", [_ID], "message/rfc822", errors=_CONTENT_ERRORS
        ),
        "/v1/documents/{id}": _get("One document", "the document", [_ID], schema="Document"),
        "/v1/documents/{id}/content": _get("The document's bytes", "the content", [_ID], "application/octet-stream", errors=_CONTENT_ERRORS),
        "/v1/audit": _get(
            "The audit trail of incinerations, erasures and legal holds, newest first (an organisation's token: its own)",
            "a page of audit entries",
            [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
            schema="AuditPage",
            errors={"400": _error("a query value it cannot use (error: bad_parameter or bad_cursor)"), **_ERRORS},
        ),
        "/v1/domains": {
            **_get("Custom domains: an organisation's own, or every one for the admin token", "the domains", schema="DomainList"),
            **_change(
                "post", "Give an organisation a domain, pending until DNS proves it (admin token)", "201", "the domain, its token and records",
                "NewDomain", {"400": _error("not a domain or a bad body (error: bad_request, bad_domain)"),
                              "409": _error("the domain, in any form, is already an organisation's (error: domain_taken)"),
                              "422": _error("no such organisation (error: no_such_organization)")},
                body={
                    "type": "object", "required": ["organization", "domain"],
                    "properties": {"organization": _TEXT, "domain": _TEXT, "local_parts": {"type": "array", "items": _TEXT}},
                },
            ),
        },
        "/v1/domains/{id}": {
            **_get("One custom domain", "the domain", [_ID], schema="Domain"),
            **_change("delete", "Remove a domain: its mail is refused from then on (admin token)", "200", "the removed domain", "RemovedDomain", {}, [_ID]),
        },
        "/v1/openapi.json": _get("This document", "the OpenAPI document", errors={}),
    },
}
