"""
A real ClamAV daemon and a real rspamd for the tests, each started once per
test process in a temporary directory of its own and stopped at exit.

L{StandIn} plays a broken scanner on 127.0.0.1 instead (never answers,
answers garbage, closes mid-stream, answers slowly).

No signature download is possible here: clamd loads a database the tests
write (an C{.hdb} hash of the EICAR test file and an C{.ndb} body pattern of
a file the tests make), the way an operator adds local signatures; it starts
in a second. rspamd runs with its packaged rules (GTUBE among them) and a
temporary local config; the Hyperscan databases it compiles the first time
(about a minute) are kept in a cache directory that outlives the test run,
so later starts take seconds.

Without the binaries the tests are skipped, except under C{CI=true}, where
that is a failure (.ci/run installs clamav-daemon and rspamd).
"""

import atexit
import getpass
import grp
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from twisted.internet import endpoints, protocol, reactor
from twisted.trial.unittest import SkipTest

from tests.daemon import free_port

CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# A file of our own that the .ndb signature below finds (hex of its marker).
TEST_MARKER = b"MAILINGEST-LOCAL-TEST-SIGNATURE-7d1f"
STREAM_MAX = 8 * 1024 * 1024

_started: dict[str, object] = {}


def missing(binary: str, what: str) -> None:
    """Skip, or fail under CI=true."""
    reason = f"{what} is not installed ({binary}); apt-get install {'clamav-daemon' if 'clamd' in binary else 'rspamd'}"
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(reason + " (CI=true: scanner tests must run)")
    raise SkipTest(reason)


def _wait(check, timeout: float, process: subprocess.Popen, log: str, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {_tail(log)}")
        if check():
            return
        try:  # a tenth of a second, or less if it exits meanwhile
            process.wait(0.1)
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    raise RuntimeError(f"{what} did not start within {timeout:g} s: {_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-2000:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen, directory: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    shutil.rmtree(directory, ignore_errors=True)


class Clamd:
    """clamd on a Unix socket and a TCP port of its own; C{unix} and C{tcp} are C{--clamd} values."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="mailingest-clamd-")
        database = os.path.join(self.directory, "db")
        os.mkdir(database)
        with open(os.path.join(database, "local.hdb"), "w") as f:
            f.write(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Mailingest.Test.EICAR\n")
        with open(os.path.join(database, "local.ndb"), "w") as f:
            f.write(f"Mailingest.Test.Marker:0:*:{TEST_MARKER.hex()}\n")
        self.socket = os.path.join(self.directory, "clamd.sock")
        self.port = free_port()
        self.log = os.path.join(self.directory, "clamd.log")
        config = os.path.join(self.directory, "clamd.conf")
        user = getpass.getuser()
        with open(config, "w") as f:
            f.write(
                f"Foreground yes\nDatabaseDirectory {database}\nLocalSocket {self.socket}\n"
                f"TCPSocket {self.port}\nTCPAddr 127.0.0.1\nLogFile {self.log}\n"
                f"StreamMaxLength {STREAM_MAX}\nMaxThreads 8\nUser {user}\n"
            )
        self.process = subprocess.Popen([CLAMD, "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(self._answers, 60, self.process, self.log, "clamd")
        self.unix = f"unix:{self.socket}"
        self.tcp = f"tcp:127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.socket)
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process, self.directory)


_RSPAMD_LOCAL = {
    "logging.inc": 'type = "file";\nfilename = "{log}";\nlevel = "warning";\n',
    "worker-controller.inc": "enabled = false;\n",
    "worker-proxy.inc": "enabled = false;\n",
    "worker-fuzzy.inc": "enabled = false;\n",
    "worker-normal.inc": 'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n',
    # Nothing to ask on the network here: the RBLs and the like give up at once.
    "options.inc": 'dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 0.1s; retransmits = 0; }}\n',
    "redis.conf": "",
    # Takes the sender checks mailingest already did from the SPF, DKIM and DMARC request headers.
    "http_headers.conf": "enabled = true;\n",
}


class Rspamd:
    """rspamd's normal worker on a TCP port of its own; C{url} is the C{--rspamd} value."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="mailingest-rspamd-")
        self.port = free_port()
        self.log = os.path.join(self.directory, "rspamd.log")
        local = os.path.join(self.directory, "local.d")
        os.mkdir(local)
        for name, text in _RSPAMD_LOCAL.items():
            with open(os.path.join(local, name), "w") as f:
                f.write(text.format(log=self.log, port=self.port, dns=free_port()))
        cache = os.path.join(tempfile.gettempdir(), "mailingest-test-rspamd-cache")
        os.makedirs(cache, exist_ok=True)
        user = getpass.getuser()
        argv = [
            RSPAMD, "-f", "-u", user, "-g", grp.getgrgid(os.getgid()).gr_name, "-c", "/etc/rspamd/rspamd.conf",
            f"--var=LOCAL_CONFDIR={self.directory}", f"--var=DBDIR={cache}",
            f"--var=RUNDIR={self.directory}", f"--var=LOGDIR={self.directory}",
        ]
        self.process = subprocess.Popen(argv, stdout=open(self.log + ".out", "w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        _wait(self._answers, 240, self.process, self.log + ".out", "rspamd")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=1) as response:
                return response.read().strip() == b"pong"
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.process, self.directory)


def clamd() -> Clamd:
    """The test process's clamd, started on first use."""
    if not os.path.exists(CLAMD):
        missing(CLAMD, "ClamAV's clamd")
    return _shared("clamd", Clamd)


def rspamd() -> Rspamd:
    """The test process's rspamd, started on first use."""
    if not os.path.exists(RSPAMD):
        missing(RSPAMD, "rspamd")
    return _shared("rspamd", Rspamd)


def _shared(name: str, start):
    server = _started.get(name)
    if server is None or server.process.poll() is not None:
        server = _started[name] = start()
        atexit.register(server.stop)
    return server


class _Broken(protocol.Protocol):
    """One connection to a L{StandIn}, doing what its C{mode} says at the time the first bytes come."""

    def __init__(self, stand_in: "StandIn"):
        self.stand_in = stand_in
        self.answered = False

    def connectionMade(self) -> None:
        self.stand_in.open += 1
        self.stand_in.connections += 1

    def dataReceived(self, data: bytes) -> None:
        mode = self.stand_in.mode
        if mode == "garbage":
            self.transport.write(b"\x89PNG" + b"\xff" * 10000)
        elif mode == "close":
            self.transport.loseConnection()
        elif mode == "slow" and not self.answered:
            self.answered = True
            reactor.callLater(self.stand_in.delay, self.transport.write, b"stream: OK\0")

    def connectionLost(self, reason) -> None:
        self.stand_in.open -= 1


class StandIn:
    """
    A broken scanner on 127.0.0.1 (C{tcp} is a C{--clamd} value, C{url} a
    C{--rspamd} one): C{mode} C{silent} accepts and never answers,
    C{garbage} answers garbage, C{close} closes once the first bytes come,
    C{slow} answers clamd's C{OK} after C{delay} seconds. The mode can be
    changed between scans; C{open} counts the connections not closed yet.
    """

    def __init__(self, mode: str = "silent", delay: float = 0.02):
        self.mode = mode
        self.delay = delay
        self.open = 0
        self.connections = 0
        self.port = None

    async def start(self, test) -> "StandIn":
        """Listening; stopped by C{test}'s cleanup."""
        factory = protocol.Factory.forProtocol(lambda: _Broken(self))
        self.port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        test.addCleanup(self.port.stopListening)
        number = self.port.getHost().port
        self.tcp = f"tcp:127.0.0.1:{number}"
        self.url = f"http://127.0.0.1:{number}"
        return self
