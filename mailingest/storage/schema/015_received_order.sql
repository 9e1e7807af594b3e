-- Issue 28: a page filtered by received date (the API's since, the console's
-- from and to) or by sender is read in received order, newest first, ties by
-- id, from an index in that order, so no engine sorts the rows of the range
-- or of the sender. The then_id term is ", id" on PostgreSQL and nothing on
-- SQLite, whose index entries end with the rowid, the id: (org_id,
-- received_at) is that index on SQLite already, the org_received_id term
-- adds the id on PostgreSQL. (org_id, LOWER(mail_from), id) becomes (org_id,
-- LOWER(mail_from), received_at, id): a sender's page, with or without a
-- date range. Seconds at a million rows, in the migration's transaction.
{org_received_id}
DROP INDEX inbound_message_org_sender;
CREATE INDEX inbound_message_org_sender ON inbound_message (org_id, LOWER(mail_from), received_at{then_id});
