-- Issue 29: the extraction claim reads each organisation's first due
-- messages by an index instead of numbering every received message: with a
-- backlog of thousands the old claim cost more CPU than everything else a
-- message costs. A partial index holds the received messages alone, by
-- organisation then due time, and replaces (status, next_attempt_at). Every
-- writer sets next_attempt_at when a message becomes received, and rows from
-- before that get their receipt time, so "due" is one range of the index.
UPDATE inbound_message SET next_attempt_at = received_at WHERE status = 'received' AND next_attempt_at IS NULL;
DROP INDEX inbound_message_queue;
CREATE INDEX inbound_message_org_due ON inbound_message (org_id, next_attempt_at, id) WHERE status = 'received';
