"""
Object storage in any S3-compatible service (AWS S3, MinIO, Ceph RGW,
Cloudflare R2, ...) through treq, each request signed with AWS Signature V4
by botocore.

Addressing is path-style (C{endpoint/bucket/key}), which every S3-compatible
service accepts whatever the bucket is called; virtual-hosted style is not
used.

Integrity: a PUT signs the SHA-256 computed while spooling as the payload
hash (C{X-Amz-Content-SHA256}). AWS S3 (and MinIO, Ceph) hash what they
received and refuse a mismatch (C{XAmzContentSHA256Mismatch}), so a 200 with
an ETag means the exact bytes are stored. The ETag (an MD5 for simple PUTs) is only required to
be present: comparing it would mean reading the file a second time. Bytes
handed over in memory are hashed here before sending, whatever the service checks.

Failures: 5xx answers, connection errors and timeouts are retried with a
short doubling backoff; any other answer fails at once with a
L{StorageError} naming the S3 error code. No message ever contains the
secret key or a signature.
"""

import hashlib
import io
import os
import re
from datetime import datetime
from xml.etree import ElementTree
from collections.abc import Callable, Mapping
from typing import BinaryIO, NamedTuple
from urllib.parse import quote

from botocore.auth import EMPTY_SHA256_HASH, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from treq.client import HTTPClient
from zope.interface import implementer

from mailingest.errors import BlobNotFound, ConfigError, StorageError
from mailingest.interfaces import BlobInfo, IBlobStore
from mailingest.retry import Backoff, retry
from mailingest.twisted_private import QuietHTTPConnectionPool
from mailingest.storage.blobs.local_disk import check_key, check_prefix, valid_key

# The waits between the tries of one request: 0.2 s, doubling.
REQUEST_BACKOFF = Backoff(0.2)
ERROR_BODY_LIMIT = 64 * 1024
LIST_PAGE = 1000
# Several SMTP sessions and the extraction service share one pool.
MAX_PERSISTENT_PER_HOST = 8

_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")
_BUCKET = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_TRANSPORT_ERRORS = (
    ConnectError,
    ConnectionClosed,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
)


class _PresetPayloadAuth(S3SigV4Auth):
    """
    S3SigV4Auth replaces any X-Amz-Content-SHA256 header with its own hash of
    the request body; this one signs the hash we already know instead, so the
    file is never read twice.
    """

    def payload(self, request: AWSRequest) -> str:
        return request.context["payload_sha256"]


class _Transient(Exception):
    """A failure worth retrying: the connection broke, went silent or ended early."""


class _Reply(NamedTuple):
    code: int
    etag: str | None
    body: bytes

    @property
    def error_code(self) -> str:
        match = _CODE.search(self.body)
        return match.group(1).decode("utf-8", "replace") if match else ""

    def describe(self) -> str:
        """C{HTTP 403 SignatureDoesNotMatch: message} from the S3 error document."""
        text = f"HTTP {self.code}"
        if self.error_code:
            text += f" {self.error_code}"
        match = _MESSAGE.search(self.body)
        if match:
            text += ": " + match.group(1).decode("utf-8", "replace")
        return text


class _Watchdog:
    """Cancels a Deferred once nothing has moved for C{timeout} seconds."""

    def __init__(self, clock, timeout: float):
        self.expired = False
        self._clock = clock
        self._timeout = timeout
        self._call = None

    def guard(self, d: Deferred) -> Deferred:
        self._call = self._clock.callLater(self._timeout, self._expire, d)
        return d.addBoth(self._finished)

    def touch(self) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(self._timeout)

    def _expire(self, d: Deferred) -> None:
        self.expired = True
        d.cancel()

    def _finished(self, result):
        if self._call.active():
            self._call.cancel()
        if self.expired:
            raise _Transient(f"no progress for {self._timeout:g} s")
        return result


class _ProgressFile:
    """The file being uploaded; each read means the connection took more."""

    def __init__(self, fileobj, progress: Callable[[], None]):
        self._file = fileobj
        self._progress = progress

    def read(self, size: int) -> bytes:
        self._progress()
        return self._file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class _UploadBody(FileBodyProducer):
    """
    A file request body. Once started, the HTTP client owns it and closes the
    file (at the end or by stopping it); L{discard} closes a body the client
    never started, e.g. when the connection was refused.
    """

    def __init__(self, fileobj, progress: Callable[[], None]):
        super().__init__(_ProgressFile(fileobj, progress))
        self._file = fileobj
        self._started = False

    def startProducing(self, consumer):
        self._started = True
        return super().startProducing(consumer)

    def discard(self) -> None:
        if not self._started:
            self._file.close()


class _BodyReader(Protocol):
    """
    Feeds a response body to C{write} as it arrives. Unlike C{treq.collect},
    cancelling C{done} drops the connection, so a stalled body can time out.
    """

    def __init__(self, write: Callable[[bytes], None], progress: Callable[[], None]):
        self.done: Deferred = Deferred(self._abort)
        self._write = write
        self._progress = progress

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._progress()
        try:
            self._write(data)
        except BaseException:
            self.transport.loseConnection()
            self.done.errback()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abort(self, d: Deferred) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _CountingSink:
    """Where a GET body goes; remembers whether anything was written (no retry then)."""

    def __init__(self, fileobj):
        self._fileobj = fileobj
        self.written = 0

    def write(self, data: bytes) -> None:
        self._fileobj.write(data)
        self.written += len(data)


def _listing_page(xml: bytes, strip: int) -> tuple[list[BlobInfo], str | None]:
    """
    The blobs of one ListObjectsV2 answer (object keys less the first
    C{strip} characters, our prefix) and the continuation token, None on the
    last page.
    """
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as e:
        raise StorageError(f"S3 listing is not XML: {e}") from None
    page = []
    for item in root.iterfind("{*}Contents"):
        key = item.findtext("{*}Key", "")[strip:]
        if not valid_key(key):
            continue
        modified = datetime.fromisoformat(item.findtext("{*}LastModified", "").replace("Z", "+00:00"))
        page.append(BlobInfo(key, int(item.findtext("{*}Size", "0")), modified.timestamp()))
    truncated = root.findtext("{*}IsTruncated", "false") == "true"
    return page, root.findtext("{*}NextContinuationToken") if truncated else None


def _describe_exception(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return str(e) or type(e).__name__


@implementer(IBlobStore)
class S3BlobStore:
    """
    Blobs in one bucket, under an optional key prefix.

    C{timeout} is how long a request may make no progress at all (no byte
    sent or received), so a large upload on a slow link is not cut short.
    C{retries} is how many times a failed request is tried again, so a
    request is sent at most C{retries + 1} times; L{check} tries once, so
    readiness answers promptly. C{reactor} (the global one by default) makes
    the connections and keeps time for timeouts and backoff.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str,
        secret_key: str,
        session_token: str | None = None,
        pool: HTTPConnectionPool | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        reactor=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region
        self.endpoint_url = (endpoint_url or f"https://s3.{region}.amazonaws.com").rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._reactor = reactor
        self._signer = _PresetPayloadAuth(Credentials(access_key, secret_key, session_token), "s3", region)
        self._own_pool = pool is None
        if pool is None:
            pool = QuietHTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self._pool = pool
        self._client = HTTPClient(Agent(reactor, pool=pool))

    scratch_dir = None

    def __repr__(self) -> str:
        return f"<S3BlobStore s3://{self.bucket}/{self.prefix} at {self.endpoint_url}>"

    def object_key(self, key: str) -> str:
        """The S3 object key of blob C{key}: prefix, a slash, key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: str, sha256: str, size: int) -> Deferred:
        return Deferred.fromCoroutine(self._put_file(key, path, sha256, size))

    async def _put_file(self, key: str, source: str | bytes, sha256: str, size: int) -> None:
        """Upload C{source}: a file's path, or the bytes themselves."""
        object_key = self.object_key(key)
        what = self._what("PUT", object_key)
        reply = await self._request("PUT", what, self._object_url(object_key), body=(source, sha256, size))
        if reply.code != 200:
            raise StorageError(f"S3 {what}: {reply.describe()}")
        if not reply.etag:
            raise StorageError(f"S3 {what}: HTTP 200 without an ETag, the object may not be stored")

    def put_bytes(self, key: str, data: bytes, sha256: str) -> Deferred:
        """The bytes are in hand: their sha256 is checked here, not left to the service."""
        if hashlib.sha256(data).hexdigest() != sha256:
            return fail(StorageError(f"blob sha256 mismatch: {key} is not the content described"))
        return Deferred.fromCoroutine(self._put_file(key, data, sha256, len(data)))

    def local_path(self, key: str) -> None:
        return None

    def read_to(self, key: str, fileobj: BinaryIO) -> Deferred:
        return Deferred.fromCoroutine(self._read_to(key, fileobj))

    async def _read_to(self, key: str, fileobj: BinaryIO) -> None:
        object_key = self.object_key(key)
        what = self._what("GET", object_key)
        reply = await self._request("GET", what, self._object_url(object_key), sink=_CountingSink(fileobj))
        if reply.code == 404 and reply.error_code != "NoSuchBucket":
            raise BlobNotFound(f"no blob {key} in s3://{self.bucket}/{self.prefix}")
        if reply.code != 200:
            raise StorageError(f"S3 {what}: {reply.describe()}")

    def delete(self, key: str) -> Deferred:
        return Deferred.fromCoroutine(self._delete(key))

    async def _delete(self, key: str) -> None:
        object_key = self.object_key(key)
        what = self._what("DELETE", object_key)
        reply = await self._request("DELETE", what, self._object_url(object_key))
        if reply.code in (200, 204) or (reply.code == 404 and reply.error_code != "NoSuchBucket"):
            return
        raise StorageError(f"S3 {what}: {reply.describe()}")

    async def list_keys(self, prefix: str):
        """ListObjectsV2, a page (up to 1,000 keys) per request; objects outside our key syntax are not ours and skipped."""
        object_prefix = self.object_key(check_prefix(prefix)[:-1]) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        what = self._what("list", object_prefix)
        token = None
        while True:
            query = f"list-type=2&max-keys={LIST_PAGE}&prefix=" + quote(object_prefix, safe="")
            if token is not None:
                query += "&continuation-token=" + quote(token, safe="")
            body = io.BytesIO()
            reply = await self._request("GET", what, f"{self._bucket_url()}?{query}", sink=_CountingSink(body))
            if reply.code != 200:
                raise StorageError(f"S3 {what}: {reply.describe()}")
            page, token = _listing_page(body.getvalue(), strip)
            if page:
                yield page
            if token is None:
                return

    def remove_temporaries(self, before: float, dry_run: bool = False) -> Deferred:
        """A PUT is all or nothing in S3: no temporary objects are ever left."""
        return succeed((0, 0))

    def check(self) -> Deferred:
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        """List at most zero keys under our prefix: proves the endpoint, bucket and keys."""
        query = "list-type=2&max-keys=0"
        if self.prefix:
            query += "&prefix=" + quote(self.prefix + "/", safe="")
        what = self._what("list", self.prefix)
        reply = await self._request("GET", what, f"{self._bucket_url()}?{query}", attempts=1)
        if reply.code != 200:
            raise StorageError(f"S3 {what}: {reply.describe()}")

    def close(self) -> Deferred:
        if self._own_pool:
            return self._pool.closeCachedConnections()
        return succeed(None)

    def _what(self, action: str, object_key: str) -> str:
        return f"{action} s3://{self.bucket}/{object_key} at {self.endpoint_url}"

    def _bucket_url(self) -> str:
        return f"{self.endpoint_url}/{quote(self.bucket, safe='')}"

    def _object_url(self, object_key: str) -> str:
        return f"{self._bucket_url()}/{quote(object_key, safe='/')}"

    async def _request(
        self,
        method: str,
        what: str,
        url: str,
        body: tuple[str | bytes, str, int] | None = None,
        sink: _CountingSink | None = None,
        attempts: int | None = None,
    ) -> _Reply:
        """
        Send one S3 request, again after a 5xx, a connection error or a
        timeout, up to C{attempts} times in all (C{retries + 1} by default);
        fire with the final reply. A GET whose body already reached C{sink}
        is never retried.
        """
        attempts = attempts or self.retries + 1

        async def once() -> _Reply:
            watchdog = _Watchdog(self._reactor, self.timeout)
            exchange = Deferred.fromCoroutine(self._exchange(method, url, body, sink, watchdog.touch))
            try:
                reply = await watchdog.guard(exchange)
            except _Transient as e:
                if sink is not None and sink.written:
                    raise StorageError(f"S3 {what}: {e} after {sink.written} bytes") from None
                raise
            if reply.code >= 500:
                raise _Transient(reply.describe())
            return reply

        def should_retry(error: Exception, retry_number: int, delay: float) -> bool:
            return isinstance(error, _Transient) and retry_number < attempts

        try:
            return await retry(once, REQUEST_BACKOFF, should_retry, self._reactor)
        except _Transient as e:
            if attempts == 1:
                raise StorageError(f"S3 {what}: {e}") from None
            raise StorageError(f"S3 {what} failed {attempts} times: {e}") from None

    async def _exchange(
        self,
        method: str,
        url: str,
        body: tuple[str | bytes, str, int] | None,
        sink: _CountingSink | None,
        progress: Callable[[], None],
    ) -> _Reply:
        headers = self._sign(method, url, body[1] if body else EMPTY_SHA256_HASH)
        producer = self._upload_body(body[0], body[2], progress) if body else None
        try:
            response = await self._client.request(
                method, url, headers=headers, data=producer, unbuffered=True, allow_redirects=False
            )
            progress()
            if sink is not None and response.code == 200:
                await self._read_body(response, sink.write, progress)
                if isinstance(response.length, int) and sink.written != response.length:
                    raise _Transient(f"body ended after {sink.written} of {response.length} bytes")
                return _Reply(response.code, None, b"")
            error_body = bytearray()

            def keep(data: bytes) -> None:
                error_body.extend(data[: ERROR_BODY_LIMIT - len(error_body)])

            await self._read_body(response, keep, progress)
        except _TRANSPORT_ERRORS as e:
            raise _Transient(_describe_exception(e)) from None
        finally:
            if producer is not None:
                producer.discard()
        etags = response.headers.getRawHeaders("etag")
        return _Reply(response.code, etags[0] if etags else None, bytes(error_body))

    def _upload_body(self, source: str | bytes, size: int, progress: Callable[[], None]) -> _UploadBody:
        """The body from the file at C{source}, or C{source} itself when it is the bytes to send."""
        if isinstance(source, bytes):
            return _UploadBody(io.BytesIO(source), progress)
        try:
            fileobj = open(source, "rb")
        except OSError as e:
            raise StorageError(f"cannot read {source}: {e.strerror or e}") from e
        producer = _UploadBody(fileobj, progress)
        if producer.length != size:
            fileobj.close()
            raise StorageError(f"blob size mismatch: {source} holds {producer.length} bytes, expected {size}")
        return producer

    @staticmethod
    def _read_body(response, write: Callable[[bytes], None], progress: Callable[[], None]) -> Deferred:
        reader = _BodyReader(write, progress)
        response.deliverBody(reader)
        return reader.done

    def _sign(self, method: str, url: str, payload_sha256: str) -> dict[str, str]:
        request = AWSRequest(method=method, url=url)
        request.context["payload_sha256"] = payload_sha256
        self._signer.add_auth(request)
        return dict(request.headers.items())


def from_url(
    url: str,
    endpoint: str | None,
    region: str | None,
    environ: Mapping[str, str],
) -> S3BlobStore:
    """
    The store for C{--storage s3://bucket/optional/prefix}. Like the AWS
    command line, the prefix is taken literally (no percent-decoding). Keys
    come from C{AWS_ACCESS_KEY_ID}, C{AWS_SECRET_ACCESS_KEY} and optionally
    C{AWS_SESSION_TOKEN}; without C{--s3-region}, C{AWS_REGION} or
    C{AWS_DEFAULT_REGION} apply, and without C{--s3-endpoint},
    C{AWS_ENDPOINT_URL_S3} or C{AWS_ENDPOINT_URL}.
    """
    if not url.lower().startswith("s3://"):
        raise ConfigError("bad storage URL: S3 storage URLs look like s3://bucket/optional/prefix")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if "@" in bucket:
        raise ConfigError(
            "bad storage URL: credentials do not belong in it; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if not bucket:
        raise ConfigError(f"bad storage URL {url!r}: no bucket, use s3://bucket/optional/prefix")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"bad storage URL {url!r}: {bucket!r} is not a bucket name")
    endpoint = endpoint or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint is not None and not re.match(r"\Ahttps?://[^/@]+(/|\Z)", endpoint, re.IGNORECASE):
        raise ConfigError("bad S3 endpoint: use http://host:port or https://host, without credentials")
    access_key = environ.get("AWS_ACCESS_KEY_ID")
    secret_key = environ.get("AWS_SECRET_ACCESS_KEY")
    missing = [name for name, value in (("AWS_ACCESS_KEY_ID", access_key), ("AWS_SECRET_ACCESS_KEY", secret_key)) if not value]
    if missing:
        raise ConfigError(f"S3 storage needs {' and '.join(missing)} in the environment")
    return S3BlobStore(
        bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region=region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key=access_key,
        secret_key=secret_key,
        session_token=environ.get("AWS_SESSION_TOKEN") or None,
    )
