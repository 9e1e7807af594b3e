"""
Object storage in a directory on local disk: the embedded default.

A blob is written to a temporary file, fsynced, renamed into place and its
directory fsynced, so a blob is either absent or complete and durable. All
file work runs in the reactor's thread pool.
"""

import ctypes
import errno
import hashlib
import itertools
import os
import re
import shutil
import tempfile
import uuid

from twisted.internet import defer
from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from mailingest.errors import BlobNotFound, StorageError
from mailingest.storage.group_commit import GroupCommit
from mailingest.interfaces import BlobInfo, IBlobStore

CHUNK = 1 << 20
LIST_PAGE = 1000
_syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
_KEY = re.compile(r"\A[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*\Z")


def valid_key(key: str) -> bool:
    """Whether C{key} is one mailingest could have made: ids and hashes only, nothing that could escape the store."""
    return bool(_KEY.match(key)) and ".." not in key


def check_key(key: str) -> str:
    """Refuse keys that could escape the store."""
    if not valid_key(key):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def makedirs_durable(path: str) -> None:
    """
    Create C{path} and its missing parents, fsyncing each directory that gained
    an entry: fsyncing only the blob's own directory would let a crash lose a
    freshly created directory, and the acknowledged blob with it.
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            pass
        fsync_dir(os.path.dirname(directory))


def flush(root: str, paths: list[str]) -> None:
    """
    Make the files C{paths} and their directory entries durable. One
    C{syncfs} of the file system does it for a whole batch (group commit);
    without it, each file and each directory is fsynced.
    """
    if _syncfs is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)
        return
    for path in paths:
        fsync_path(path)
    for directory in {os.path.dirname(path) for path in paths}:
        fsync_dir(directory)


def check_prefix(prefix: str) -> str:
    """A listing prefix: a valid key followed by C{/}."""
    if not prefix.endswith("/"):
        raise ValueError(f"invalid blob key prefix {prefix!r}")
    check_key(prefix[:-1])
    return prefix


def _walk(root: str, prefix: str):
    """Every blob under C{root/prefix}, as L{BlobInfo}; files gone meanwhile are skipped."""
    for folder, _, names in os.walk(os.path.join(root, *prefix.rstrip("/").split("/"))):
        relative = os.path.relpath(folder, root).replace(os.sep, "/")
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            yield BlobInfo(f"{relative}/{name}", info.st_size, info.st_mtime)


def _next_page(blobs) -> list[BlobInfo]:
    return list(itertools.islice(blobs, LIST_PAGE))


def _write_new(path: str, data: bytes) -> int:
    with open(path, "xb") as f:
        return f.write(data)


def _raise_error(outcome):
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@implementer(IBlobStore)
class LocalDiskBlobStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._tmp = os.path.join(self.root, ".tmp")
        self.scratch_dir = os.path.join(self.root, ".scratch")
        os.makedirs(self._tmp, exist_ok=True)
        self._durable = GroupCommit(self._store_batch)

    def __repr__(self) -> str:
        return f"<LocalDiskBlobStore {self.root}>"

    def path_for(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def put_file(self, key, path, sha256, size):
        return self._put(key, path, sha256, size)

    def put_bytes(self, key, data, sha256):
        return self._put(key, data, sha256, len(data))

    def _put(self, key: str, source: str | bytes, sha256: str, size: int) -> defer.Deferred:
        """Queue C{source} (a file's path, or the bytes themselves) for the next durable batch."""
        try:
            final = self.path_for(key)
        except ValueError:
            return defer.fail()
        return self._durable.submit((final, source, sha256, size)).addCallback(_raise_error)

    def local_path(self, key):
        return self.path_for(key)

    def _store_batch(self, requests) -> defer.Deferred:
        return deferToThread(self._store_all, requests)

    def _store_all(self, requests) -> list:
        """Place every blob, then make them all durable with one flush."""
        outcomes, placed = [], []
        for final, source, sha256, size in requests:
            try:
                self._place(final, source, sha256, size)
            except StorageError as e:
                outcomes.append(e)
            else:
                outcomes.append(None)
                placed.append(final)
        if placed:
            try:
                flush(self.root, placed)
            except OSError as e:
                failed = StorageError(f"local blob store: cannot flush to disk: {e.strerror or e}")
                outcomes = [outcome or failed for outcome in outcomes]
        return outcomes

    def _place(self, final: str, source: str | bytes, sha256: str, size: int) -> None:
        """Write or link C{source} into place, verified as L{IBlobStore.put_file} says."""
        try:
            makedirs_durable(os.path.dirname(final))
            tmp = os.path.join(self._tmp, uuid.uuid4().hex)
            try:
                if isinstance(source, bytes):
                    written, digest = _write_new(tmp, source), hashlib.sha256(source).hexdigest()
                else:
                    written, digest = self._link_or_copy(source, tmp)
                if written != size:
                    raise StorageError(
                        f"blob size mismatch: wrote {written}, expected {size}"
                    )
                if digest not in (None, sha256):
                    raise StorageError(f"blob sha256 mismatch: wrote {digest}, expected {sha256}")
                os.rename(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        except OSError as e:
            raise StorageError(f"local blob store: {e.strerror or e}") from e

    def _link_or_copy(self, source: str, target: str) -> tuple[int, str | None]:
        """
        A hard link when the source is on our file system (the spool is),
        else a copy, hashed as it goes. The size, and the sha256 of a copy
        (None for a link: no byte passed through).
        """
        try:
            os.link(source, target)
        except OSError:
            digest, buffer = hashlib.sha256(), bytearray(CHUNK)
            chunk = memoryview(buffer)
            with open(target, "xb") as out, open(source, "rb", buffering=0) as src:
                while length := src.readinto(buffer):
                    digest.update(chunk[:length])
                    out.write(chunk[:length])
                return out.tell(), digest.hexdigest()
        return os.stat(target).st_size, None

    def read_to(self, key, fileobj):
        return deferToThread(self._read_to, key, fileobj)

    def _read_to(self, key: str, fileobj) -> None:
        try:
            src = open(self.path_for(key), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {key}") from None
        except OSError as e:
            raise StorageError(f"local blob store: {e.strerror or e}") from e
        with src:
            shutil.copyfileobj(src, fileobj, CHUNK)

    def delete(self, key):
        return deferToThread(self._delete, key)

    def _delete(self, key: str) -> None:
        try:
            os.unlink(self.path_for(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"local blob store: {e.strerror or e}") from e

    async def list_keys(self, prefix):
        blobs = _walk(self.root, check_prefix(prefix))
        while page := await deferToThread(_next_page, blobs):
            yield page

    def remove_temporaries(self, before, dry_run=False):
        return deferToThread(self._remove_temporaries, before, dry_run)

    def _remove_temporaries(self, before: float, dry_run: bool) -> tuple[int, int]:
        """Files of C{.tmp} older than C{before}: a blob write a crash interrupted."""
        count = size = 0
        for name in os.listdir(self._tmp):
            path = os.path.join(self._tmp, name)
            try:
                info = os.stat(path)
                if info.st_mtime >= before:
                    continue
                if not dry_run:
                    os.unlink(path)
            except FileNotFoundError:
                continue
            count += 1
            size += info.st_size
        return count, size

    def check(self):
        return deferToThread(self._check)

    def _check(self) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self._tmp)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise StorageError(f"local blob store {self.root}: {e.strerror or e}") from e

    def close(self):
        return succeed(None)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
