-- What is inside a message (issue 25): ClamAV's malware verdict per document
-- and for the message (the worst of its parts and its raw copy), rspamd's
-- spam verdict, and each organisation's content policy. NULL verdicts: not
-- scanned (no scanner configured, or stored before this change).
ALTER TABLE inbound_message ADD COLUMN virus TEXT;
ALTER TABLE inbound_message ADD COLUMN virus_detail TEXT;
ALTER TABLE inbound_message ADD COLUMN spam_action TEXT;
ALTER TABLE inbound_message ADD COLUMN spam_score DOUBLE PRECISION;
ALTER TABLE inbound_message ADD COLUMN spam_required DOUBLE PRECISION;
ALTER TABLE inbound_message ADD COLUMN spam_symbols TEXT;
ALTER TABLE inbound_message ADD COLUMN spam_detail TEXT;
-- Extracted although a scanner could not answer (--unscanned pass): why.
ALTER TABLE inbound_message ADD COLUMN unscanned TEXT;
-- An admin's release of a message's infected documents (--allow-infected).
ALTER TABLE inbound_message ADD COLUMN infected_allowed_at {timestamp};

ALTER TABLE document ADD COLUMN virus TEXT;
ALTER TABLE document ADD COLUMN virus_detail TEXT;

ALTER TABLE organization ADD COLUMN on_virus TEXT NOT NULL DEFAULT 'quarantine'
    CHECK (on_virus IN ('quarantine', 'reject-documents', 'tag'));
ALTER TABLE organization ADD COLUMN spam_threshold DOUBLE PRECISION;
ALTER TABLE organization ADD COLUMN unscanned TEXT NOT NULL DEFAULT 'hold'
    CHECK (unscanned IN ('hold', 'pass'));
