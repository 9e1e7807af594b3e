"""
The SMTP servers under test, each a child process on a free loopback port.

A server is started fresh for every round (and stopped after it), so each
round begins with empty storage and the peak RSS it reports belongs to that
round's load. A round only starts once the server has sent its 220 greeting.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from bench.backends import Backend, Database

HOST = "127.0.0.1"
# The checkout: bench.dns_stub imports the tests' DNS server from it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "bench.test"
ORG = "bench"
RECIPIENT = f"orders+{ORG}@{DOMAIN}"
SENDER = f"load@{DOMAIN}"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
VENV_BIN = os.path.dirname(sys.executable)
BASELINE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aiosmtpd_baseline.py")


class TargetError(RuntimeError):
    """A server would not start, or died during a round."""


def tool(name: str) -> str:
    """A program from this virtualenv first (twistd, mailingest), else from PATH or /usr/sbin."""
    candidate = os.path.join(VENV_BIN, name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if found is None:
        raise TargetError(f"{name} not found (see bench/README.md for how to install it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_environment() -> dict[str, str]:
    """Our environment without MAILINGEST_* settings, which would change what is measured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILINGEST_")}


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """
    CPU time (user + system) of C{pid} and every live descendant, with what
    each has collected from children it already reaped (a replaced parser
    worker, say).
    """
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """L{cpu_seconds} as (user, system): the kernel's share is what a busy disk inflates."""
    user = system = 0.0
    for each in descendants(pid):
        try:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the command.
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
        user += (utime + cutime) / _TICKS
        system += (stime + cstime) / _TICKS
    return user, system


def descendants(pid: int) -> list[int]:
    """C{pid} and every live process under it."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                for child in children.read().split():
                    found += descendants(int(child))
        except FileNotFoundError:
            pass
    return found


def peak_rss_mb(pid: int) -> float:
    """VmHWM, the process's peak resident set, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


class Server(ABC):
    """One server process for one round; use as a context manager."""

    role: str  # "sink", "baseline", "queue" or "mailingest": what the report compares

    def __init__(self, directory: str):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "server.log")

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that serves SMTP on C{self.port}."""

    @abstractmethod
    def stored(self) -> int:
        """How many messages this server kept (the sink: received)."""

    def prepare(self) -> None:
        """Set-up before the server starts."""

    def start(self) -> None:
        self.prepare()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_environment(),
            )
        self._wait_for_greeting()

    def _wait_for_greeting(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TargetError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TargetError(f"{self.name} did not greet on port {self.port} within {START_TIMEOUT:.0f} s")

    @property
    def name(self) -> str:
        return type(self).__name__

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def cpu_times(self) -> tuple[float, float]:
        """CPU time (user, system) used so far by the server and its child processes."""
        return cpu_times(self.process.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def busy(self) -> bool:
        """Whether work on what it accepted is still going on after the load (extraction, a queue to empty)."""
        return False

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise TargetError(f"{self.name} died with {self.process.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "Server":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class SmtpSink(Server):
    """Postfix's smtp-sink: reads and discards, the practical limit of the load tool and the loopback."""

    role = "sink"

    def command(self) -> list[str]:
        # -c prints "sess=N quit=N mesg=N" counters; smtp-sink refuses to run as
        # root without -u.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [tool("smtp-sink"), "-c", *user, f"{HOST}:{self.port}", "256"]

    def stored(self) -> int:
        with open(self.log_path, "rb") as log:
            counts = re.findall(rb"mesg=(\d+)", log.read())
        return int(counts[-1]) if counts else 0


class AiosmtpdBaseline(Server):
    """L{bench.aiosmtpd_baseline}: one fsynced file per message."""

    role = "baseline"

    def __init__(self, directory: str):
        super().__init__(directory)
        self.messages = os.path.join(directory, "messages")

    def command(self) -> list[str]:
        # Run as a script (it imports nothing from bench), so any cwd will do.
        return [sys.executable, BASELINE_SCRIPT, str(self.port), self.messages]

    def stored(self) -> int:
        return sum(1 for name in os.listdir(self.messages) if name.endswith(".eml"))


class PostfixQueue(Server):
    """
    A throwaway Postfix instance of its own (config and queue in the round's
    directory): smtpd → cleanup → queue file fsynced → qmgr → the discard
    transport. What a real MTA does before it answers 250, with nothing after.
    """

    role = "queue"
    # Services of Debian's master.cf that would run chrooted into the default queue directory.
    _CHROOT = re.compile(r"^(\S+\s+(?:unix|inet|fifo|pass|unix-dgram)\s+\S+\s+\S+\s+)y(\s)", re.MULTILINE)

    def __init__(self, directory: str):
        super().__init__(directory)
        # Beside the round's directory, on the same disk: postfix-script cannot take a path with a space.
        self.root = os.path.join(os.path.dirname(directory), f"postfix-{self.port}")
        self.config = os.path.join(self.root, "config")
        self.queue = os.path.join(self.root, "queue")

    @staticmethod
    def available() -> bool:
        """Postfix is installed and we are root (its queue belongs to root and the postfix user)."""
        try:
            pwd.getpwnam("postfix")
            tool("postfix")
        except (KeyError, TargetError):
            return False
        return os.geteuid() == 0

    def prepare(self) -> None:
        postfix, postdrop = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postdrop").gr_gid
        # The postfix user must reach its queue: the run's directory (mkdtemp: 0700) lets it pass.
        run = os.path.dirname(self.directory)
        os.chmod(run, os.stat(run).st_mode | 0o011)
        os.makedirs(self.config)
        data = os.path.join(self.root, "data")
        os.makedirs(data)
        os.chown(data, postfix, -1)
        for name, owner, group, mode in (
            ("pid", 0, -1, 0o755), ("maildrop", postfix, postdrop, 0o730), ("public", postfix, postdrop, 0o710),
            *((name, postfix, -1, 0o700) for name in (
                "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private", "saved", "trace",
            )),
        ):
            path = os.path.join(self.queue, name)
            os.makedirs(path, mode)
            os.chown(path, owner, group)
            os.chmod(path, mode)
        with open("/etc/postfix/master.cf") as default:
            master = default.read()
        master = re.sub(r"^smtp\s+inet\s.*$", f"{HOST}:{self.port} inet n - n - - smtpd", master, count=1, flags=re.MULTILINE)
        with open(os.path.join(self.config, "master.cf"), "w") as out:
            out.write(self._CHROOT.sub(r"\1n\2", master))
        with open(os.path.join(self.config, "main.cf"), "w") as out:
            out.write(
                "compatibility_level = 3.6\n"
                f"queue_directory = {self.queue}\ndata_directory = {data}\n"
                f"myhostname = postfix.bench\nmydestination =\nrelay_domains = {DOMAIN}\n"
                f"inet_interfaces = {HOST}\ninet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n"
                "smtpd_recipient_restrictions = permit_mynetworks, reject\n"
                "default_transport = discard:bench\nrelay_transport = discard:bench\nlocal_transport = discard:bench\n"
                "maillog_file = /dev/stdout\nalias_maps =\nalias_database =\n"
                "smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n"
                "default_process_limit = 100\nmessage_size_limit = 60000000\n"
            )

    def command(self) -> list[str]:
        return [tool("postfix"), "-c", self.config, "start-fg"]

    def peak_rss_mb(self) -> float:
        """The largest of its processes' (master, smtpd, cleanup, qmgr...): each is small, none holds a message whole."""
        peaks = []
        for pid in descendants(self.process.pid):
            try:
                peaks.append(peak_rss_mb(pid))
            except FileNotFoundError:  # ended meanwhile (an smtpd whose session closed)
                pass
        return max(peaks, default=float("nan"))

    def stored(self) -> int:
        """Messages cleanup wrote to the queue (and fsynced) before smtpd's 250; discard may take the last ones later."""
        with open(self.log_path, "rb") as log:
            return len(re.findall(rb"postfix/cleanup\[\d+\]: \S+: message-id=", log.read()))

    def busy(self) -> bool:
        """Messages still in its queue (incoming, active, deferred): qmgr and discard have work left."""
        return any(files for name in ("incoming", "active", "deferred") for _, _, files in os.walk(os.path.join(self.queue, name)))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            subprocess.run([tool("postfix"), "-c", self.config, "stop"], capture_output=True, timeout=STOP_TIMEOUT)
        super().stop()


class Mailingest(Server):
    """The daemon under test, as an operator runs it, on its own fresh storage."""

    role = "mailingest"
    # Given to bench.dns_stub.
    dns_args: tuple[str, ...] = ()

    def __init__(self, directory: str, backend: Backend, processes: str = "1"):
        super().__init__(directory)
        self.backend = backend
        self.processes = processes
        self.database: Database | None = None
        self.dns: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return mailingest_name(self.backend, self.processes)

    def prepare(self) -> None:
        # The sender checks ask a DNS server that answers at once (bench.dns_stub).
        self.dns = subprocess.Popen(
            [sys.executable, "-m", "bench.dns_stub", *self.dns_args], stdout=subprocess.PIPE, env=clean_environment(), cwd=REPO
        )
        self.dns_port = int(self.dns.stdout.readline())
        self.database = self.backend.database(self.directory)
        for command in (["migrate"], ["org", "add", ORG]):
            subprocess.run(
                [tool("mailingest"), "--database", self.database.url, *command],
                cwd=self.directory,
                env=clean_environment(),
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def command(self) -> list[str]:
        return [
            tool("twistd"), "-n", "--pidfile=", "--logfile", self.log_path,
            "mailingest",
            "--smtp", f"tcp:{self.port}:interface={HOST}",
            "--http", "none",
            "--domain", DOMAIN,
            "--hostname", "mailingest.bench",
            "--max-connections-per-ip", "1000",
            "--max-message-size", "60000000",
            "--database", self.database.url,
            "--dns-resolver", f"{HOST}:{self.dns_port}",
            "--processes", self.processes,
            *self.backend.storage_args(self.directory),
            *self.backend.scanner_args(),
        ]

    def _children(self, module: str) -> list[int]:
        """The daemon's child processes running C{module} (parser workers, intake processes)."""
        found = []
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        if module.encode() in cmdline.read():
                            found.append(int(pid))
                except FileNotFoundError:
                    pass
        return found

    def peak_rss_mb(self) -> float:
        """The highest peak RSS of the intake: the daemon itself, or its largest intake process."""
        peaks = [super().peak_rss_mb()]
        for pid in self._children("mailingest.app.intake"):
            try:
                peaks.append(peak_rss_mb(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass
        return max(peaks)

    def workers_peak_rss_mb(self) -> float:
        """
        The highest peak RSS of the daemon's parser workers, 0 without any:
        the VmHWM of those alive now, and the peak each replaced worker logged
        as it exited (a live worker's VmHWM only grows, so nothing is missed
        by reading it once at the end).
        """
        peaks = []
        for pid in self._children("mailingest.extraction.worker"):
            try:
                peaks.append(peak_rss_mb(pid))
            except (FileNotFoundError, ProcessLookupError):
                pass
        with open(self.log_path, errors="replace") as log:
            peaks += map(float, re.findall(r"parser worker \d+ replaced: .* \(peak (\d+) MiB\)", log.read()))
        return max(peaks, default=0.0)

    def count(self, sql: str) -> int:
        return self.database.scalar(sql)

    def stored(self) -> int:
        return self.count("SELECT COUNT(*) FROM inbound_message")

    def queued(self) -> int:
        """Messages the extraction service has not finished yet."""
        return self.count("SELECT COUNT(*) FROM inbound_message WHERE status = 'received'")

    def busy(self) -> bool:
        return self.queued() > 0

    def stop(self) -> None:
        super().stop()
        if self.database is not None:
            self.database.close()
        if self.dns is not None:
            self.dns.kill()
            self.dns.wait()


@dataclass(frozen=True)
class Target:
    """A kind of server in the comparison, and how to start one for a round."""

    name: str
    role: str
    make: Callable[[str], Server]


def mailingest_name(backend: Backend, processes: str) -> str:
    return f"mailingest ({backend.label})" + ("" if processes == "1" else f" --processes {processes}")


def targets(backends: list[Backend], processes: list[str] = ("1",)) -> list[Target]:
    """The round-robin order: smtp-sink, aiosmtpd, a Postfix queue (when this is root with Postfix installed), then each mailingest backend with each number of intake processes."""
    chosen = [
        Target("smtp-sink", SmtpSink.role, SmtpSink),
        Target("aiosmtpd", AiosmtpdBaseline.role, AiosmtpdBaseline),
    ]
    if PostfixQueue.available():
        chosen.append(Target("postfix queue", PostfixQueue.role, PostfixQueue))
    for backend in backends:
        for count in processes:
            chosen.append(
                Target(mailingest_name(backend, count), Mailingest.role, lambda d, b=backend, n=count: Mailingest(d, b, n))
            )
    return chosen
