"""
The blob store contract (L{tests.blobstore_contract}) against local disk and
against S3 as served by moto with signature verification on, then what only
S3 has: signing, key encoding, configuration, and retries and timeouts
against tiny local servers that misbehave on purpose.
"""

import errno
import hashlib
import io
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailingest.errors import BlobNotFound, ConfigError, StorageError
from mailingest.storage.blobs import local_disk
from mailingest.storage.blobs.local_disk import LocalDiskBlobStore
from mailingest.storage.blobs.s3 import S3BlobStore, from_url
from tests.blobstore_contract import BlobHelpers, BlobStoreContract
from tests.moto import free_port, shared_server


class LocalDiskBlobStoreTests(BlobStoreContract, unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.store = LocalDiskBlobStore(self.root)
        self.addCleanup(self.store.close)

    async def test_size_mismatch_leaves_no_file(self):
        path, sha256, size = self.source_file(b"twelve bytes")
        await self.assertFailure(self.store.put_file("raw/short", path, sha256, size - 1), StorageError)
        left = [name for _, _, names in os.walk(self.root) for name in names]
        self.assertEqual(left, [])

    def scratch_file(self, data: bytes) -> str:
        os.makedirs(self.store.scratch_dir, exist_ok=True)
        path = os.path.join(self.store.scratch_dir, "spool-1")
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def test_a_file_in_the_scratch_dir_is_stored_as_a_hard_link(self):
        path = self.scratch_file(b"spooled message")
        await self.store.put_file("raw/linked", path, hashlib.sha256(b"spooled message").hexdigest(), 15)
        self.assertEqual(os.stat(path).st_ino, os.stat(self.store.local_path("raw/linked")).st_ino)

    async def test_a_copy_is_verified_against_the_sha256(self):
        """A file on another file system is copied: its bytes pass through, so they are hashed."""

        def cross_device(source, target):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "link", cross_device)
        path = self.scratch_file(b"spooled message")
        wrong = hashlib.sha256(b"another message").hexdigest()
        await self.assertFailure(self.store.put_file("raw/copied", path, wrong, 15), StorageError)
        self.assertFalse(os.path.exists(self.store.local_path("raw/copied")))
        self.assertEqual(os.listdir(os.path.join(self.root, ".tmp")), [])
        await self.store.put_file("raw/copied", path, hashlib.sha256(b"spooled message").hexdigest(), 15)
        self.assertNotEqual(os.stat(path).st_ino, os.stat(self.store.local_path("raw/copied")).st_ino)
        self.assertEqual(await self.read("raw/copied"), b"spooled message")

    async def test_stale_temporaries_removed(self):
        """A crash between writing a blob's temporary file and renaming it leaves the file in .tmp."""
        tmp = os.path.join(self.root, ".tmp")
        for name, age in (("stale", 7200), ("fresh", 10)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"x" * 100)
            os.utime(os.path.join(tmp, name), (time.time() - age, time.time() - age))
        before = time.time() - 3600
        self.assertEqual(await self.store.remove_temporaries(before, dry_run=True), (1, 100))
        self.assertEqual(sorted(os.listdir(tmp)), ["fresh", "stale"])
        self.assertEqual(await self.store.remove_temporaries(before), (1, 100))
        self.assertEqual(os.listdir(tmp), ["fresh"])


class LocalDiskWithoutSyncfsTests(LocalDiskBlobStoreTests):
    """The same contract where syncfs is missing: each file and directory is fsynced."""

    def setUp(self):
        self.patch(local_disk, "_syncfs", None)
        super().setUp()


def moto_store(test: unittest.TestCase, bucket: str | None = None, **options) -> S3BlobStore:
    """A store on a fresh moto bucket (or C{bucket}), closed after the test."""
    server = shared_server()
    options.setdefault("access_key", server.access_key)
    options.setdefault("secret_key", server.secret_key)
    store = S3BlobStore(bucket or server.create_bucket(), endpoint_url=server.endpoint, **options)
    test.addCleanup(store.close)
    return store


class S3BlobStoreTests(BlobStoreContract, unittest.TestCase):
    def setUp(self):
        self.store = moto_store(self, prefix="mailingest/blobs", timeout=10, retries=1)


class S3MotoTests(BlobHelpers, unittest.TestCase):
    """What only S3 has, against moto with signature verification on."""

    async def test_wrong_secret_key(self):
        """moto checks signatures: a wrong secret fails, and is never shown."""
        secret = "wrong-secret-0123456789abcdefghijklmnopqrst"
        self.store = moto_store(self, secret_key=secret, retries=0)
        error = await self.assertFailure(self.store.put_file("raw/k", *self.source_file(b"data")), StorageError)
        self.assertIn("SignatureDoesNotMatch", str(error))
        for text in (str(error), repr(error), repr(self.store)):
            self.assertNotIn(secret, text)
            self.assertNotIn("Signature=", text)

    def test_repr_shows_no_keys(self):
        self.store = moto_store(self, prefix="p")
        self.assertNotIn(shared_server().secret_key, repr(self.store))
        self.assertNotIn(shared_server().access_key, repr(self.store))
        self.assertIn("s3://", repr(self.store))

    async def test_prefix_with_space_and_plus(self):
        server = shared_server()
        bucket = server.create_bucket()
        self.store = moto_store(self, bucket, prefix="/in box+1/", retries=0)
        await self.store.check()
        await self.put("raw/0001/m.eml", b"message")
        self.assertEqual(await self.read("raw/0001/m.eml"), b"message")
        listing = server.client("s3").list_objects_v2(Bucket=bucket)
        self.assertEqual([o["Key"] for o in listing["Contents"]], ["in box+1/raw/0001/m.eml"])
        await self.store.delete("raw/0001/m.eml")
        await self.assertFailure(self.store.read_to("raw/0001/m.eml", io.BytesIO()), BlobNotFound)

    async def test_requests_log_no_factory_lines(self):
        """Twisted's client factory logs two lines per connection by default; ours is quiet."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.store = moto_store(self, retries=0)
        for n in range(3):
            await self.put(f"raw/quiet/{n}", b"data")
            self.assertEqual(await self.read(f"raw/quiet/{n}"), b"data")
        await self.store.close()
        lines = [formatEvent(event) for event in events]
        self.assertFalse([line for line in lines if "factory" in line.lower()], lines)

    async def test_missing_bucket(self):
        """A missing bucket is a storage failure, never a missing blob."""
        self.store = moto_store(self, "no-such-bucket-here", retries=0)
        error = await self.assertFailure(self.store.check(), StorageError)
        self.assertIn("NoSuchBucket", str(error))
        error = await self.assertFailure(self.store.read_to("raw/k", io.BytesIO()), StorageError)
        self.assertIn("NoSuchBucket", str(error))
        await self.assertFailure(self.store.delete("raw/k"), StorageError)


class FakeS3(Resource):
    """Just enough S3 for retry tests: the first C{failures} requests get a 503."""

    isLeaf = True

    def __init__(self, failures: int = 0):
        super().__init__()
        self.failures = failures
        self.requests: list[tuple[bytes, bytes, bytes]] = []
        self.objects: dict[bytes, bytes] = {}

    def render(self, request):
        payload_hash = request.getHeader(b"x-amz-content-sha256") or b""
        self.requests.append((request.method, request.path, payload_hash))
        if self.failures:
            self.failures -= 1
            request.setResponseCode(503)
            return b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        if request.method == b"PUT":
            self.objects[request.path] = request.content.read()
            request.setHeader(b"ETag", b'"etag"')
            return b""
        if request.path in self.objects:
            return self.objects[request.path]
        request.setResponseCode(404)
        return b"<Error><Code>NoSuchKey</Code></Error>"


class StalledBody(Resource):
    """Sends the headers and the first kilobyte of a body, then nothing."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = 0

    def render(self, request):
        self.requests += 1
        request.setHeader(b"Content-Length", b"1000000")
        request.write(b"x" * 1000)
        return NOT_DONE_YET


class CountingFactory(Factory):
    """Accepts connections and never says a word."""

    protocol = Protocol
    connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


class S3FailureTests(BlobHelpers, unittest.TestCase):
    """Retries and timeouts, against local servers on 127.0.0.1."""

    def serve(self, factory: Factory) -> str:
        """Listen on a free port until the test ends; returns the endpoint URL."""
        wrapper = WrappingFactory(factory)
        port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")

        async def stop() -> None:
            await port.stopListening()
            for protocol in list(wrapper.protocols):
                protocol.transport.abortConnection()
            while wrapper.protocols:
                await deferLater(reactor, 0.01)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return f"http://127.0.0.1:{port.getHost().port}"

    def fake_store(self, endpoint: str, **options) -> S3BlobStore:
        self.store = S3BlobStore(
            "bucket", prefix="p", endpoint_url=endpoint, access_key="AKIAFAKE", secret_key="fake-secret", **options
        )
        self.addCleanup(self.store.close)
        return self.store

    async def test_5xx_retried_then_stored(self):
        """
        Each attempt sends the whole file again, with our SHA-256 as the
        payload hash (moto never checks that hash; real S3 does).
        """
        fake = FakeS3(failures=2)
        self.fake_store(self.serve(Site(fake)), retries=2)
        data = os.urandom(300_000)
        path, sha256, size = self.source_file(data)
        await self.store.put_file("raw/k", path, sha256, size)
        self.assertEqual(fake.requests, [(b"PUT", b"/bucket/p/raw/k", sha256.encode())] * 3)
        self.assertEqual(fake.objects[b"/bucket/p/raw/k"], data)

        fake.failures = 2
        self.assertEqual(await self.read("raw/k"), data)
        self.assertEqual(len(fake.requests), 6)

    async def test_5xx_gives_up_after_retries(self):
        fake = FakeS3(failures=100)
        self.fake_store(self.serve(Site(fake)), retries=2)
        error = await self.assertFailure(Deferred.fromCoroutine(self.put("raw/k", b"data")), StorageError)
        self.assertEqual(len(fake.requests), 3)
        self.assertIn("failed 3 times: HTTP 503 SlowDown", str(error))
        self.assertNotIn("fake-secret", str(error))

    async def test_check_tries_once(self):
        """Readiness must answer promptly, so check() does not retry."""
        fake = FakeS3(failures=100)
        self.fake_store(self.serve(Site(fake)), retries=2)
        error = await self.assertFailure(self.store.check(), StorageError)
        self.assertEqual(len(fake.requests), 1)
        self.assertIn("HTTP 503 SlowDown", str(error))

    async def test_connection_refused_retried(self):
        endpoint = f"http://127.0.0.1:{free_port()}"
        self.fake_store(endpoint, retries=1)
        error = await self.assertFailure(self.store.delete("raw/k"), StorageError)
        self.assertIn(f"DELETE s3://bucket/p/raw/k at {endpoint} failed 2 times", str(error))
        self.assertIn("refused", str(error))

    async def test_silent_server_times_out(self):
        factory = CountingFactory()
        self.fake_store(self.serve(factory), timeout=0.5, retries=1)
        started = reactor.seconds()
        error = await self.assertFailure(Deferred.fromCoroutine(self.put("raw/k", b"data")), StorageError)
        elapsed = reactor.seconds() - started
        self.assertIn("no progress for 0.5 s", str(error))
        self.assertEqual(factory.connections, 2)
        self.assertTrue(1.0 <= elapsed < 5, elapsed)

    async def test_stalled_body_times_out_without_retry(self):
        """Bytes already written to the caller's file cannot be taken back: no retry."""
        stalled = StalledBody()
        self.fake_store(self.serve(Site(stalled)), timeout=0.5, retries=2)
        out = io.BytesIO()
        error = await self.assertFailure(self.store.read_to("raw/k", out), StorageError)
        self.assertIn("no progress", str(error))
        self.assertEqual(stalled.requests, 1)
        self.assertEqual(out.getvalue(), b"x" * 1000)


class FromUrlTests(unittest.TestCase):
    environ = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret-example-key"}

    def from_url(self, url: str, endpoint=None, region=None, **environ) -> S3BlobStore:
        store = from_url(url, endpoint, region, {**self.environ, **environ})
        self.addCleanup(store.close)
        return store

    def test_bucket_prefix_endpoint_region(self):
        store = self.from_url("s3://mail/raw/eu/", "http://minio:9000/", "eu-west-1")
        self.assertEqual((store.bucket, store.prefix), ("mail", "raw/eu"))
        self.assertEqual((store.endpoint_url, store.region), ("http://minio:9000", "eu-west-1"))
        self.assertEqual(store.object_key("raw/1"), "raw/eu/raw/1")
        self.assertNotIn("secret-example-key", repr(store))

    def test_aws_defaults(self):
        store = self.from_url("s3://mail")
        self.assertEqual(store.prefix, "")
        self.assertEqual(store.object_key("raw/1"), "raw/1")
        self.assertEqual(store.endpoint_url, "https://s3.us-east-1.amazonaws.com")
        store = self.from_url("s3://mail", AWS_REGION="eu-central-1")
        self.assertEqual(store.endpoint_url, "https://s3.eu-central-1.amazonaws.com")

    def test_bad_urls(self):
        for url in ("s3://", "s3:///prefix", "s3://bad bucket/x", "file:x"):
            error = self.assertRaises(ConfigError, from_url, url, None, None, self.environ)
            self.assertNotIn("\n", str(error))

    def test_credentials_in_url_not_echoed(self):
        error = self.assertRaises(ConfigError, from_url, "s3://AKIA:topsecret@mail/x", None, None, self.environ)
        self.assertNotIn("topsecret", str(error))

    def test_missing_keys(self):
        error = self.assertRaises(ConfigError, from_url, "s3://mail", None, None, {"AWS_ACCESS_KEY_ID": "AKIA"})
        self.assertEqual(str(error), "S3 storage needs AWS_SECRET_ACCESS_KEY in the environment")
        error = self.assertRaises(ConfigError, from_url, "s3://mail", None, None, {})
        self.assertIn("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", str(error))

    def test_bad_endpoint(self):
        for endpoint in ("minio:9000", "https://user:pw@minio"):
            error = self.assertRaises(ConfigError, from_url, "s3://mail", endpoint, None, self.environ)
            self.assertNotIn("pw", str(error))
