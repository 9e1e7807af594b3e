"""
Prometheus metrics: module-level, one set per process, exported by the ops
endpoint. Names follow Prometheus conventions (C{_total} counters, base units).
"""

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# One series per counter is enough for alerting; the *_created twins only add noise.
disable_created_metrics()

MESSAGES_ACCEPTED = Counter(
    "mailingest_messages_accepted_total",
    "Inbound messages stored (one per organisation).",
)
REJECTED = Counter(
    "mailingest_rejected_total",
    "SMTP commands or transactions refused, by reason.",
    ["reason"],
)
DUPLICATES = Counter(
    "mailingest_duplicates_total",
    "Messages accepted with 250 but not stored again (same organisation, Message-ID and content).",
)
BYTES_RECEIVED = Counter(
    "mailingest_received_bytes_total",
    "Bytes of message data stored (the raw copies, counted once per transaction).",
)
OPEN_CONNECTIONS = Gauge(
    "mailingest_smtp_connections",
    "SMTP connections currently open.",
)
EXTRACTIONS = Counter(
    "mailingest_extractions_total",
    "Extraction attempts, by outcome (parsed, failed, retry).",
    ["outcome"],
)
EXTRACTION_SECONDS = Histogram(
    "mailingest_extraction_duration_seconds",
    "Time to extract one message.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PARSER_REPLACED = Counter(
    "mailingest_parser_workers_replaced_total",
    "Parser worker processes that ended before the daemon stopped, by reason (timeout, died, memory).",
    ["reason"],
)
DOCUMENTS_CREATED = Counter(
    "mailingest_documents_created_total",
    "Document rows created by extraction.",
)
QUEUE_DEPTH = Gauge(
    "mailingest_queue_depth",
    "Messages received and not yet parsed or failed.",
)
GC_ORPHANS = Counter(
    "mailingest_gc_orphaned_blobs_total",
    "Blobs found by the sweeper that no row references, older than its margin.",
)
GC_REMOVED = Counter(
    "mailingest_gc_removed_blobs_total",
    "Orphaned blobs and stale temporary files removed by the sweeper.",
)
GC_REMOVED_BYTES = Counter(
    "mailingest_gc_removed_bytes_total",
    "Bytes of the orphaned blobs and stale temporary files removed by the sweeper.",
)
MESSAGE_ID_COLLISIONS = Counter(
    "mailingest_message_id_collisions_total",
    "Messages stored under a suffixed Message-ID because a different message already held theirs.",
)
SENDER_VERDICTS = Counter(
    "mailingest_sender_verdicts_total",
    "Sender check results of extracted messages, by check (spf, dkim, dmarc, arc) and result.",
    ["check", "result"],
)
QUARANTINES = Counter(
    "mailingest_quarantined_total",
    "Messages quarantined by their organisation's sender policy, by the rule broken (domain, dmarc, dkim, spf).",
    ["reason"],
)
WEBHOOK_DELIVERIES = Counter(
    "mailingest_webhook_deliveries_total",
    "Webhook delivery attempts, by outcome (delivered, retry, dead).",
    ["outcome"],
)
WEBHOOK_OUTBOX_DEPTH = Gauge(
    "mailingest_webhook_outbox_depth",
    "Webhook events pending delivery.",
)
PARTS_SKIPPED = Counter(
    "mailingest_extraction_skipped_parts_total",
    "Parts of parsed messages that could not be decoded and were left out (named in the message's warnings).",
)
