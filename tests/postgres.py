"""
A PostgreSQL server for the tests, found once per process.

In order: C{MAILINGEST_TEST_POSTGRES_DSN} when set; a server at
C{postgresql://postgres@127.0.0.1:5432} when it answers; a throwaway cluster
made with C{initdb}/C{pg_ctl} when they are installed (stopped at exit).
Without any, PostgreSQL tests are skipped, except under C{CI=true}, where a
missing PostgreSQL is an error: CI must not go green by skipping.

Each test gets its own database (C{mailingest_test_<random>}); whatever a
crashed test left behind is dropped at exit.
"""

import atexit
import glob
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import uuid
from urllib.parse import quote, urlencode

import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from twisted.trial.unittest import SkipTest

from tests.ports import free_port

ENV_DSN = "MAILINGEST_TEST_POSTGRES_DSN"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

_found: dict = {}
_databases: set[str] = set()
_clusters: list[tuple[str, str, str]] = []


def url_from_params(params: dict) -> str:
    """A C{postgresql://} URL from libpq connection parameters."""
    rest = dict(params)
    user = rest.pop("user", "")
    password = rest.pop("password", None)
    host = rest.pop("host", "")
    port = rest.pop("port", "")
    dbname = rest.pop("dbname", "")
    if host.startswith("/"):
        rest["host"] = host
        host = ""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@" if auth else "") + host + (":" + port if port else "")
    url = f"postgresql://{netloc}/{quote(dbname, safe='')}"
    return url + ("?" + urlencode(rest) if rest else "")


def _answers(url: str) -> str | None:
    """None when a server answers at C{url}, else why not."""
    try:
        psycopg2.connect(url, connect_timeout=2).close()
    except psycopg2.Error as e:
        return " ".join(str(e).split())
    return None


def _bindir() -> str | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's versioned directory."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(initdb)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    return None


def _run(command: list[str], as_postgres: bool) -> None:
    if as_postgres:
        command = ["su", "postgres", "-s", "/bin/bash", "-c", shlex.join(command)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def _throwaway_cluster(bindir: str) -> str:
    """Start a private cluster in a temporary directory; its URL."""
    as_postgres = os.geteuid() == 0  # initdb refuses to run as root
    directory = tempfile.mkdtemp(prefix="mailingest-pg-")
    data = os.path.join(directory, "data")
    pg_ctl = os.path.join(bindir, "pg_ctl")
    _clusters.append((pg_ctl, data, directory))
    if as_postgres:
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
    port = free_port()
    _run(
        [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
        as_postgres,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off"
    _run(
        [pg_ctl, "-D", data, "-o", options, "-l", os.path.join(directory, "log"), "-w", "start"],
        as_postgres,
    )
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _find() -> str:
    given = os.environ.get(ENV_DSN)
    if given:
        url = url_from_params(psycopg2.extensions.parse_dsn(given))
        why = _answers(url)
        if why:
            raise RuntimeError(f"{ENV_DSN} is set but PostgreSQL does not answer: {why}")
        return url
    why = _answers(DEFAULT_URL)
    if why is None:
        return DEFAULT_URL
    bindir = _bindir()
    if bindir is None:
        reason = (
            f"no PostgreSQL: set {ENV_DSN}, run one at 127.0.0.1:5432 ({why}),"
            " or install initdb/pg_ctl"
        )
    else:
        try:
            return _throwaway_cluster(bindir)
        except (OSError, KeyError, subprocess.SubprocessError) as e:
            output = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip()
            reason = f"cannot start a throwaway PostgreSQL with {bindir}: {e} {output}"
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(reason + " (CI=true: PostgreSQL tests must run)")
    raise SkipTest(reason)


def server_url() -> str:
    """The URL of the server test databases are made on (skips or fails as above)."""
    if "url" not in _found and "error" not in _found:
        atexit.register(_cleanup)
        try:
            _found["url"] = _find()
        except (SkipTest, RuntimeError) as e:
            _found["error"] = e
    if "error" in _found:
        raise _found["error"]
    return _found["url"]


def _admin(statement: sql.Composable) -> None:
    conn = psycopg2.connect(server_url(), connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)
    finally:
        conn.close()


def create_database() -> str:
    """Create a new empty database; its URL."""
    name = "mailingest_test_" + uuid.uuid4().hex[:16]
    _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _databases.add(name)
    params = psycopg2.extensions.parse_dsn(server_url())
    params["dbname"] = name
    return url_from_params(params)


def set_read_only(url: str) -> None:
    """Sessions opened on this database from now on may read and not write, as on a standby server."""
    name = psycopg2.extensions.parse_dsn(url)["dbname"]
    _admin(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(name)))


def drop_database(url: str) -> None:
    """Drop a database made by L{create_database}, even with sessions still open."""
    name = psycopg2.extensions.parse_dsn(url)["dbname"]
    _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    _databases.discard(name)


def _cleanup() -> None:
    for name in list(_databases):
        try:
            _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg2.Error:
            pass
    for pg_ctl, data, directory in _clusters:
        try:
            _run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], os.geteuid() == 0)
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(directory, ignore_errors=True)
