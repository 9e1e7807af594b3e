-- Issue 28: SQLite's search table leaves the database for a file of its own,
-- written behind intake by a connection of its own. In the database, FTS5
-- merged the table's segments inside some message inserts, holding the one
-- write lock for up to hundreds of milliseconds at a million messages. What
-- changes or goes (an erasure's redaction, a deletion) is queued in
-- message_search_stale, in the transaction that changes it, for the index
-- to forget. The index is filled again from the messages after this
-- migration, newest first, while the daemon runs. PostgreSQL: nothing
-- (its GIN indexes are the database's own).
{search_in_own_file}
