-- Handing messages to the application (issue 16): each organisation's
-- webhook, the outbox of events written in the transaction that changes a
-- message's status (retried until retry_from plus the horizon: redelivering
-- starts it again), and the hashes of the API tokens.
CREATE TABLE org_webhook (
    org_id      BIGINT      PRIMARY KEY REFERENCES organization (id),
    url         TEXT        NOT NULL,
    secret      TEXT        NOT NULL,
    created_at  {timestamp} NOT NULL
);

CREATE TABLE webhook_event (
    id                  {id},
    event_id            TEXT        NOT NULL UNIQUE,
    event_type          TEXT        NOT NULL,
    org_id              BIGINT      NOT NULL REFERENCES organization (id),
    inbound_message_id  BIGINT      NOT NULL REFERENCES inbound_message (id),
    message_status      TEXT        NOT NULL,
    message_error       TEXT,
    status              TEXT        NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts            INTEGER     NOT NULL DEFAULT 0,
    last_status         INTEGER,
    last_error          TEXT,
    created_at          {timestamp} NOT NULL,
    retry_from          {timestamp} NOT NULL,
    next_attempt_at     {timestamp} NOT NULL,
    claimed_until       {timestamp},
    delivered_at        {timestamp}
);
CREATE INDEX webhook_event_queue ON webhook_event (status, next_attempt_at);
CREATE INDEX webhook_event_message ON webhook_event (inbound_message_id, status);
CREATE INDEX webhook_event_org ON webhook_event (org_id, id);

CREATE TABLE api_token (
    id          {id},
    org_id      BIGINT      NOT NULL REFERENCES organization (id),
    sha256      TEXT        NOT NULL UNIQUE,
    created_at  {timestamp} NOT NULL,
    revoked_at  {timestamp}
);
CREATE INDEX api_token_org ON api_token (org_id);
