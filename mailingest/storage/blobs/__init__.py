"""
Object storage: L{open_blobs} picks the L{mailingest.interfaces.IBlobStore}
for a C{--storage} URL. The store modules are imported only when chosen.
"""

import os
from collections.abc import Mapping

from mailingest.errors import ConfigError
from mailingest.interfaces import IBlobStore
from mailingest.storage.urls import local_dir, url_scheme


def open_blobs(
    url: str,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> IBlobStore:
    """The blob store for C{file:DIR} or C{s3://bucket/prefix}."""
    scheme = url_scheme(url)
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
