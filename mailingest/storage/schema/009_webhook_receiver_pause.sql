-- A webhook receiver that keeps failing is paused as a whole (issue 22):
-- its failed attempts in a row (those that ended while it was not paused),
-- and until when none of its organisation's events is tried. A delivery, or
-- a new URL, clears both.
ALTER TABLE org_webhook ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE org_webhook ADD COLUMN paused_until {timestamp};
