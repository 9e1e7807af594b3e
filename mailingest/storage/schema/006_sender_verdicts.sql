-- Who sent a message (issue 15): the SMTP facts the sender checks need, their
-- verdicts, and each organisation's sender policy with the quarantine it
-- leads to. NULL verdicts: not checked yet (or stored before this change).
ALTER TABLE inbound_message ADD COLUMN client_ip TEXT;
ALTER TABLE inbound_message ADD COLUMN helo TEXT;
ALTER TABLE inbound_message ADD COLUMN tls TEXT;
ALTER TABLE inbound_message ADD COLUMN spf TEXT;
ALTER TABLE inbound_message ADD COLUMN spf_domain TEXT;
ALTER TABLE inbound_message ADD COLUMN dkim TEXT;
ALTER TABLE inbound_message ADD COLUMN dkim_domain TEXT;
ALTER TABLE inbound_message ADD COLUMN dmarc TEXT;
ALTER TABLE inbound_message ADD COLUMN dmarc_domain TEXT;
ALTER TABLE inbound_message ADD COLUMN dmarc_policy TEXT;
ALTER TABLE inbound_message ADD COLUMN arc TEXT;
ALTER TABLE inbound_message ADD COLUMN arc_domain TEXT;
ALTER TABLE inbound_message ADD COLUMN authentication_results TEXT;
ALTER TABLE inbound_message ADD COLUMN quarantine_reason TEXT;
ALTER TABLE inbound_message ADD COLUMN released_at {timestamp};

ALTER TABLE organization ADD COLUMN sender_allow_domains TEXT NOT NULL DEFAULT '';
ALTER TABLE organization ADD COLUMN sender_require TEXT NOT NULL DEFAULT 'none'
    CHECK (sender_require IN ('none', 'spf', 'dkim', 'dmarc'));

-- The new status 'quarantined'. Neither engine can change a column's CHECK in
-- place the same way, both can swap the column: the old one (its constraint
-- with it) is dropped once its values are copied.
DROP INDEX inbound_message_org_status;
DROP INDEX inbound_message_queue;
ALTER TABLE inbound_message RENAME COLUMN status TO status_before_006;
ALTER TABLE inbound_message ADD COLUMN status TEXT NOT NULL DEFAULT 'received'
    CHECK (status IN ('received', 'parsed', 'failed', 'quarantined'));
UPDATE inbound_message SET status = status_before_006;
ALTER TABLE inbound_message DROP COLUMN status_before_006;
CREATE INDEX inbound_message_org_status ON inbound_message (org_id, status);
CREATE INDEX inbound_message_queue ON inbound_message (status, next_attempt_at);
