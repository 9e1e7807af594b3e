"""
The behaviour every L{mailingest.interfaces.IBlobStore} must have, written
once and mixed into one trial TestCase per implementation.

The TestCase sets C{self.store} in its C{setUp} (and closes it in a cleanup).
"""

import hashlib
import io
import os
import time

from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailingest.errors import BlobNotFound, StorageError
from mailingest.interfaces import IBlobStore
from mailingest.storage.blobs import local_disk, s3


class ChunkRecorder(io.BytesIO):
    """A binary file object that remembers how many writes built it."""

    writes = 0

    def write(self, data) -> int:
        self.writes += 1
        return super().write(data)


class BlobHelpers:
    """Files and blobs for tests of C{self.store}."""

    def source_file(self, data: bytes) -> tuple[str, str, int]:
        """A file holding C{data}; returns the C{path, sha256, size} that put_file takes."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest(), len(data)

    async def put(self, key: str, data: bytes) -> None:
        await self.store.put_file(key, *self.source_file(data))

    async def listed(self, prefix: str) -> list:
        found = []
        async for page in self.store.list_keys(prefix):
            self.assertTrue(page)
            found += page
        return sorted(found)

    async def read(self, key: str) -> bytes:
        out = io.BytesIO()
        await self.store.read_to(key, out)
        return out.getvalue()


class BlobStoreContract(BlobHelpers):
    def test_provides_interface(self):
        self.assertTrue(verifyObject(IBlobStore, self.store))

    async def round_trip(self, data: bytes) -> None:
        await self.put("raw/0001/message.eml", data)
        self.assertEqual(await self.read("raw/0001/message.eml"), data)

    async def test_round_trip_empty(self):
        await self.round_trip(b"")

    async def test_round_trip_one_byte(self):
        await self.round_trip(b"\x00")

    async def test_round_trip_five_megabytes_in_chunks(self):
        data = os.urandom(5 * 1024 * 1024)
        await self.put("documents/big.bin", data)
        out = ChunkRecorder()
        await self.store.read_to("documents/big.bin", out)
        self.assertEqual(out.getvalue(), data)
        self.assertGreater(out.writes, 1)

    async def test_put_bytes_round_trip(self):
        for data in (b"", b"Subject: small\r\n\r\nin memory\r\n", os.urandom(128 * 1024)):
            await self.store.put_bytes("raw/2026/11/24/mem.eml", data, hashlib.sha256(data).hexdigest())
            self.assertEqual(await self.read("raw/2026/11/24/mem.eml"), data)

    async def test_put_bytes_and_files_together(self):
        """Concurrent puts of both kinds (one group commit on local disk) each keep their own bytes."""
        puts = []
        for n in range(6):
            data = b"message %d\r\n" % n
            if n % 2:
                puts.append(self.store.put_bytes(f"raw/mix/{n}", data, hashlib.sha256(data).hexdigest()))
            else:
                puts.append(self.store.put_file(f"raw/mix/{n}", *self.source_file(data)))
        await defer.gatherResults(puts, consumeErrors=True)
        for n in range(6):
            self.assertEqual(await self.read(f"raw/mix/{n}"), b"message %d\r\n" % n)

    async def test_local_path_reads_the_blob_or_is_none(self):
        await self.put("raw/2026/11/24/here.eml", b"in place")
        path = self.store.local_path("raw/2026/11/24/here.eml")
        if path is not None:
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"in place")

    async def test_put_replaces(self):
        await self.put("raw/k", b"first version, longer")
        await self.put("raw/k", b"second")
        self.assertEqual(await self.read("raw/k"), b"second")

    async def test_read_missing(self):
        await self.assertFailure(self.store.read_to("raw/missing", io.BytesIO()), BlobNotFound)

    async def test_delete_then_read(self):
        await self.put("raw/gone", b"data")
        await self.store.delete("raw/gone")
        await self.assertFailure(self.store.read_to("raw/gone", io.BytesIO()), BlobNotFound)

    async def test_delete_missing(self):
        await self.store.delete("raw/never-stored")

    async def test_check(self):
        self.assertIsNone(await self.store.check())

    async def test_nested_keys(self):
        keys = ["a/b/c/d.eml", "a/b/c/e.eml", "a/b/f", "a/g"]
        for key in keys:
            await self.put(key, key.encode())
        for key in keys:
            self.assertEqual(await self.read(key), key.encode())

    async def test_unsafe_keys_refused(self):
        path, sha256, size = self.source_file(b"x")
        for key in ["../escape", "a/../b", "a/..", "Upper", "a//b", "/abs", "a/", "", "sp ace", "a\\b", ".hidden"]:
            # maybeDeferred: the local-disk put_file refuses synchronously.
            await self.assertFailure(defer.maybeDeferred(self.store.put_file, key, path, sha256, size), ValueError)
            await self.assertFailure(defer.maybeDeferred(self.store.put_bytes, key, b"x", sha256), ValueError)
            await self.assertFailure(defer.maybeDeferred(self.store.read_to, key, io.BytesIO()), ValueError)
            await self.assertFailure(defer.maybeDeferred(self.store.delete, key), ValueError)

    async def test_size_mismatch_stores_nothing(self):
        path, sha256, size = self.source_file(b"twelve bytes")
        await self.assertFailure(self.store.put_file("raw/short", path, sha256, size + 1), StorageError)
        await self.assertFailure(self.store.read_to("raw/short", io.BytesIO()), BlobNotFound)

    async def test_sha256_mismatch_of_bytes_stores_nothing(self):
        await self.assertFailure(
            self.store.put_bytes("raw/wrong", b"these bytes", hashlib.sha256(b"other bytes").hexdigest()), StorageError
        )
        await self.assertFailure(self.store.read_to("raw/wrong", io.BytesIO()), BlobNotFound)

    async def test_list_keys_under_a_prefix_in_pages(self):
        self.patch(local_disk, "LIST_PAGE", 2)
        self.patch(s3, "LIST_PAGE", 2)
        raw = [f"raw/2026/01/0{day}/m{day}.eml" for day in range(1, 6)]
        started = time.time()
        for key in raw + ["documents/1/2/0", "rawer/x"]:
            await self.put(key, key.encode())
        listed = await self.listed("raw/")
        self.assertEqual([(blob.key, blob.size) for blob in listed], [(key, len(key)) for key in raw])
        for blob in listed:
            # S3 keeps whole seconds
            self.assertTrue(started - 2 <= blob.mtime <= time.time() + 1, (started, blob))
        self.assertEqual([blob.key for blob in await self.listed("documents/")], ["documents/1/2/0"])
        self.assertEqual(await self.listed("documents/9/"), [])
        for prefix in ("raw", "../", "/raw/", ""):
            with self.assertRaises(ValueError):
                await self.listed(prefix)

    async def test_no_temporaries_left_by_finished_writes(self):
        await self.put("raw/done.eml", b"complete")
        self.assertEqual(await self.store.remove_temporaries(time.time() + 60, dry_run=True), (0, 0))
        self.assertEqual(await self.store.remove_temporaries(time.time() + 60), (0, 0))
        self.assertEqual(await self.read("raw/done.eml"), b"complete")
