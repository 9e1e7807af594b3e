"""
Where a mailingest round keeps its data: a database and an object store.

Every round starts from empty storage, so one round's rows never slow down or
inflate the next, and "stored/sent" can be checked by counting rows. The
embedded pair (SQLite file, local directory) lives in the round's directory;
the production pair gets a fresh PostgreSQL database (dropped afterwards) and
a fresh S3 key prefix, C{bench-<random>/}, whose objects are left in the
bucket (the harness only needs the rights the daemon has).
"""

import os
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class Database(Protocol):
    url: str

    def scalar(self, sql: str) -> int:
        """The single integer a counting query returns."""

    def close(self) -> None:
        """Release (or remove) the round's database."""


class SqliteDatabase:
    def __init__(self, directory: str):
        self.path = os.path.join(os.path.abspath(directory), "mailingest.db")
        self.url = "sqlite:///" + self.path
        self._conn: sqlite3.Connection | None = None

    def scalar(self, sql: str) -> int:
        # One connection for the round: the drain measurement polls often and
        # WAL lets these reads run beside the daemon's writes.
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=10)
        return int(self._conn.execute(sql).fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresDatabase:
    def __init__(self, dsn: str):
        import psycopg2  # only needed with --postgres

        self._psycopg2 = psycopg2
        self._admin_dsn = dsn
        self.name = "mailingest_bench_" + uuid.uuid4().hex[:12]
        self.url = urlsplit(dsn)._replace(path="/" + self.name).geturl()
        self._admin(f'CREATE DATABASE "{self.name}"')
        self._conn = None

    def _admin(self, sql: str) -> None:
        conn = self._psycopg2.connect(self._admin_dsn)
        try:
            conn.autocommit = True
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def scalar(self, sql: str) -> int:
        if self._conn is None:
            self._conn = self._psycopg2.connect(self.url)
            self._conn.autocommit = True
        with self._conn.cursor() as cursor:
            cursor.execute(sql)
            return int(cursor.fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}"')


@dataclass(frozen=True)
class Backend:
    """
    How to give one mailingest round its storage. C{postgres} is a DSN whose
    server we may create databases on; C{s3} is C{s3://bucket[/prefix]} with
    credentials in the usual AWS_* variables.
    """

    postgres: str | None = None
    s3: str | None = None
    s3_endpoint: str | None = None
    # The daemon's --clamd and --rspamd (None: that scanner is off).
    clamd: str | None = None
    rspamd: str | None = None

    @property
    def label(self) -> str:
        database = "postgresql" if self.postgres else "sqlite"
        storage = "s3" if self.s3 else "file"
        scanners = "".join(f"+{name}" for name in ("clamd", "rspamd") if getattr(self, name))
        return f"{database}+{storage}{scanners}"

    def scanner_args(self) -> list[str]:
        """The daemon's options for the content scanners given."""
        return [*(["--clamd", self.clamd] if self.clamd else []), *(["--rspamd", self.rspamd] if self.rspamd else [])]

    def database(self, directory: str) -> Database:
        if self.postgres:
            return PostgresDatabase(self.postgres)
        return SqliteDatabase(directory)

    def storage_args(self, directory: str) -> list[str]:
        if not self.s3:
            return ["--storage", "file://" + os.path.join(os.path.abspath(directory), "blobs")]
        args = ["--storage", f"{self.s3.rstrip('/')}/bench-{uuid.uuid4().hex[:12]}"]
        if self.s3_endpoint:
            args += ["--s3-endpoint", self.s3_endpoint]
        return args
