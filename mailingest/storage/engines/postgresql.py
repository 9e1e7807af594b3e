"""
The production database: PostgreSQL through txpostgres, shared by many daemons.

Interactions run on a L{txpostgres.txpostgres.ConnectionPool} that starts
with C{min_connections} and grows up to C{max_connections} while interactions
wait for a connection. Every statement is really asynchronous: an interaction
may hold a transaction (and its row locks) across other Deferreds.

A daemon must outlive database restarts. Each connection carries its own
reconnector: when its server goes away (noticed while idle, or by a failing
statement) it is closed and reopened with backoff (at once, then 0.5 s doubling
to 10 s), and meanwhile every interaction that picks it fails at once with
L{DatabaseUnavailable} instead of waiting. The SMTP side turns that into a 451;
nothing has to restart the daemon.

The URL's password never leaves this module: representations, log events and
L{DatabaseUnavailable} messages show the URL with C{***} in its place.
"""

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from twisted.internet import defer, task
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from zope.interface import implementer

from mailingest.errors import ConfigError, MailingestError
from mailingest.ops.secrets import masker, redact_url, url_passwords, url_problem
from mailingest.retry import Backoff, retry
from mailingest.storage.engines import CursorTransaction, Engine, IEngine

log = Logger()

CONNECT_TIMEOUT = 10.0
# Between reconnection attempts: the first at once (a single killed backend
# comes back immediately), then 0.5 s doubling up to 10 s.
RECONNECT_BACKOFF = Backoff(0.5, maximum=10.0)

# Defaults an operator would want from a long-lived daemon; the URL overrides
# them. Keepalives notice a server that vanished without closing the socket.
DEFAULT_OPTIONS = {
    "application_name": "mailingest",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


class DatabaseUnavailable(MailingestError):
    """The database cannot be reached now; retrying later may succeed."""


def _pyformat(sql: str) -> str:
    """Our C{?} placeholders in psycopg2's style (a literal C{%} doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _Target:
    """Where to connect, and how to speak of it without the password."""

    dsn: str
    public: str
    mask: Callable[[str], str]
    connect_timeout: float
    options: dict

    def reason(self, error: BaseException) -> str:
        """Why C{error} made the database unavailable, in one line without the password."""
        if isinstance(error, txpostgres.RollbackFailed):
            error = error.originalFailure.value
        if isinstance(error, ConnectionDead):
            return "connection lost, reconnecting"
        if isinstance(error, ConnectionClosed):
            return "connection closed"
        return self.mask(" ".join(str(error).split()) or type(error).__name__)

    def unavailable(self, error: BaseException) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"database {self.public} unavailable: {self.reason(error)}")


def _target(url: str) -> _Target:
    public = redact_url(url)
    mask = masker(url_passwords(url))
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"bad database URL {public!r}: {problem}")
    try:
        params = psycopg2.extensions.parse_dsn(url)
    except psycopg2.Error as e:
        raise ConfigError(f"bad database URL {public!r}: {mask(' '.join(str(e).split()))}") from None
    try:
        connect_timeout = float(params.get("connect_timeout") or CONNECT_TIMEOUT)
    except ValueError:
        raise ConfigError(f"bad database URL {public!r}: connect_timeout is not a number") from None
    return _Target(
        dsn=url,
        public=public,
        mask=mask,
        connect_timeout=connect_timeout,
        options={
            "cursor_factory": psycopg2.extras.RealDictCursor,
            **{k: v for k, v in DEFAULT_OPTIONS.items() if k not in params},
        },
    )


class _Reconnector(DeadConnectionDetector):
    """
    Reopen one connection with backoff after it died; while it is dead, calls
    on it fail at once with C{ConnectionDead}.

    txpostgres's own detector cannot be stopped (its retry loop would outlive
    L{PostgresqlEngine.close}) and treats every OperationalError (a deadlock, a
    cancelled statement) as a dead connection; here a connection is dead when
    psycopg2 closed it.
    """

    def __init__(self, reactor, target: _Target):
        super().__init__(deathChecker=self._is_dead, reactor=reactor)
        self._target = target
        self._reconnecting: defer.Deferred | None = None
        self._waiting = False
        self._stopped = False

    def _is_dead(self, failure: Failure) -> bool:
        conn = self.reconnectable.pollable() if self.reconnectable else None
        return conn is None or bool(conn.closed) or bool(failure.check(txpostgres.RollbackFailed))

    def lost(self, failure: Failure) -> None:
        """Treat the connection as dead although psycopg2 did not close it (a failed connect)."""
        if not self.connectionIsDead:
            self.connectionIsDead = True
            self.startReconnecting(failure)

    def startReconnecting(self, f: Failure) -> None:
        if self._stopped:
            return
        log.warn(
            "database {where} unavailable ({reason}); reconnecting",
            where=self._target.public,
            reason=self._target.reason(f.value),
        )
        self._waiting = True
        self._reconnecting = task.deferLater(self.reactor, 0, self._reconnect_with_backoff)
        # It fails only when stopped: nothing to report then.
        self._reconnecting.addCallbacks(lambda _: self.connectionRecovered(), lambda _: None)

    def _reconnect_with_backoff(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(retry(self._attempt, RECONNECT_BACKOFF, self._try_again, self.reactor))

    def _attempt(self) -> defer.Deferred:
        self._waiting = False
        return self.reconnect()

    def _try_again(self, error: Exception, retry_number: int, delay: float) -> bool:
        self._waiting = not self._stopped
        return self._waiting

    def connectionRecovered(self):
        log.info("database {where}: connection re-established", where=self._target.public)
        return super().connectionRecovered()

    def stop(self) -> None:
        """Reconnect no more: a wait for the next attempt is cancelled; an attempt under way (libpq must finish it) is the last."""
        self._stopped = True
        if self._waiting:
            self._reconnecting.cancel()


class _Connection(txpostgres.Connection):
    """
    A txpostgres connection that reconnects itself, gives up connecting after
    a timeout (libpq ignores C{connect_timeout} for asynchronous connections),
    and reports a lost server as L{DatabaseUnavailable}.
    """

    def __init__(self, reactor, cooperator, target: _Target):
        super().__init__(reactor, cooperator, detector=_Reconnector(reactor, target))
        self._target = target

    def open(self) -> defer.Deferred:
        return self.connect(self._target.dsn, **self._target.options)

    def connect(self, *args, **kwargs) -> defer.Deferred:
        d = super().connect(*args, **kwargs)
        if d.called:
            return d
        timeout = self._target.connect_timeout
        timer = self.reactor.callLater(timeout, self.close)

        def settle(result):
            if timer.active():
                timer.cancel()
                return result
            return Failure(TimeoutError(f"no answer within {timeout:g} s"))

        return d.addBoth(settle)

    def doRead(self):
        # An idle connection whose server went away: hand the error to the
        # reactor as the reason the connection was lost (which starts the
        # reconnection) instead of raising, which it would log as unhandled.
        # A connection libpq has given up on has no socket (fd -1): re-adding
        # it as a reader raises ValueError, which means the same thing.
        try:
            return super().doRead()
        except (psycopg2.OperationalError, psycopg2.InterfaceError, ValueError) as e:
            return e

    def runInteraction(self, interaction, *args, **kwargs) -> defer.Deferred:
        d = self.lock.run(
            self.detector.callChecking, self._transaction, interaction, *args, **kwargs
        )
        return d.addErrback(self._unavailable_if_dead)

    @defer.inlineCallbacks
    def _transaction(self, interaction, *args, **kwargs):
        # txpostgres's own version logs a failed ROLLBACK as an unhandled
        # error, which is what happens whenever the server dies mid-transaction.
        cursor = self.cursor()
        yield cursor.execute("BEGIN")
        try:
            result = yield interaction(cursor, *args, **kwargs)
        except Exception:
            failed = Failure()
            if not self.pollable().closed:
                try:
                    yield cursor.execute("ROLLBACK")
                except Exception:
                    raise txpostgres.RollbackFailed(self, failed) from None
            failed.raiseException()
        yield cursor.execute("COMMIT")
        return result

    def _unavailable_if_dead(self, failure: Failure):
        if self.detector.connectionIsDead:
            raise self._target.unavailable(failure.value) from failure.value
        return failure

    def shutdown(self) -> None:
        """Close for good: no reconnection, pending work fails."""
        self.detector.stop()
        if self.pollable() is not None:
            self.close()


class _Pool(txpostgres.ConnectionPool):
    """txpostgres's pool, building its first connections with our factory."""

    def __init__(self, factory: Callable, size: int, reactor):
        self.connectionFactory = factory
        self.reactor = reactor
        super().__init__(None, min=size)


class _PostgresqlTransaction(CursorTransaction):
    def execute(self, sql: str, args: tuple = ()) -> defer.Deferred:
        return self._cursor.execute(_pyformat(sql), tuple(args)).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def read_within(self, seconds: float, sql: str, args: tuple = ()):
        # The server's statement_timeout, inside a savepoint: a cancelled
        # statement aborts only what follows the savepoint, and rolling back to
        # it also ends the SET LOCAL.
        yield self.execute("SAVEPOINT read_within")
        yield self.execute(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
        try:
            yield self.execute(sql, args)
        except defer.CancelledError:  # txpostgres's name for the server's "canceling statement"
            yield self.execute("ROLLBACK TO SAVEPOINT read_within")
            yield self.execute("RELEASE SAVEPOINT read_within")
            return None
        rows = self.fetchall()
        yield self.execute("SET LOCAL statement_timeout TO DEFAULT")
        yield self.execute("RELEASE SAVEPOINT read_within")
        return rows


@implementer(IEngine)
class PostgresqlEngine(Engine):
    skip_locked = " FOR UPDATE SKIP LOCKED"
    indexed_by = ""
    integrity_errors = (psycopg2.IntegrityError,)
    # Migration 013's search index is built outside the migration (CREATE INDEX CONCURRENTLY); 017 is SQLite's.
    schema_terms = {
        "id": "BIGSERIAL PRIMARY KEY", "timestamp": "TIMESTAMPTZ", "now": "now()", "message_search": "", "search_by_organisation": "", "search_in_own_file": "",
        "org_received_id": "DROP INDEX inbound_message_org_received;"
        " CREATE INDEX inbound_message_org_received ON inbound_message (org_id, received_at, id);",
        "then_id": ", id",
    }
    text_search = "pg_trgm"
    # Shared by any number of daemons.
    exclusive = False
    session_locks = True

    def __init__(self, url: str, min_connections: int = 1, max_connections: int = 4, reactor=None):
        if not 1 <= min_connections <= max_connections:
            raise ValueError("need 1 <= min_connections <= max_connections")
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._target = _target(url)
        self._min = min_connections
        self._max = max_connections
        self._pool: _Pool | None = None
        self._connections: list[_Connection] = []
        self._size = 0
        self._growing = 0
        self._busy = 0
        self._closed = False
        self._start_lock = defer.DeferredLock()
        self._listener: _Connection | None = None
        self._listen_lock = defer.DeferredLock()
        self._channels: dict[str, list[Callable[[str], object]]] = {}
        self._claimer: _Connection | None = None
        self._claim_lock = defer.DeferredLock()
        self._readers = defer.DeferredSemaphore(max(1, max_connections - 1))

    def __repr__(self) -> str:
        return f"<PostgresqlEngine {self._target.public}>"

    def _new_connection(self, reactor=None, cooperator=None) -> _Connection:
        conn = _Connection(reactor or self._reactor, cooperator, self._target)
        self._connections.append(conn)
        return conn

    def _open(self, conn: _Connection, retry: bool) -> defer.Deferred:
        """Connect C{conn}; on failure keep retrying in the background if C{retry}."""

        def failed(failure: Failure):
            if retry:
                conn.detector.lost(failure)
            raise self._target.unavailable(failure.value) from failure.value

        return conn.open().addErrback(failed)

    def start(self) -> defer.Deferred:
        """
        Open the first C{min_connections} connections (the first interaction
        does it anyway). Fails with L{DatabaseUnavailable} when none could be
        opened; the pool then keeps reconnecting in the background.
        """
        return self._start_lock.run(self._start)

    @defer.inlineCallbacks
    def _start(self):
        if self._closed:
            raise DatabaseUnavailable(f"database {self._target.public} is closed")
        if self._pool is not None:
            return
        self._pool = _Pool(self._new_connection, self._min, self._reactor)
        self._size = self._min
        results = yield defer.DeferredList(
            [self._open(conn, retry=True) for conn in self._connections], consumeErrors=True
        )
        failures = [result for ok, result in results if not ok]
        if len(failures) == len(results):
            failures[0].raiseException()

    def interaction(self, fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """Run C{fn(txn, *args, **kwargs)} in one transaction on a pooled connection."""
        return self._interaction(fn, args, kwargs)

    def reading(self, fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """
        A read-only transaction; at most all connections but one read at
        once, so one is always left for the writes.
        """

        @defer.inlineCallbacks
        def read_only(txn):
            yield txn.execute("SET TRANSACTION READ ONLY")
            return (yield fn(txn, *args, **kwargs))

        return self._readers.run(self._interaction, read_only, (), {})

    def background(self, fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """The same as L{interaction}: rows are locked one by one here, nothing waits on a whole-database lock."""
        return self._interaction(fn, args, kwargs)

    @defer.inlineCallbacks
    def _interaction(self, fn, args, kwargs):
        yield self.start()
        self._busy += 1
        try:
            self._grow_if_needed()
            result = yield self._pool.runInteraction(
                lambda cursor: fn(_PostgresqlTransaction(cursor), *args, **kwargs)
            )
        finally:
            self._busy -= 1
        return result

    def _grow_if_needed(self) -> None:
        planned = self._size + self._growing
        if self._busy > planned and planned < self._max:
            self._grow()

    @defer.inlineCallbacks
    def _grow(self):
        conn = self._new_connection()
        self._growing += 1
        try:
            yield self._open(conn, retry=False)
        except DatabaseUnavailable:
            conn.shutdown()
            if conn in self._connections:
                self._connections.remove(conn)
        else:
            if not self._closed:
                self._pool.add(conn)
                self._size += 1
        finally:
            self._growing -= 1

    def claiming(self, fn: Callable[..., Any], *args, **kwargs) -> defer.Deferred:
        """
        Run C{fn(txn, ...)} in one transaction on the claiming connection: not
        a pooled one but a dedicated connection opened on first use and kept
        as long as the engine, one interaction at a time. Session-level
        advisory locks taken and released there are held exactly as long as
        this daemon's session: when the daemon dies (or loses that
        connection), the server lets go of them at once.
        """
        return self._claim_lock.run(self._claiming, fn, args, kwargs)

    @defer.inlineCallbacks
    def _claiming(self, fn, args, kwargs):
        if self._closed:
            raise DatabaseUnavailable(f"database {self._target.public} is closed")
        if self._claimer is None:
            self._claimer = _Connection(self._reactor, None, self._target)
            yield self._open(self._claimer, retry=True)
        return (yield self._claimer.runInteraction(lambda cursor: fn(_PostgresqlTransaction(cursor), *args, **kwargs)))

    def autocommit(self, sql: str) -> defer.Deferred:
        """Run one statement outside any transaction (CREATE INDEX CONCURRENTLY cannot run in one)."""
        return self._autocommit(sql)

    @defer.inlineCallbacks
    def _autocommit(self, sql):
        yield self.start()
        yield self._pool.runOperation(sql)

    def notify(
        self, txn: _PostgresqlTransaction, channel: str, payload: str = ""
    ) -> defer.Deferred:
        """Wake the listeners of C{channel} (in every daemon) when C{txn} commits."""
        return txn.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def listen(self, channel: str, callback: Callable[[str], object]) -> defer.Deferred:
        """
        Call C{callback(payload)} for each notification on C{channel}, on a
        dedicated connection. Fires once listening. If the database is down it
        fails with L{DatabaseUnavailable}, but the callback stays registered and
        listening resumes by itself when the connection comes back.
        Notifications sent while disconnected are lost: listeners must also poll.
        """
        self._channels.setdefault(channel, []).append(callback)
        return self._listen_lock.run(self._listen, channel)

    @defer.inlineCallbacks
    def _listen(self, channel: str):
        if self._closed:
            raise DatabaseUnavailable(f"database {self._target.public} is closed")
        if self._listener is None:
            self._listener = _Connection(self._reactor, None, self._target)
            self._listener.addNotifyObserver(self._dispatch)
            self._listener.detector.addRecoveryHandler(self._listen_all)
            yield self._open(self._listener, retry=True)
            yield self._listen_all()
        else:
            yield self._listener.runInteraction(
                lambda cursor: cursor.execute("LISTEN " + _quote_ident(channel))
            )

    def _listen_all(self) -> defer.Deferred:
        @defer.inlineCallbacks
        def listen(cursor):
            for channel in list(self._channels):
                yield cursor.execute("LISTEN " + _quote_ident(channel))

        return self._listener.runInteraction(listen)

    def _dispatch(self, notify) -> None:
        for callback in list(self._channels.get(notify.channel, ())):
            callback(notify.payload)

    def close(self) -> defer.Deferred:
        self._closed = True
        for conn in self._connections + [c for c in (self._listener, self._claimer) if c is not None]:
            conn.shutdown()
        self._connections = []
        return defer.succeed(None)
