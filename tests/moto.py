"""
A moto S3 server in a subprocess, with AWS signature verification on.

moto only verifies signatures made with access keys that exist in its own
IAM, and with verification on from the start nobody could create one. So the
server starts with verification on (C{INITIAL_NO_AUTH_ACTION_COUNT=0}), we
switch it off through C{POST /moto-api/reset-auth} just long enough to create
an IAM user, its policy and access key, then switch it back on: every later
request, bucket creation included, must be signed with that key.

Starting moto takes a second or two, so test modules share one server through
L{shared_server} (stopped at interpreter exit) and isolate themselves with a
fresh bucket each.
"""

import atexit
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import botocore.session
from botocore.config import Config

from tests.ports import free_port

REGION = "us-east-1"
START_TIMEOUT = 30.0

_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
)


def _moto_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "moto.server"]


class MotoServer:
    """One moto_server process on 127.0.0.1 with an IAM key allowed every S3 action."""

    def __init__(self) -> None:
        self.endpoint: str | None = None
        self.access_key: str | None = None
        self.secret_key: str | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._buckets = itertools.count()

    def start(self) -> None:
        """Start the server, wait until it answers and create the access key."""
        port = free_port()
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0", MOTO_PORT=str(port))
        self._process = subprocess.Popen(
            _moto_command() + ["-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        try:
            self._wait_until_answering(port)
            self._create_access_key()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server process (idempotent)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def create_bucket(self) -> str:
        """A new, empty bucket (created with a signed request) and its name."""
        name = f"test-{os.getpid()}-{next(self._buckets)}-{uuid.uuid4().hex[:8]}"
        self.client("s3").create_bucket(Bucket=name)
        return name

    def client(self, service: str, access_key: str | None = None, secret_key: str | None = None):
        """
        A botocore client for this server, signing with our key unless told
        otherwise. No proxies: botocore would send even 127.0.0.1 through an
        HTTP_PROXY from the environment.
        """
        return botocore.session.Session().create_client(
            service,
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, proxies={}),
        )

    def _wait_until_answering(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with status {self._process.returncode}: {self._output()}")
            try:
                self._moto_api("GET", "/moto-api/data.json")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on port {port}: {self._output()}")
                time.sleep(0.05)

    def _create_access_key(self) -> None:
        self._moto_api("POST", "/moto-api/reset-auth", b"inf")
        try:
            iam = self.client("iam", "AKIAUNUSED", "unused")
            iam.create_user(UserName="mailingest-test")
            iam.put_user_policy(UserName="mailingest-test", PolicyName="s3", PolicyDocument=_POLICY)
            key = iam.create_access_key(UserName="mailingest-test")["AccessKey"]
        finally:
            self._moto_api("POST", "/moto-api/reset-auth", b"0")
        self.access_key = key["AccessKeyId"]
        self.secret_key = key["SecretAccessKey"]

    def _moto_api(self, method: str, path: str, body: bytes | None = None) -> bytes:
        host, port = self.endpoint[len("http://"):].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request(method, path, body)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"moto {method} {path}: HTTP {response.status} {data[:200]!r}")
        return data

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode("utf-8", "replace")


_shared: MotoServer | None = None


def shared_server() -> MotoServer:
    """The moto server shared by every test in this process, started on first use."""
    global _shared
    if _shared is None:
        server = MotoServer()
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared
