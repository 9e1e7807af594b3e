-- Tables of SPEC section 5, plus the bookkeeping the extraction service needs.
CREATE TABLE organization (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    slug        TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL DEFAULT '',
    active      BOOLEAN NOT NULL DEFAULT 1,
    created_at  TEXT    NOT NULL
);

CREATE TABLE inbound_message (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id             INTEGER NOT NULL REFERENCES organization (id),
    source             TEXT    NOT NULL,
    source_message_id  TEXT    NOT NULL,
    mail_from          TEXT    NOT NULL,
    rcpt_to            TEXT    NOT NULL,
    subject            TEXT,
    raw_key            TEXT    NOT NULL,
    raw_size           INTEGER NOT NULL,
    raw_sha256         TEXT    NOT NULL,
    status             TEXT    NOT NULL DEFAULT 'received'
                       CHECK (status IN ('received', 'parsed', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    received_at        TEXT    NOT NULL,
    parsed_at          TEXT,
    next_attempt_at    TEXT,
    claimed_until      TEXT,
    UNIQUE (org_id, source, source_message_id)
);
CREATE INDEX inbound_message_org_received ON inbound_message (org_id, received_at);
CREATE INDEX inbound_message_org_status ON inbound_message (org_id, status);
CREATE INDEX inbound_message_queue ON inbound_message (status, next_attempt_at);

CREATE TABLE document (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id              INTEGER NOT NULL REFERENCES organization (id),
    inbound_message_id  INTEGER NOT NULL REFERENCES inbound_message (id),
    ordinal             INTEGER NOT NULL,
    filename            TEXT    NOT NULL,
    content_type        TEXT    NOT NULL,
    size                INTEGER NOT NULL,
    sha256              TEXT    NOT NULL,
    storage_key         TEXT    NOT NULL,
    created_at          TEXT    NOT NULL,
    UNIQUE (inbound_message_id, ordinal)
);
CREATE INDEX document_org_created ON document (org_id, created_at);
