-- Each status change of a message (issue 18): written by the store in the
-- transaction of the change, so the console can show what happened and why.
-- 'retrying' is a failed attempt with another one scheduled (its error kept).
-- Messages stored before this change start with their arrival and, when it
-- moved on, their current status.
CREATE TABLE message_status_history (
    id                  {id},
    inbound_message_id  BIGINT      NOT NULL REFERENCES inbound_message (id),
    status              TEXT        NOT NULL,
    error               TEXT,
    at                  {timestamp} NOT NULL
);
CREATE INDEX message_status_history_message ON message_status_history (inbound_message_id, id);

INSERT INTO message_status_history (inbound_message_id, status, error, at)
SELECT id, 'received', NULL, received_at FROM inbound_message ORDER BY id;
INSERT INTO message_status_history (inbound_message_id, status, error, at)
SELECT id, status, COALESCE(last_error, quarantine_reason), COALESCE(parsed_at, {now})
FROM inbound_message WHERE status <> 'received' ORDER BY id;
