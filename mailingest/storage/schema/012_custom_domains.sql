-- Verified custom domains of an organisation (issue 27): mail for any local
-- part (or only those listed, comma-separated in local_parts) at a verified
-- domain goes to its organisation. domain is the A-label form, lower case,
-- without a trailing dot (mailingest.delivery.domains.domain_key), so one
-- domain is one row whatever form it was given in. A domain is 'pending'
-- until its TXT and MX records prove it, 'verified' while they do, and
-- 'suspended' when its TXT record has been missing past the grace period.
CREATE TABLE org_domain (
    id               {id},
    org_id           BIGINT      NOT NULL REFERENCES organization (id),
    domain           TEXT        NOT NULL UNIQUE,
    token            TEXT        NOT NULL,
    local_parts      TEXT        NOT NULL DEFAULT '',
    status           TEXT        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'verified', 'suspended')),
    created_at       {timestamp} NOT NULL,
    checked_at       {timestamp},
    verified_at      {timestamp},
    txt_missing_since {timestamp},
    next_check_at    {timestamp} NOT NULL,
    last_error       TEXT
);
CREATE INDEX org_domain_org ON org_domain (org_id);
CREATE INDEX org_domain_next_check ON org_domain (next_check_at);

-- Bumped by every change that alters routing (a domain added, removed,
-- verified, suspended, its local parts): the SMTP side re-reads the verified
-- domains only when it moved, so 10,000 of them cost one small query per refresh.
CREATE TABLE org_domain_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  BIGINT  NOT NULL
);
INSERT INTO org_domain_version (id, version) VALUES (1, 0);

-- Which of the recipient domains a message came in on (its addresses are rcpt_to).
ALTER TABLE inbound_message ADD COLUMN rcpt_domain TEXT;
