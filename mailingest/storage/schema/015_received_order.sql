-- Issue 28: a page filtered by received date (the API's since, the console's
-- from and to) is read in received order, newest first, ties by id, from
-- (org_id, received_at, id), so no engine sorts the rows of the range. On
-- SQLite (org_id, received_at) is that index already (its entries end with
-- the rowid, which is the id): nothing to do. On PostgreSQL the id is added
-- (seconds at a million rows, in the migration's transaction).
{org_received_id}
