-- Issue 28: every page of an organisation's messages served by an index in
-- its order (newest first by id), whatever the filter, and search that does
-- not read every row.
--
-- (org_id, id): an organisation's pages, newest first, without sorting its
-- rows. (org_id, status, id) replaces (org_id, status): the same prefix, and
-- a status filter keeps the id order. (org_id, LOWER(mail_from), id): the
-- console's sender filter. (received_at, org_id, status): the organisations
-- page counts today's messages of every organisation in one range scan.
-- Building each takes seconds at a million rows, not minutes.
-- The search index. SQLite: an FTS5 trigram table kept in step by triggers,
-- filled for existing rows in batches after the migration (see
-- SchemaStore.build_indexes). PostgreSQL: nothing here, a pg_trgm GIN index
-- is built with CREATE INDEX CONCURRENTLY, outside any transaction, by
-- the same step.
{message_search}
CREATE INDEX inbound_message_org_id ON inbound_message (org_id, id);
DROP INDEX inbound_message_org_status;
CREATE INDEX inbound_message_org_status ON inbound_message (org_id, status, id);
CREATE INDEX inbound_message_org_sender ON inbound_message (org_id, LOWER(mail_from), id);
CREATE INDEX inbound_message_received ON inbound_message (received_at, org_id, status);
-- A status across organisations (the admin command's messages list --status).
CREATE INDEX inbound_message_status ON inbound_message (status, id);
