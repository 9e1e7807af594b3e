"""
The store on both databases (the shared contract), and what only the
PostgreSQL engine does: parallel interactions, row claims that skip locked
rows, surviving a lost server, keeping the password secret, LISTEN/NOTIFY.
"""

import os
import re
import sqlite3
import threading
import time

import psycopg2
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, TestCase

from mailingest.errors import ConfigError
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.storage.engines.postgresql import DatabaseUnavailable, PostgresqlEngine
from mailingest.storage.engines.sqlite import SqliteEngine
from mailingest.storage.store import Store
from tests import postgres
from tests.daemon import DaemonTestCase, sleep
from tests.daemon import message as daemon_message
from tests.retention_contract import RetentionContract
from tests.store_contract import StoreContract, message


def sqlite_affinity(declared: str) -> str:
    """The type affinity SQLite gives a column declared C{declared} (section 3.1 of its datatype page)."""
    declared = declared.upper()
    if "INT" in declared:
        return "INTEGER"
    if any(word in declared for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in declared or not declared:
        return "BLOB"
    if any(word in declared for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


class SqliteStoreTests(StoreContract, RetentionContract, TestCase):
    former_schema = "sqlite"

    @defer.inlineCallbacks
    def make_store(self):
        store = Store(self.another_engine(), MESSAGE_EVENTS)
        yield store.migrate()
        return store

    def another_engine(self):
        engine = SqliteEngine(self.mktemp() + ".db")
        self.addCleanup(engine.close)
        return engine

    @defer.inlineCallbacks
    def read_only_store(self):
        engine = SqliteEngine(self.store.engine.path)
        self.addCleanup(engine.close)
        # As SQLite opens a file it may not write (root may write any file, so this test cannot make one): writes refused.
        yield engine.interaction(lambda txn: txn.execute("PRAGMA query_only = ON"))
        return Store(engine, MESSAGE_EVENTS)

    @defer.inlineCallbacks
    def describe_schema(self, txn):
        yield txn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT IN ('sqlite_sequence', 'schema_version') ORDER BY name"
        )
        tables = [row["name"] for row in txn.fetchall()]
        found = {}
        for table in tables:
            yield txn.execute("SELECT * FROM pragma_table_info(?) ORDER BY cid", (table,))
            columns = txn.fetchall()
            described = []
            for column in columns:
                default = column["dflt_value"]
                if default is not None:
                    yield txn.execute(f"SELECT {default} AS value")
                    default = txn.fetchone()["value"]
                # INTEGER PRIMARY KEY is the rowid: its declared type matters.
                kind = column["type"] if column["pk"] else sqlite_affinity(column["type"])
                described.append((column["name"], kind, column["notnull"], default, column["pk"]))
            yield txn.execute(
                "SELECT il.name AS idx, il.[unique] AS is_unique, ii.name AS col FROM pragma_index_list(?) il,"
                " pragma_index_info(il.name) ii ORDER BY il.name, ii.seqno",
                (table,),
            )
            indexes = {}
            for row in txn.fetchall():
                indexes.setdefault((row["idx"] if not row["idx"].startswith("sqlite_") else "", row["is_unique"]), []).append(row["col"])
            yield txn.execute('SELECT "table", "from", "to" FROM pragma_foreign_key_list(?)', (table,))
            keys = sorted(tuple(row.values()) for row in txn.fetchall())
            yield txn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
            checks = re.findall(r"CHECK \(.*\)\)", txn.fetchone()["sql"])
            found[table] = (described, sorted((key, tuple(cols)) for key, cols in indexes.items()), keys, checks)
        yield txn.execute("SELECT id, slug, name, active FROM organization ORDER BY id")
        return found, txn.fetchall()

    @defer.inlineCallbacks
    def columns(self, txn, table):
        yield txn.execute("SELECT name FROM pragma_table_info(?)", (table,))
        return {row["name"] for row in txn.fetchall()}

    @defer.inlineCallbacks
    def indexes(self, txn, table):
        yield txn.execute(
            "SELECT il.name AS idx, ii.name AS col FROM pragma_index_list(?) il,"
            " pragma_index_info(il.name) ii ORDER BY il.name, ii.seqno",
            (table,),
        )
        found = {}
        for row in txn.fetchall():
            found.setdefault(row["idx"], []).append(row["col"])
        return {tuple(columns) for columns in found.values()}


_class_databases: dict[type, str] = {}


def empty_database(test: TestCase) -> str:
    """
    The URL of a database for C{test}, with nothing in it: one database per
    test class (creating one can take 300 ms), its schema emptied per test.
    """
    cls = type(test)
    if cls not in _class_databases:
        _class_databases[cls] = postgres.create_database()
    url = _class_databases[cls]
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        conn.close()
    return url


def postgresql_engine(test: TestCase, url: str | None = None, **kwargs) -> PostgresqlEngine:
    """A PostgresqlEngine on an empty database (or C{url}), closed after C{test}."""
    engine = PostgresqlEngine(url or empty_database(test), **kwargs)
    test.addCleanup(engine.close)
    return engine


class PostgresqlStoreTests(StoreContract, RetentionContract, TestCase):
    former_schema = "postgresql"

    @defer.inlineCallbacks
    def make_store(self):
        store = Store(postgresql_engine(self), MESSAGE_EVENTS)
        yield store.migrate()
        return store

    def another_engine(self):
        return postgresql_engine(self, postgres.create_database())

    @defer.inlineCallbacks
    def read_only_store(self):
        url = postgres.create_database()
        yield Store(postgresql_engine(self, url), MESSAGE_EVENTS).migrate()
        postgres.set_read_only(url)
        return Store(postgresql_engine(self, url), MESSAGE_EVENTS)

    @defer.inlineCallbacks
    def describe_schema(self, txn):
        yield txn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name <> 'schema_version' ORDER BY table_name, ordinal_position"
        )
        columns = txn.fetchall()
        yield txn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename <> 'schema_version' ORDER BY indexname"
        )
        indexes = txn.fetchall()
        yield txn.execute(
            "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def"
            " FROM pg_constraint WHERE connamespace = current_schema()::regnamespace"
            " AND conrelid::regclass::text <> 'schema_version' ORDER BY conname"
        )
        constraints = txn.fetchall()
        yield txn.execute("SELECT id, slug, name, active FROM organization ORDER BY id")
        return columns, indexes, constraints, txn.fetchall()

    @defer.inlineCallbacks
    def columns(self, txn, table):
        yield txn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {row["column_name"] for row in txn.fetchall()}

    @defer.inlineCallbacks
    def indexes(self, txn, table):
        yield txn.execute(
            "SELECT array_agg(a.attname ORDER BY k.ord) AS cols"
            " FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid"
            " CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum"
            " WHERE t.relname = ? AND t.relnamespace = current_schema()::regnamespace"
            " GROUP BY x.indexrelid",
            (table,),
        )
        return {tuple(row["cols"]) for row in txn.fetchall()}


class PostgresqlClaimTakeoverTests(TestCase):
    """A claim is held by its daemon's database session: taken over the moment that session ends, not when the lease runs out."""

    @defer.inlineCallbacks
    def setUp(self):
        url = empty_database(self)
        # Leases are the stores' clock time: advanced, not slept.
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.first = Store(postgresql_engine(self, url), MESSAGE_EVENTS, clock=self.clock)
        yield self.first.migrate()
        self.second = Store(postgresql_engine(self, url), MESSAGE_EVENTS, clock=self.clock)
        acme = yield self.first.add_org("acme", "Acme Corp")
        self.ids = yield self.first.insert_messages([message(acme["id"], f"<{n}@x>") for n in range(3)])

    @defer.inlineCallbacks
    def test_claims_of_an_ended_session_are_taken_over_at_once(self):
        claimed = yield self.first.claim(3600, 2)
        self.assertEqual([m["id"] for m in claimed], self.ids[:2])
        # A live session keeps its claims: the other daemon gets only the rest.
        self.assertEqual([m["id"] for m in (yield self.second.claim(3600, 3))], self.ids[2:])
        self.assertEqual((yield self.second.claim(3600, 3)), [])
        yield self.first.close()
        taken = yield self.claim_after_session_end(3600, 3)
        self.assertEqual([m["id"] for m in taken], self.ids[:2])

    def claim_after_session_end(self, lease_seconds, limit):
        """The second store's claim once the server has ended the first's session (it notices the closed socket a moment later)."""
        @defer.inlineCallbacks
        def taken():
            claimed = yield self.second.claim(lease_seconds, limit)
            self.assertTrue(claimed)
            return claimed

        return eventually(taken, timeout=2, interval=0.02)

    @defer.inlineCallbacks
    def test_a_claim_let_go_of_is_free(self):
        """The service lets go once the outcome is recorded: a message still received is then free at once, a parsed one stays parsed."""
        yield self.first.claim(3600, 3)
        yield self.first.unlock_claims(self.ids[:1])
        self.assertEqual([m["id"] for m in (yield self.second.claim(3600, 3))], self.ids[:1])
        yield self.first.mark_parsed(self.ids[1])
        yield self.first.unlock_claims(self.ids[1:2])
        yield self.first.close()
        self.assertEqual([m["id"] for m in (yield self.claim_after_session_end(3600, 3))], self.ids[2:])

    @defer.inlineCallbacks
    def test_lease_run_out_is_still_taken_over(self):
        """The lease stays the backstop for a daemon that lives but stopped renewing."""
        yield self.first.claim(1, 1)
        self.clock.advance(1.01)
        self.assertEqual([m["id"] for m in (yield self.second.claim(3600, 1))], self.ids[:1])


def backend_pid(txn) -> defer.Deferred:
    d = txn.execute("SELECT pg_backend_pid() AS pid")
    return d.addCallback(lambda _: txn.fetchone()["pid"])


def sleeping_pid(seconds: float):
    @defer.inlineCallbacks
    def interaction(txn):
        yield txn.execute("SELECT pg_backend_pid() AS pid, pg_sleep(?)", (seconds,))
        return txn.fetchone()["pid"]

    return interaction


@defer.inlineCallbacks
def eventually(attempt, timeout=8.0, interval=0.1):
    """Call C{attempt} until it succeeds; its result, or its last failure after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = yield attempt()
        except Exception:
            if time.monotonic() > deadline:
                raise
            yield sleep(interval)
        else:
            return result


def query_of(url: str, pid: int) -> str | None:
    """What one backend is running now, seen from outside."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,))
            row = cursor.fetchone()
            return None if row is None else row[0]
    finally:
        conn.close()


def terminate(url: str, pid: int) -> None:
    """Kill one backend from outside, as an administrator or a restart would."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        conn.close()


class _ProxyServer(portforward.ProxyServer):
    def connectionMade(self):
        self.lost = defer.Deferred()
        self.factory.open.add(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        super().connectionLost(reason)
        self.lost.callback(None)


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers, like a server that hangs."""

    def connectionMade(self):
        self.lost = defer.Deferred()
        self.factory.open.add(self)

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        self.lost.callback(None)


@defer.inlineCallbacks
def shut(listening, factory):
    """Stop listening, cut every connection and wait until they are gone."""
    if listening is not None:
        yield listening.stopListening()
    servers = list(factory.open)
    for server in servers:
        server.transport.abortConnection()
    yield defer.gatherResults([server.lost for server in servers])


class Outage:
    """
    A TCP proxy in front of the PostgreSQL server that can go down (its
    connections cut, its port closed) and come back on the same port.
    """

    def __init__(self, host: str, port: int):
        self.factory = portforward.ProxyFactory(host, port)
        self.factory.protocol = _ProxyServer
        self.factory.open = set()
        self.listening = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def down(self) -> defer.Deferred:
        listening, self.listening = self.listening, None
        return shut(listening, self.factory)

    def up(self) -> None:
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")

    @defer.inlineCallbacks
    def stop(self):
        yield self.down()
        # Let the proxy's client side finish closing.
        yield sleep(0.05)


class PostgresqlEngineTests(TestCase):
    def setUp(self):
        self.url = empty_database(self)

    def behind_proxy(self) -> tuple[Outage, str]:
        """An L{Outage} proxy to the test database, and the URL through it."""
        params = psycopg2.extensions.parse_dsn(self.url)
        if params.get("host", "/").startswith("/"):
            raise SkipTest("the proxy needs PostgreSQL over TCP")
        outage = Outage(params["host"], int(params.get("port", 5432)))
        self.addCleanup(outage.stop)
        params["port"] = str(outage.port)
        return outage, postgres.url_from_params(params)

    @defer.inlineCallbacks
    def test_interactions_run_in_parallel(self):
        engine = postgresql_engine(self, self.url, min_connections=2, max_connections=2)
        yield engine.start()
        started = time.monotonic()
        pids = yield defer.gatherResults(
            [engine.interaction(sleeping_pid(0.4)) for _ in range(2)]
        )
        self.assertLess(time.monotonic() - started, 0.75)
        self.assertEqual(len(set(pids)), 2)

    @defer.inlineCallbacks
    def test_pool_grows_up_to_max(self):
        engine = postgresql_engine(self, self.url, min_connections=1, max_connections=3)
        pids = yield defer.gatherResults(
            [engine.interaction(sleeping_pid(0.3)) for _ in range(5)]
        )
        self.assertEqual(len(set(pids)), 3)

    @defer.inlineCallbacks
    def test_claims_skip_locked_rows(self):
        engine = postgresql_engine(self, self.url, min_connections=2, max_connections=2)
        store = Store(engine, MESSAGE_EVENTS)
        yield store.migrate()
        org = yield store.add_org("acme", "Acme")
        first, second = yield store.insert_messages(
            [message(org["id"], "<1@x>", 1), message(org["id"], "<2@x>", 2)]
        )
        locked, release = defer.Deferred(), defer.Deferred()

        @defer.inlineCallbacks
        def hold(txn):
            yield txn.execute("SELECT id FROM inbound_message WHERE id = ? FOR UPDATE", (first,))
            locked.callback(None)
            yield release

        held = engine.interaction(hold)
        yield locked
        [claimed] = yield store.claim(60)
        release.callback(None)
        yield held
        self.assertEqual(claimed["id"], second)

    @defer.inlineCallbacks
    def test_reconnects_after_backend_killed(self):
        engine = postgresql_engine(self, self.url)
        before = yield engine.interaction(backend_pid)
        terminate(self.url, before)
        try:
            yield engine.interaction(backend_pid)
        except DatabaseUnavailable:
            pass
        after = yield eventually(lambda: engine.interaction(backend_pid))
        self.assertNotEqual(after, before)

    @defer.inlineCallbacks
    def test_backend_killed_during_interaction(self):
        engine = postgresql_engine(self, self.url)
        pid = yield engine.interaction(backend_pid)
        running = engine.interaction(sleeping_pid(5))
        # Killed once it is running its statement, not before.
        yield eventually(lambda: self.assertIn("pg_sleep", query_of(self.url, pid) or ""), timeout=2, interval=0.01)
        terminate(self.url, pid)
        error = yield self.assertFailure(running, DatabaseUnavailable)
        self.assertIn("terminating connection", str(error))
        yield eventually(lambda: engine.interaction(backend_pid))

    @defer.inlineCallbacks
    def test_silent_server_times_out(self):
        factory = protocol.Factory.forProtocol(_Silent)
        factory.open = set()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(shut, listening, factory)
        number = listening.getHost().port
        engine = postgresql_engine(
            self, f"postgresql://postgres@127.0.0.1:{number}/db?connect_timeout=1"
        )
        started = time.monotonic()
        error = yield self.assertFailure(engine.interaction(backend_pid), DatabaseUnavailable)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("no answer within 1 s", str(error))

    @defer.inlineCallbacks
    def test_outage_fails_fast_then_recovers(self):
        outage, url = self.behind_proxy()
        engine = postgresql_engine(self, url)
        store = Store(engine, MESSAGE_EVENTS)
        yield store.migrate()
        yield store.add_org("acme", "Acme")

        yield outage.down()
        yield sleep(0.1)
        for _ in range(3):
            started = time.monotonic()
            yield self.assertFailure(store.get_org("acme"), DatabaseUnavailable)
            self.assertLess(time.monotonic() - started, 0.5)

        outage.up()
        org = yield eventually(lambda: store.get_org("acme"))
        self.assertEqual(org["slug"], "acme")

    @defer.inlineCallbacks
    def test_unreachable_server_fails_fast(self):
        closed = protocol.Factory()
        port = reactor.listenTCP(0, closed, interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        engine = postgresql_engine(self, f"postgresql://postgres@127.0.0.1:{number}/db")
        for _ in range(3):
            started = time.monotonic()
            error = yield self.assertFailure(engine.interaction(backend_pid), DatabaseUnavailable)
            self.assertLess(time.monotonic() - started, 0.5)
        self.assertIn(f"127.0.0.1:{number}", str(error))

    @defer.inlineCallbacks
    def test_password_never_shown(self):
        secret = "s3cr3t-Pa55"
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        params = psycopg2.extensions.parse_dsn(self.url)
        params.update(password=secret, dbname="mailingest_no_such_db")
        engine = postgresql_engine(self, postgres.url_from_params(params))
        store = Store(engine, MESSAGE_EVENTS)
        self.assertIn(":***@", repr(engine))
        for shown in (repr(engine), repr(store)):
            self.assertNotIn(secret, shown)
        error = yield self.assertFailure(store.check(), DatabaseUnavailable)
        self.assertIn("mailingest_no_such_db", str(error))
        self.assertNotIn(secret, str(error))
        self.assertNotIn(secret, repr(error.__cause__))
        self.assertNotIn(secret, " ".join(formatEvent(event) for event in events))
        for url in (
            f"postgresql://u:{secret}@[h/db",
            f"postgresql://u@h/db?password={secret}&nosuch=x",
            f"postgresql://u:{secret}@h/db?connect_timeout=soon",
        ):
            config_error = self.assertRaises(ConfigError, PostgresqlEngine, url)
            self.assertNotIn(secret, str(config_error))
        for url in (
            f"postgresql://u@h/db?sslmode=disable&password={secret}",
            f"host=h user=u password={secret} dbname=db",
            f"host=h password = '{secret} x' dbname=db",
        ):
            self.assertNotIn(secret, repr(PostgresqlEngine(url)))

    @defer.inlineCallbacks
    def test_listen_notify(self):
        engine = postgresql_engine(self, self.url)
        received = []
        yield engine.listen("mailingest_test", received.append)
        yield engine.listen("mailingest_other", lambda payload: received.append("other"))
        yield engine.interaction(engine.notify, "mailingest_test", "hello")
        yield eventually(lambda: self.assertEqual(received, ["hello"]), timeout=2)

    @defer.inlineCallbacks
    def test_listen_survives_outage(self):
        outage, url = self.behind_proxy()
        listener = postgresql_engine(self, url)
        sender = postgresql_engine(self, self.url)
        received = []
        yield listener.listen("mailingest_test", received.append)
        yield outage.down()
        yield sleep(0.1)
        outage.up()

        @defer.inlineCallbacks
        def delivered():
            # Sent again on each attempt: one sent while the listener is still reconnecting is lost.
            yield sender.interaction(sender.notify, "mailingest_test", "after")
            self.assertIn("after", received)

        yield eventually(delivered)


class ExclusiveLock:
    """Another process's connection (here a thread's) holding the SQLite database with BEGIN EXCLUSIVE, for C{seconds} or until L{release}."""

    def __init__(self, path: str, seconds: float):
        self._path = path
        self._seconds = seconds
        self.taken = threading.Event()
        self._release = threading.Event()
        self.thread = threading.Thread(target=self._hold)
        self.thread.start()
        self.taken.wait(10)

    def _hold(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            self.taken.set()
            self._release.wait(self._seconds)
            db.execute("ROLLBACK")
        finally:
            db.close()

    def released(self) -> defer.Deferred:
        return threads.deferToThread(self.thread.join)

    def release(self) -> defer.Deferred:
        self._release.set()
        return self.released()


class SqliteLockedTests(DaemonTestCase):
    """A database locked by another process: the end of DATA still answers within --store-timeout."""

    overrides = {"store_timeout": "1"}

    def lock(self, seconds: float) -> ExclusiveLock:
        held = ExclusiveLock(self.daemon.store.engine.path, seconds)
        self.addCleanup(held.released)
        return held

    @defer.inlineCallbacks
    def test_locked_database_answers_451_within_store_timeout_then_stores_retry(self):
        yield self.daemon.delivery.directory.refresh()
        # Held until the answer came, however long a busy machine takes to get there.
        held = self.lock(60)

        def transaction(client):
            # The end of DATA's answer alone: not the client thread's start or QUIT, which a busy
            # machine can delay (4.1 s once in a full run, the reply's own time unknown).
            client.ehlo("customer.test")
            client.mail("sender@customer.test")
            client.rcpt("orders+acme@example.com")
            started = time.monotonic()
            answer = client.data(daemon_message())
            return answer, time.monotonic() - started

        (code, reply), elapsed = yield self.daemon.smtp(transaction)
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"), (reply, elapsed))
        self.assertLess(elapsed, 2.5)
        yield held.release()
        code, reply = yield self.daemon.send(daemon_message(), ["orders+acme@example.com"])
        self.assertEqual(code, 250, reply)
        # The timed-out insert committed once the lock was gone, so the retry
        # was a duplicate, or it failed and the retry was stored: one row
        # either way, and its raw copy kept.
        [row] = yield self.daemon.store.list_messages()
        self.assertTrue(os.path.exists(self.daemon.blobs.path_for(row["raw_key"])))

    @defer.inlineCallbacks
    def test_background_work_gives_way_to_a_lock(self):
        """Claims, the organisation refresh, readiness and metrics fail fast instead of queueing a 10 s wait before inserts."""
        # The start's index build is foreground work: locked out, it would hold the one SQLite thread
        # (and the calls below queued behind it) until the lock is gone.
        yield self.daemon.service.serving.indexing
        self.lock(3)
        store = self.daemon.store
        for background in (lambda: store.claim(60), store.active_orgs, store.check, store.count_messages):
            started = time.monotonic()
            yield self.assertFailure(background(), sqlite3.OperationalError)
            self.assertLess(time.monotonic() - started, 1)
