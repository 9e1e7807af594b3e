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

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from mailingest.delivery.directory import OrgDirectory
from mailingest.delivery.ingest import Ingest
from mailingest.ops.disk_space import DiskCheck
from mailingest.errors import ConfigError
from mailingest.extraction.service import ExtractionService
from mailingest.storage.sweeper import GcService, check_min_age
from mailingest.ops.http import make_ops_site
from mailingest.smtp.proxy import ENDPOINT_PREFIX, ProxyHeaderFirstFactory
from mailingest.extraction.pool import ParsePool
from mailingest.smtp.protocol import IngestSMTPFactory
from mailingest.smtp.tls import IMPLICIT_TLS_PREFIX, ReloadableTLS, implicit_tls_endpoint
from mailingest.ops.secrets import redact_url
from mailingest.storage.urls import local_dir, open_blobs, open_store, sqlite_path

MIGRATE_RETRY_SECONDS = 5.0
# SIGTERM to exit within 15 s: up to 10 s for DATA in progress, then the rest.
SHUTDOWN_GRACE_SECONDS = 10.0
EXTRACTION_STOP_SECONDS = 3.0
DEFAULT_SCRATCH_DIR = os.path.join("mailingest-data", "scratch")
SMTP_LIMITS = ("max_message_size", "max_recipients", "max_connections", "max_connections_per_ip", "timeout")

log = Logger(namespace="mailingest.daemon")


class Listener(service.Service):
    """
    Listens on one endpoint string; a port that cannot be opened stops the
    daemon. An C{ssl:} endpoint gets a reloadable certificate (C{self.tls});
    a C{haproxy:} one reads PROXY headers from C{proxy_trusted} networks only.
    """

    def __init__(self, reactor, description: str, factory, what: str, proxy_trusted=()):
        self.factory = factory
        self.what = what
        self.port = None
        self.tls: ReloadableTLS | None = None
        self.description = description
        if description.startswith(ENDPOINT_PREFIX):
            self.factory = ProxyHeaderFirstFactory(factory, proxy_trusted)
            description = description[len(ENDPOINT_PREFIX):]
        if description.startswith(IMPLICIT_TLS_PREFIX):
            self.endpoint, self.tls = implicit_tls_endpoint(reactor, description)
            return
        try:
            self.endpoint = endpoints.serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"bad {what} endpoint {description!r}: {e}") from None

    def startService(self):
        super().startService()
        d = self.endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            log.info("{what} listening on {address}", what=self.what, address=port.getHost())

        return d.addCallback(listening)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


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
    """At stop, after the listeners closed: let transactions in progress finish, within a bound."""

    def __init__(self, factory, grace: float, clock):
        self.factory = factory
        self.grace = grace
        self.clock = clock

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self.factory.shutdown(self.grace, self.clock))


class Daemon(service.MultiService):
    """
    Children in C{self.early} start with the daemon; the others only once the
    schema is in place. Everything stops in reverse order, then the storage
    connections close.
    """

    def __init__(self, reactor, store, blobs):
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.blobs = blobs
        self.early: list[service.IService] = []
        self.ready = defer.Deferred()
        self._starting = None

    def startService(self):
        service.Service.startService(self)
        for child in self.early:
            defer.maybeDeferred(child.startService).addErrback(self._failed_to_start)
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addErrback(self._failed_to_start)

    async def _start(self):
        while True:
            try:
                applied = await self.store.migrate()
                break
            except Exception as e:
                log.error(
                    "cannot prepare the database ({error}); retrying in {seconds:.0f} s",
                    error=str(e),
                    seconds=MIGRATE_RETRY_SECONDS,
                )
                await task.deferLater(self.reactor, MIGRATE_RETRY_SECONDS, lambda: None)
        if applied:
            log.info("database schema upgraded: applied {versions}", versions=applied)
        for child in self:
            if child not in self.early:
                await defer.maybeDeferred(child.startService)
        self.ready.callback(None)

    def _failed_to_start(self, failure):
        if failure.check(defer.CancelledError):
            return
        log.critical("mailingest could not start: {error}", error=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self):
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for child in reversed(list(self)):
            if child.running:
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception as e:
                    log.error("error while stopping {child}: {error}", child=child, error=str(e))
        await self.store.close()
        await self.blobs.close()

    def stopService(self):
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop())


def clear_spool(directory: str) -> None:
    """Spool files left by a crash were never acknowledged: the sender will retry."""
    for path in glob.glob(os.path.join(directory, "spool-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def local_data_directories(settings: dict, spool_dir: str) -> list[str]:
    """The local directories mail is written to: spool, and blobs and database when they are local."""
    directories = [spool_dir]
    if settings["storage"].lower().startswith("file:"):
        directories.append(local_dir(settings["storage"]))
    if settings["database"].lower().startswith("sqlite:"):
        directories.append(os.path.dirname(os.path.abspath(sqlite_path(settings["database"]))))
    return directories


def build_daemon(settings: dict, reactor=None, environ=os.environ):
    if reactor is None:
        from twisted.internet import reactor
    if any(d.startswith(ENDPOINT_PREFIX) for d in settings["smtp"]) and not settings["proxy_trusted"]:
        raise ConfigError(
            "a haproxy: endpoint believes the client address its peer sends: "
            "give --proxy-trusted with the networks of your load balancers (CIDR)"
        )
    store = open_store(settings["database"])
    blobs = open_blobs(settings["storage"], settings["s3_endpoint"], settings["s3_region"], environ)
    daemon = Daemon(reactor, store, blobs)

    # Spool and work files live beside the blobs when they are on local disk,
    # so storing them is a hard link rather than a copy.
    scratch = getattr(blobs, "scratch_dir", DEFAULT_SCRATCH_DIR)
    spool_dir = os.path.join(scratch, "spool")
    os.makedirs(spool_dir, exist_ok=True)
    clear_spool(spool_dir)

    if settings["http"] != "none":
        disk = DiskCheck(local_data_directories(settings, spool_dir), settings["min_free_space"])
        site = make_ops_site(
            {"database": store.check, "storage": blobs.check, "disk": disk},
            queue_depth=lambda: store.count_messages("received"),
        )
        ops = Listener(reactor, settings["http"], site, "ops HTTP")
        ops.setServiceParent(daemon)
        daemon.early.append(ops)

    directory = OrgDirectory(store)
    directory.setServiceParent(daemon)
    ingest = Ingest(
        store, blobs, directory, settings["domain"], settings["hostname"], spool_dir,
        store_timeout=settings["store_timeout"],
    )
    extraction = ExtractionService(
        store,
        blobs,
        ParsePool(
            settings["extraction_processes"],
            settings["extraction_timeout"],
            reactor,
            memory_limit=settings["extraction_memory_limit"],
        ),
        work_dir=os.path.join(scratch, "work"),
        concurrency=settings["extraction_processes"] + 1,
        poll_interval=settings["poll_interval"],
        max_attempts=settings["max_attempts"],
        lease_seconds=settings["extraction_lease"],
        stop_timeout=EXTRACTION_STOP_SECONDS,
    )
    extraction.setServiceParent(daemon)
    ingest.on_stored.append(extraction.wake)
    if settings["gc_interval"]:
        min_age = check_min_age(settings["gc_min_age"], settings)
        GcService(store, blobs, settings["gc_interval"], min_age, reactor).setServiceParent(daemon)

    tls_context = None
    if settings["tls_cert"]:
        tls_context = ReloadableTLS(settings["tls_cert"], settings["tls_key"])

    factory = IngestSMTPFactory(
        ingest,
        hostname=settings["hostname"],
        max_message_size=settings["max_message_size"],
        max_recipients=settings["max_recipients"],
        timeout=settings["timeout"],
        max_connections=settings["max_connections"],
        max_connections_per_ip=settings["max_connections_per_ip"],
        tls_context=tls_context,
    )
    listeners = [
        Listener(reactor, description, factory, "SMTP", settings["proxy_trusted"]) for description in settings["smtp"]
    ]
    certificates = [tls_context] if tls_context else []
    certificates += [listener.tls for listener in listeners if listener.tls]
    if certificates:
        TLSReloader(certificates, reactor).setServiceParent(daemon)
    SessionDrain(factory, SHUTDOWN_GRACE_SECONDS, reactor).setServiceParent(daemon)
    for listener in listeners:
        listener.setServiceParent(daemon)

    log.info(
        "mailingest starting: database {database}, storage {storage}, domains {domains}",
        database=redact_url(settings["database"]),
        storage=settings["storage"],
        domains=", ".join(settings["domain"]),
    )
    log_smtp_policy(settings, tls_context, listeners)
    daemon.delivery = ingest
    daemon.extraction = extraction
    return daemon


def log_smtp_policy(settings: dict, starttls: ReloadableTLS | None, listeners: list[Listener]) -> None:
    """What a client of this daemon meets: limits and TLS, so the log answers 'what was running?'."""
    log.info(
        "SMTP limits: messages up to {max_message_size} bytes and {max_recipients} recipients, "
        "{max_connections} connections ({max_connections_per_ip} per address), idle timeout {timeout:g} s",
        **{key: settings[key] for key in SMTP_LIMITS},
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
