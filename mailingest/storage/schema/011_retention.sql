-- Retention, legal hold and erasure (issue 26). Each organisation's periods
-- (NULL: keep forever, the default), the status 'incinerated' (the tombstone
-- of a message whose raw copy is gone: when and why, its digests kept so a
-- retry is still a duplicate), documents marked deleted the same way, legal
-- holds, the audit trail, and the blobs still to delete once their rows are
-- marked, so a pass killed between two deletes finishes on the next one.
ALTER TABLE organization ADD COLUMN retention_raw_seconds BIGINT;
ALTER TABLE organization ADD COLUMN retention_documents_seconds BIGINT;

-- The new status, by swapping the column as 006 did. Every index on the
-- column goes first (those of 013 too, on a database that had it before this
-- delta: SQLite drops no indexed column), the two this delta knows come back.
DROP INDEX IF EXISTS inbound_message_org_status;
DROP INDEX IF EXISTS inbound_message_queue;
DROP INDEX IF EXISTS inbound_message_status;
DROP INDEX IF EXISTS inbound_message_received;
ALTER TABLE inbound_message RENAME COLUMN status TO status_before_011;
ALTER TABLE inbound_message ADD COLUMN status TEXT NOT NULL DEFAULT 'received'
    CHECK (status IN ('received', 'parsed', 'failed', 'quarantined', 'incinerated'));
UPDATE inbound_message SET status = status_before_011;
ALTER TABLE inbound_message DROP COLUMN status_before_011;
CREATE INDEX inbound_message_org_status ON inbound_message (org_id, status, id);
CREATE INDEX inbound_message_queue ON inbound_message (status, next_attempt_at);

ALTER TABLE inbound_message ADD COLUMN incinerated_at {timestamp};
ALTER TABLE inbound_message ADD COLUMN incinerated_reason TEXT;
ALTER TABLE document ADD COLUMN deleted_at {timestamp};
ALTER TABLE document ADD COLUMN deleted_reason TEXT;

CREATE TABLE legal_hold (
    id                  {id},
    org_id              BIGINT      NOT NULL REFERENCES organization (id),
    scope               TEXT        NOT NULL CHECK (scope IN ('message', 'sender', 'organization')),
    inbound_message_id  BIGINT      REFERENCES inbound_message (id),
    sender              TEXT,
    reason              TEXT        NOT NULL,
    created_by          TEXT        NOT NULL,
    created_at          {timestamp} NOT NULL,
    removed_by          TEXT,
    removed_at          {timestamp}
);
CREATE INDEX legal_hold_org ON legal_hold (org_id, removed_at);

CREATE TABLE audit_log (
    id                  {id},
    at                  {timestamp} NOT NULL,
    actor               TEXT        NOT NULL,
    action              TEXT        NOT NULL,
    org_id              BIGINT      REFERENCES organization (id),
    inbound_message_id  BIGINT,
    document_id         BIGINT,
    hold_id             BIGINT,
    reason              TEXT,
    sha256              TEXT
);
CREATE INDEX audit_log_org ON audit_log (org_id, id);
CREATE INDEX audit_log_message ON audit_log (inbound_message_id, id);

CREATE TABLE blob_purge (
    key         TEXT        PRIMARY KEY,
    created_at  {timestamp} NOT NULL
);
