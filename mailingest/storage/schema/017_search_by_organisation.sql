-- Issue 28: a search whose matches are rare walked the trigram lists of
-- every organisation as far back as it took to fill a page. SQLite's search
-- table of migration 013 (the organisation a token of its own) is replaced
-- by one whose rowids run by organisation, then newest first, so a search
-- walks its own organisation's stretch of each list alone. It is filled in
-- batches after the migration, as 013's was, and until then search reads
-- the organisation's messages. PostgreSQL: nothing (its GIN index stays).
{search_by_organisation}
