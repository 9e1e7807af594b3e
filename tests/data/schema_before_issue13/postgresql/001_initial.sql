-- Tables of SPEC section 5, plus the bookkeeping the extraction service needs.
CREATE TABLE organization (
    id          BIGSERIAL PRIMARY KEY,
    slug        TEXT        NOT NULL UNIQUE,
    name        TEXT        NOT NULL DEFAULT '',
    active      BOOLEAN     NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE inbound_message (
    id                 BIGSERIAL PRIMARY KEY,
    org_id             BIGINT      NOT NULL REFERENCES organization (id),
    source             TEXT        NOT NULL,
    source_message_id  TEXT        NOT NULL,
    mail_from          TEXT        NOT NULL,
    rcpt_to            TEXT        NOT NULL,
    subject            TEXT,
    raw_key            TEXT        NOT NULL,
    raw_size           BIGINT      NOT NULL,
    raw_sha256         TEXT        NOT NULL,
    status             TEXT        NOT NULL DEFAULT 'received'
                       CHECK (status IN ('received', 'parsed', 'failed')),
    attempts           INTEGER     NOT NULL DEFAULT 0,
    last_error         TEXT,
    received_at        TIMESTAMPTZ NOT NULL,
    parsed_at          TIMESTAMPTZ,
    next_attempt_at    TIMESTAMPTZ,
    claimed_until      TIMESTAMPTZ,
    UNIQUE (org_id, source, source_message_id)
);
CREATE INDEX inbound_message_org_received ON inbound_message (org_id, received_at);
CREATE INDEX inbound_message_org_status ON inbound_message (org_id, status);
CREATE INDEX inbound_message_queue ON inbound_message (status, next_attempt_at);

CREATE TABLE document (
    id                  BIGSERIAL PRIMARY KEY,
    org_id              BIGINT      NOT NULL REFERENCES organization (id),
    inbound_message_id  BIGINT      NOT NULL REFERENCES inbound_message (id),
    ordinal             INTEGER     NOT NULL,
    filename            TEXT        NOT NULL,
    content_type        TEXT        NOT NULL,
    size                BIGINT      NOT NULL,
    sha256              TEXT        NOT NULL,
    storage_key         TEXT        NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL,
    UNIQUE (inbound_message_id, ordinal)
);
CREATE INDEX document_org_created ON document (org_id, created_at);
