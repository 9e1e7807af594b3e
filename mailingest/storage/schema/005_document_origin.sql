-- Issue 14: what the sender wrote beside what we made of it, and how the part was shown.
-- Rows of documents extracted before stay as they were (NULL) until a reprocess fills them in.
ALTER TABLE document ADD COLUMN original_filename TEXT;
ALTER TABLE document ADD COLUMN content_type_raw TEXT;
ALTER TABLE document ADD COLUMN disposition TEXT;
ALTER TABLE document ADD COLUMN content_id TEXT;
-- The parts a parsed message could not give (undecodable, over a bound), one per line, NULL when none.
ALTER TABLE inbound_message ADD COLUMN warnings TEXT;
