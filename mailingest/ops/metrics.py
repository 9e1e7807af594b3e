"""
Prometheus metrics: module-level, one set per process, exported by the ops
endpoint. Names follow Prometheus conventions (C{_total} counters, base units).

With C{--processes N} the intake processes keep theirs in prometheus_client's
multiprocess files (C{PROMETHEUS_MULTIPROC_DIR}, set by their parent) and the
parent's endpoint serves the sum of its own and theirs (L{exposition}).
"""

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

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
    # Summed over the live intake processes (a dead one's connections are gone).
    multiprocess_mode="livesum",
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
INCINERATED = Counter(
    "mailingest_incinerated_messages_total",
    "Messages whose raw copy was deleted, by reason (retention, erasure); the row is kept as a tombstone.",
    ["reason"],
)
INCINERATED_BYTES = Counter(
    "mailingest_incinerated_bytes_total",
    "Bytes of raw copies and documents deleted by retention and erasure, by reason.",
    ["reason"],
)
RETENTION_DOCUMENTS = Counter(
    "mailingest_retention_deleted_documents_total",
    "Documents deleted because their organisation's documents period passed.",
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
    "Messages quarantined by their organisation's sender or content policy, by the rule broken"
    " (domain, dmarc, dkim, spf, virus, spam, unscanned).",
    ["reason"],
)
VIRUS_VERDICTS = Counter(
    "mailingest_virus_verdicts_total",
    "clamd's verdicts on scanned messages (the worst of their parts): clean, infected, error.",
    ["result"],
)
SPAM_VERDICTS = Counter(
    "mailingest_spam_verdicts_total",
    "rspamd's verdicts on scanned messages, by its action (no action, add header, reject...) or error.",
    ["action"],
)
SCAN_SECONDS = Histogram(
    "mailingest_scan_duration_seconds",
    "Time one scanner (clamd: all of a message's parts; rspamd) took for one message.",
    ["scanner"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
WEBHOOK_RECEIVERS_PAUSED = Gauge(
    "mailingest_webhook_receivers_paused",
    "Webhook receivers paused after failing again and again (none of their events is tried meanwhile).",
)
AUTH_FAILURES = Counter(
    "mailingest_auth_failures_total",
    "API and console requests with a wrong token (reason unknown_token), and those refused 429 because their address is past its budget (reason throttled), by site (api, console).",
    ["site", "reason"],
)
PARTS_SKIPPED = Counter(
    "mailingest_extraction_skipped_parts_total",
    "Parts of parsed messages that could not be decoded and were left out (named in the message's warnings).",
)


_children_dir: str | None = None


def aggregate_children(directory: str) -> None:
    """From now on L{exposition} adds the metrics of the processes writing to C{directory}."""
    global _children_dir
    _children_dir = directory


def process_ended(pid: int) -> None:
    """An intake process ended: its live gauges go (its counters stay in the sums)."""
    if _children_dir is not None:
        multiprocess.mark_process_dead(pid, _children_dir)


def exposition() -> bytes:
    """The text the ops endpoint serves: this process's metrics, plus its intake processes' when there are any."""
    if _children_dir is None:
        return generate_latest()
    registry = CollectorRegistry()
    registry.register(_Sum([REGISTRY, multiprocess.MultiProcessCollector(None, path=_children_dir)]))
    return generate_latest(registry)


def families(metric) -> list[Metric]:
    """C{metric}'s families as the ops endpoint serves them: summed over the intake processes when there are any."""
    own = list(metric.collect())
    if _children_dir is None:
        return own
    names = {family.name for family in own}
    summed = _Sum([REGISTRY, multiprocess.MultiProcessCollector(None, path=_children_dir)])
    return [family for family in summed.collect() if family.name in names]


class _Sum:
    """The families of several collectors as one: samples with the same name and labels (but C{pid}) added up."""

    def __init__(self, collectors):
        self.collectors = collectors

    def collect(self):
        families: dict[str, Metric] = {}
        values: dict[str, dict] = {}
        for collector in self.collectors:
            for family in collector.collect():
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                samples = values.setdefault(family.name, {})
                for sample in family.samples:
                    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
                    key = (sample.name, labels)
                    samples[key] = samples.get(key, 0.0) + sample.value
        for name, family in families.items():
            for (sample_name, labels), value in values[name].items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
