"""
Turn the C{--database} and C{--storage} URLs into store objects.

Relative paths are relative to the working directory, as an operator typing
them expects.
"""

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from mailingest.errors import ConfigError
from mailingest.ops.secrets import redact_url
from mailingest.storage.store import Store


def sqlite_path(url: str) -> str:
    """C{sqlite:///rel/path.db} or C{sqlite:////abs/path.db} to a file path."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ConfigError(
            f"bad database URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return url[len("sqlite:///"):]


def open_store(url: str) -> Store:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from mailingest.storage.engines.sqlite import SqliteEngine

        return Store(SqliteEngine(sqlite_path(url)))
    if scheme in ("postgresql", "postgres"):
        try:
            from mailingest.storage.engines.postgresql import PostgresqlEngine
        except ImportError:
            raise ConfigError(
                "PostgreSQL support is not available in this version (--database "
                + redact_url(url)
                + ")"
            ) from None
        return Store(PostgresqlEngine(url))
    raise ConfigError(
        f"unsupported database URL {redact_url(url)!r}: use sqlite:///... or postgresql://..."
    )


def local_dir(url: str) -> str:
    """C{file:relative/dir} or C{file:///absolute/dir} to a directory path."""
    rest = url[len("file:"):]
    if rest.startswith("//"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"bad storage URL {url!r}: file URLs name a local directory")
        rest = parts.path
    if not rest:
        raise ConfigError(f"bad storage URL {url!r}: use file:relative/dir or file:///absolute/dir")
    return rest


def open_blobs(
    url: str,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    environ: Mapping[str, str] = os.environ,
):
    scheme = url.split(":", 1)[0].lower()
    if scheme == "file":
        from mailingest.storage.blobs.local_disk import LocalDiskBlobStore

        return LocalDiskBlobStore(local_dir(url))
    if scheme == "s3":
        try:
            from mailingest.storage.blobs.s3 import from_url
        except ImportError:
            raise ConfigError("S3 storage is not available in this version") from None
        return from_url(url, s3_endpoint, s3_region, environ)
    raise ConfigError(f"unsupported storage URL {url!r}: use file:DIR or s3://bucket/prefix")
