-- The blob sweeper asks which of a page of keys rows still reference: without
-- these indexes each question would scan both tables.
CREATE INDEX inbound_message_raw_key ON inbound_message (raw_key);
CREATE INDEX document_storage_key ON document (storage_key);
