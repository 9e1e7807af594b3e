-- Issue 28: a search whose matches are rare walked the trigram lists of
-- every organisation as far back as it took to fill a page, so it grew with
-- the store. Each engine's search index now finds an organisation's matches
-- without walking the others'. SQLite: the FTS5 table of migration 013 is
-- replaced by one whose rowids run by organisation, then newest first
-- (filled in batches after the migration, as 013's was, until then search
-- reads the organisation's messages). PostgreSQL: nothing here, the GIN
-- index on (org_id, search text) that replaces 013's is built with CREATE
-- INDEX CONCURRENTLY, outside any transaction, by SchemaStore.build_indexes.
{search_by_organisation}
