-- A taken Message-ID is a duplicate only when the content matches too (issue 11).
-- NULL for rows stored before: they are duplicates of any message with their id, as before.
ALTER TABLE inbound_message ADD COLUMN content_sha256 TEXT;
ALTER TABLE inbound_message ADD COLUMN message_id_collision BOOLEAN NOT NULL DEFAULT FALSE;
