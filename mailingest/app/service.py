"""
The daemon's service tree, assembled from settled options.

Start-up order matters: the ops endpoint comes up at once (so /readyz can say
what is wrong), the schema is migrated (retried while the database is
unreachable), and only then do the SMTP listeners open, so a daemon never
accepts mail it cannot store.
"""

import glob
import os
import signal

from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailingest.delivery.directory import OrgDirectory
from mailingest.delivery.ingest import Ingest
from mailingest.delivery.transaction import IngestDeliveries
from mailingest.interfaces import (
    IDomainStore, IExtractionQueue, IOrgStore, IOutboxStore, IQuarantineStore, IReadStore, ISchemaStore, ISearchStore,
)
from mailingest.ops.disk_space import DiskCheck
from mailingest.errors import ConfigError
from mailingest.app.processes import IntakeProcesses, stop_reactor
from mailingest.app.settings import Settings, StorageSettings
from mailingest.extraction.service import ExtractionService
from mailingest.console.rejections import SAMPLE_SECONDS, RejectionHistory
from mailingest.console.resource import make_site
from mailingest.handoff.api import read_admin_token
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.handoff.targets import TargetPolicy
from mailingest.handoff.webhooks import WebhookService
from mailingest.storage.journal import journaled
from mailingest.storage.retention import RetentionService
from mailingest.storage.search_indexing import SearchIndexService
from mailingest.storage.sweeper import GcService, check_min_age
from mailingest.ops.http import make_ops_site
from mailingest.smtp.proxy import ENDPOINT_PREFIX, ProxyHeaderFirstFactory
from mailingest.extraction.checks import CheckPool
from mailingest.extraction.pool import ParsePool
from mailingest.scanning.scans import ScanProcess
from mailingest.verification.domain_checker import DomainChecker
from mailingest.verification.domain_proof import mail_targets
from mailingest.verification.settings import CheckSettings
from mailingest.smtp.protocol import IngestSMTPFactory
from mailingest.smtp.tls import IMPLICIT_TLS_PREFIX, ReloadableTLS, implicit_tls_endpoint
from mailingest.ops.secrets import redact_url
from mailingest.retry import Backoff, retry
from mailingest.storage.blobs import open_blobs
from mailingest.storage.store import open_store
from mailingest.storage.urls import local_dir, sqlite_path

MIGRATE_RETRY = Backoff(5.0, factor=1)
# SIGTERM to exit within 15 s: up to 10 s for DATA in progress, then the rest.
SHUTDOWN_GRACE_SECONDS = 10.0
EXTRACTION_STOP_SECONDS = 3.0
DEFAULT_SCRATCH_DIR = os.path.join("mailingest-data", "scratch")
SMTP_LIMITS = ("max_message_size", "max_recipients", "max_connections", "max_connections_per_ip", "timeout")

log = Logger(namespace="mailingest.daemon")


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """
    An endpoint that tells its L{Listener} how C{listen} went: the public way
    to the port, since L{internet.StreamServerEndpointService} keeps the
    Deferred of C{listen} in a private attribute.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, listener: "Listener"):
        self.endpoint = endpoint
        self.listener = listener

    def listen(self, factory) -> defer.Deferred:
        return self.endpoint.listen(factory).addCallbacks(self.listener.listening, self.listener.cannot_listen)


class Listener(internet.StreamServerEndpointService):
    """
    Twisted's service for one listening endpoint, plus what it leaves to us:
    the port it listens on (C{port}, None until then), a log line saying
    where, and a daemon that stops when the endpoint cannot be listened on
    (the base class only logs that). C{tls} is the reloadable certificate of
    an C{ssl:} endpoint.
    """

    def __init__(self, reactor, endpoint: IStreamServerEndpoint, factory, what: str, description: str, tls=None):
        super().__init__(_ReportingEndpoint(endpoint, self), factory)
        self.reactor = reactor
        self.what = what
        self.description = description
        self.tls: ReloadableTLS | None = tls
        self.port = None

    def listening(self, port):
        self.port = port
        log.info("{what} listening on {address}", what=self.what, address=port.getHost())
        return port

    def cannot_listen(self, failure):
        if failure.check(defer.CancelledError):
            return failure
        log.critical(
            "mailingest could not start: cannot listen on {endpoint} for {what}: {error}",
            endpoint=self.description,
            what=self.what,
            error=failure.getErrorMessage(),
        )
        stop_reactor(self.reactor)
        return None


def make_listener(reactor, description: str, factory, what: str, proxy_trusted=()) -> Listener:
    """
    A L{Listener} for an endpoint string: an C{ssl:} endpoint gets a
    reloadable certificate; a C{haproxy:} one reads PROXY headers from
    C{proxy_trusted} networks only.
    """
    endpoint_description = description
    if endpoint_description.startswith(ENDPOINT_PREFIX):
        factory = ProxyHeaderFirstFactory(factory, proxy_trusted)
        endpoint_description = endpoint_description[len(ENDPOINT_PREFIX):]
    tls = None
    if endpoint_description.startswith(IMPLICIT_TLS_PREFIX):
        endpoint, tls = implicit_tls_endpoint(reactor, endpoint_description)
    else:
        try:
            endpoint = endpoints.serverFromString(reactor, endpoint_description)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"bad {what} endpoint {endpoint_description!r}: {e}") from None
    return Listener(reactor, endpoint, factory, what, description, tls)


class TLSReloader(service.Service):
    """Reload the certificates (STARTTLS and ssl: endpoints) on SIGHUP, so a renewed certificate needs no restart."""

    def __init__(self, certificates: list[ReloadableTLS], reactor):
        self.certificates = certificates
        self.reactor = reactor
        self._previous = None

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _on_signal(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        for tls in self.certificates:
            try:
                tls.reload()
            except ConfigError as e:
                log.error("TLS certificate not reloaded, keeping the previous one: {error}", error=str(e))
                continue
            log.info("TLS certificate reloaded from {cert}: {certificate}", cert=tls.cert_path, certificate=tls.describe())


class SessionDrain(service.Service):
    """At stop, after the listeners (added after it, so stopped before it): let transactions in progress finish, within a bound."""

    def __init__(self, factory, grace: float, clock):
        self.factory = factory
        self.grace = grace
        self.clock = clock

    def stopService(self):
        super().stopService()
        return self.factory.shutdown(self.grace, self.clock)


def _migrate_failed(error: Exception, retry: int, delay: float) -> bool:
    """An unreachable database is waited for: the daemon must come up when it does."""
    log.error("cannot prepare the database ({error}); retrying in {seconds:.0f} s", error=str(error), seconds=delay)
    return True


class AfterMigration(service.MultiService):
    """
    The services that need the schema: their start waits until the schema is
    migrated (retried while the database is unreachable); then MultiService
    starts them in order. C{ready} fires once they have started.
    """

    def __init__(self, reactor, store: ISchemaStore):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.ready = defer.Deferred()
        self._starting = None
        # Fires when the build of what migrations leave to the daemon (the search index) has ended.
        self.indexing: defer.Deferred | None = None
        self._index_logged = False

    def privilegedStartService(self):
        """The children start only after the migration (so no SMTP port is open before): nothing to do yet."""
        service.Service.privilegedStartService(self)

    def startService(self):
        service.Service.startService(self)
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addErrback(self._failed_to_start)

    async def _start(self):
        applied = await retry(self.store.migrate, MIGRATE_RETRY, _migrate_failed, self.reactor)
        if applied:
            log.info("database schema upgraded: applied {versions}", versions=applied)
        super().startService()
        # After the services start, not before: filling a search index can take minutes and mail must flow meanwhile.
        self.indexing = self.store.build_indexes(self._index_progress, lambda: self.running)
        self.indexing.addErrback(lambda failure: log.error("search index: not finished: {error}", error=failure.getErrorMessage()))
        self.ready.callback(None)

    def _index_progress(self, line: str) -> None:
        # One line per batch would flood the log: the first and the last.
        if not self._index_logged or line.endswith("complete"):
            self._index_logged = True
            log.info("{line}", line=line)

    def _failed_to_start(self, failure):
        if failure.check(defer.CancelledError):
            return
        log.critical("mailingest could not start: {error}", error=failure.getErrorMessage())
        stop_reactor(self.reactor)

    def stopService(self):
        """Before the migration ends, the start is called off; once the children started (even in this turn), they stop."""
        if not self.ready.called:
            if self._starting is not None:
                self._starting.cancel()
            return defer.maybeDeferred(service.Service.stopService, self)
        return super().stopService()


class Daemon(service.MultiService):
    """
    The service tree: the ops endpoint (if any) starts at once, so /readyz can
    say what is wrong; L{AfterMigration} (C{self.serving}) holds the rest, the
    SMTP listeners last. MultiService stops its children in reverse order (it
    starts each stop without waiting for the one before): the listeners first,
    so no new session comes, then the session drain, extraction and the rest;
    once all have stopped, the storage connections close.

    The parts a test or an operator's tool looks into are given at
    construction and kept as they are: C{ops_listener}, C{api_listener} (None
    when off), C{smtp_listeners} (empty when intake processes serve SMTP),
    C{delivery} (the in-process L{Ingest}, None then too), C{extraction} and
    C{webhooks}.
    """

    def __init__(
        self, store: ISchemaStore, blobs, serving: AfterMigration, *, ops_listener: Listener | None, api_listener: Listener | None,
        smtp_listeners: list[Listener], delivery: Ingest | None, extraction: ExtractionService, webhooks: WebhookService,
    ):
        super().__init__()
        self.store = store
        self.blobs = blobs
        self.serving = serving
        self.ready = serving.ready
        self.ops_listener = ops_listener
        self.api_listener = api_listener
        self.smtp_listeners = smtp_listeners
        self.delivery = delivery
        self.extraction = extraction
        self.webhooks = webhooks
        if ops_listener is not None:
            ops_listener.setServiceParent(self)
        serving.setServiceParent(self)

    def stopService(self):
        d = super().stopService()
        d.addCallback(lambda _: defer.ensureDeferred(self._close_storage()))
        return d

    async def _close_storage(self):
        await self.store.close()
        await self.blobs.close()


def clear_spool(directory: str) -> None:
    """Spool files left by a crash were never acknowledged: the sender will retry."""
    for path in glob.glob(os.path.join(directory, "spool-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def local_data_directories(settings: StorageSettings, spool_dir: str) -> list[str]:
    """The local directories mail is written to: spool, and blobs and database when they are local."""
    directories = [spool_dir]
    if settings.storage.lower().startswith("file:"):
        directories.append(local_dir(settings.storage))
    if settings.database.lower().startswith("sqlite:"):
        directories.append(os.path.dirname(os.path.abspath(sqlite_path(settings.database))))
    return directories


def make_ingest(settings: Settings, store, blobs, spool_dir: str, parent: service.MultiService) -> Ingest:
    """What stores an accepted message, with the organisation directory it looks recipients up in."""
    directory = OrgDirectory(store)
    directory.setServiceParent(parent)
    return Ingest(
        store, blobs, directory, list(settings.domain), settings.hostname, spool_dir,
        store_timeout=settings.store_timeout,
    )


def add_smtp_side(settings: Settings, reactor, ingest: Ingest, parent: service.MultiService, listen, refusals=None) -> tuple:
    """
    The SMTP factory and its listeners (C{listen(reactor, description,
    factory, what, proxy_trusted)} makes each), the certificate reloader and
    the session drain, added to C{parent} listeners last; C{refusals} is the
    refused-recipient count an intake process shares with the others.
    Returns (the STARTTLS certificate or None, the listeners).
    """
    tls_context = None
    if settings.tls_cert:
        tls_context = ReloadableTLS(settings.tls_cert, settings.tls_key)
    factory = IngestSMTPFactory(
        IngestDeliveries(ingest),
        hostname=settings.hostname,
        max_message_size=settings.max_message_size,
        max_recipients=settings.max_recipients,
        timeout=settings.timeout,
        max_connections=settings.max_connections,
        max_connections_per_ip=settings.max_connections_per_ip,
        tls_context=tls_context,
        refusals=refusals,
    )
    listeners = [listen(reactor, description, factory, "SMTP", settings.proxy_trusted) for description in settings.smtp]
    certificates = [tls_context] if tls_context else []
    certificates += [listener.tls for listener in listeners if listener.tls]
    if certificates:
        TLSReloader(certificates, reactor).setServiceParent(parent)
    SessionDrain(factory, SHUTDOWN_GRACE_SECONDS, reactor).setServiceParent(parent)
    for listener in listeners:
        listener.setServiceParent(parent)
    return tls_context, listeners


def spool_directory(scratch: str) -> str:
    """The spool under C{scratch}, emptied of what a crash left."""
    spool_dir = os.path.join(scratch, "spool")
    os.makedirs(spool_dir, exist_ok=True)
    clear_spool(spool_dir)
    return spool_dir


def make_ops_listener(settings: Settings, store: IReadStore, readiness_checks: dict, reactor) -> Listener | None:
    """The ops endpoint (health, readiness, metrics), None with C{--http none}."""
    if settings.http == "none":
        return None
    site = make_ops_site(readiness_checks, queue_depth=lambda: store.count_messages("received"))
    return make_listener(reactor, settings.http, site, "ops HTTP")


def make_extraction(settings: Settings, store: "IExtractionQueue | IQuarantineStore", blobs, scratch: str, reactor) -> ExtractionService:
    """Extraction with its parser and sender-check worker pools."""
    return ExtractionService(
        store,
        blobs,
        ParsePool(
            settings.extraction_processes,
            settings.extraction_timeout,
            reactor,
            memory_limit=settings.extraction_memory_limit,
            inline_images=settings.inline_images,
        ),
        work_dir=os.path.join(scratch, "work"),
        concurrency=settings.extraction_processes + 1,
        poll_interval=settings.poll_interval,
        max_attempts=settings.max_attempts,
        lease_seconds=settings.extraction_lease,
        stop_timeout=EXTRACTION_STOP_SECONDS,
        checks=CheckSettings(settings.hostname, settings.dns_resolver, settings.dns_budget),
        checker=CheckPool(timeout=settings.extraction_timeout, reactor=reactor, memory_limit=settings.extraction_memory_limit),
        scanner=make_scanner(settings, reactor),
    )


def make_scanner(settings: Settings, reactor) -> ScanProcess | None:
    """The scan process of the scanners configured (C{--clamd}, C{--rspamd}), or None: no content verdicts."""
    if settings.clamd is None and settings.rspamd is None:
        return None
    return ScanProcess(
        settings.clamd,
        settings.rspamd,
        settings.hostname,
        settings.scan_budget,
        settings.clamd_max_stream,
        reactor,
        memory_limit=settings.extraction_memory_limit,
    )


def make_webhooks(settings: Settings, store: IOutboxStore, reactor) -> WebhookService:
    return WebhookService(
        store,
        TargetPolicy(settings.webhook_allow_http, settings.webhook_allow_private),
        reactor,
        horizon=settings.webhook_retry_horizon,
        api_url=settings.api_public_url,
    )


def make_api_listener(
    settings: Settings,
    store: "IReadStore | ISearchStore | IExtractionQueue | IQuarantineStore | IOutboxStore | IOrgStore | ISchemaStore",
    blobs,
    readiness_checks: dict,
    reactor,
    parent: service.MultiService,
) -> Listener:
    """The API and console endpoint, with the rejection history its status page shows (sampled under C{parent})."""
    rejections = RejectionHistory(reactor)
    internet.TimerService(SAMPLE_SECONDS, rejections.sample).setServiceParent(parent)
    site = make_site(
        store,
        blobs,
        reactor,
        rejections,
        read_admin_token(settings.api_admin_token_file),
        settings.api_public_url,
        checks=readiness_checks,
        mail_host=settings.hostname,
    )
    return make_listener(reactor, settings.api, site, "API")


def make_domain_checker(settings: Settings, store: IDomainStore, reactor) -> DomainChecker:
    """The re-checks of custom domains, through the sender checks' resolver and DNS budget."""
    return DomainChecker(
        store, mail_targets(settings.hostname, settings.mx_host), settings.dns_resolver, settings.dns_budget, reactor,
        grace=settings.domain_grace, interval=settings.domain_check_interval,
    )


def build_daemon(settings: Settings, reactor=None, environ=os.environ) -> Daemon:
    """The daemon's service tree, wired from parts each made from the settings it needs."""
    if reactor is None:
        from twisted.internet import reactor
    store = open_store(settings.database, MESSAGE_EVENTS)
    blobs = open_blobs(settings.storage, settings.s3_endpoint, settings.s3_region, environ)
    # Spool and work files live beside the blobs when they are on local disk,
    # so storing them is a hard link rather than a copy.
    scratch = blobs.scratch_dir or DEFAULT_SCRATCH_DIR
    # Every put written down first, so the sweeper looks at what changed (issue 28).
    blobs = journaled(blobs, scratch)
    spool_dir = spool_directory(scratch)
    disk = DiskCheck(local_data_directories(settings, spool_dir), settings.min_free_space)
    readiness_checks = {"database": store.check, "storage": blobs.check, "disk": disk}
    ops_listener = make_ops_listener(settings, store, readiness_checks, reactor)
    serving = AfterMigration(reactor, store)
    extraction = make_extraction(settings, store, blobs, scratch, reactor)
    if settings.multi_process:
        delivery = None
        intake = IntakeProcesses(reactor, settings, store, extraction.wake, os.path.join(scratch, "metrics"))
    else:
        delivery = make_ingest(settings, store, blobs, spool_dir, serving)
        delivery.on_stored.append(extraction.wake)
    extraction.setServiceParent(serving)
    webhooks = make_webhooks(settings, store, reactor)
    webhooks.setServiceParent(serving)
    api_listener = None
    if settings.api != "none":
        api_listener = make_api_listener(settings, store, blobs, readiness_checks, reactor, serving)
        api_listener.setServiceParent(serving)
    make_domain_checker(settings, store, reactor).setServiceParent(serving)
    SearchIndexService(store, clock=reactor).setServiceParent(serving)
    if settings.gc_interval:
        min_age = check_min_age(settings.gc_min_age, settings.gc_floor)
        GcService(store, blobs, settings.gc_interval, min_age, reactor, blobs.journal).setServiceParent(serving)
    if settings.retention_interval:
        RetentionService(store, blobs, settings.retention_interval, clock=reactor).setServiceParent(serving)
    if settings.multi_process:
        intake.setServiceParent(serving)
        tls_context, smtp_listeners = intake.tls_context, []
    else:
        tls_context, smtp_listeners = add_smtp_side(settings, reactor, delivery, serving, make_listener)

    log_start(settings, tls_context, smtp_listeners)
    return Daemon(
        store, blobs, serving, ops_listener=ops_listener, api_listener=api_listener, smtp_listeners=smtp_listeners,
        delivery=delivery, extraction=extraction, webhooks=webhooks,
    )


def log_start(settings: Settings, starttls: ReloadableTLS | None, listeners: list[Listener]) -> None:
    """What the daemon stores where, and what a client of it meets: limits and TLS, so the log answers 'what was running?'."""
    log.info(
        "mailingest starting: database {database}, storage {storage}, domains {domains}",
        database=redact_url(settings.database),
        storage=settings.storage,
        domains=", ".join(settings.domain),
    )
    log.info(
        "SMTP limits: messages up to {max_message_size} bytes and {max_recipients} recipients, "
        "{max_connections} connections ({max_connections_per_ip} per address), idle timeout {timeout:g} s",
        **{key: getattr(settings, key) for key in SMTP_LIMITS},
    )
    if starttls is None:
        log.info("STARTTLS off (no --tls-cert)")
    else:
        log.info("STARTTLS on, certificate {cert}: {certificate}", cert=starttls.cert_path, certificate=starttls.describe())
    implicit = [listener for listener in listeners if listener.tls]
    if not implicit:
        log.info("implicit TLS: no ssl: endpoint")
    for listener in implicit:
        log.info(
            "implicit TLS on {endpoint}, certificate {cert}: {certificate}",
            endpoint=listener.description,
            cert=listener.tls.cert_path,
            certificate=listener.tls.describe(),
        )
