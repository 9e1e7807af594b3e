"""
The options of mailingest and where their values come from.

One table serves the twistd plugin and the admin command. A value comes from
the command line, else the environment (C{MAILINGEST_<OPTION>}), else the
C{[mailingest]} section of the C{--config} INI file, else the default.
"""

import configparser
import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from mailingest.errors import ConfigError

SECTION = "mailingest"


def positive_int(text: str) -> int:
    """A count: a whole number of at least 1 (also for the admin command's arguments)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not a number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A number of seconds greater than 0 (also for the admin command's arguments)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def clamd_endpoint(text: str) -> str:
    """C{--clamd}: C{unix:/path} or C{tcp:host:port} (see L{mailingest.scanning.clamd.endpoint_description})."""
    from mailingest.scanning.clamd import endpoint_description

    endpoint_description(text)
    return text


def scanner_url(text: str) -> str:
    """C{--rspamd}: an http:// or https:// base URL."""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("must be an http:// URL, e.g. http://127.0.0.1:11333")
    return text.rstrip("/")


_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$")


def public_url(text: str) -> str:
    """
    The site's public base URL (C{--api-public-url}): C{http} or C{https}, a
    host and an optional port, nothing else, since links are built on it and
    C{https} makes the console's cookies C{Secure}. Given without a trailing slash.
    """
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("must be ASCII without spaces or control characters (an IDN host in its xn-- form)")
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}") from None
    scheme, host = url.scheme.lower(), (url.hostname or "")
    if scheme not in ("http", "https"):
        raise ValueError("must start with https:// (or http://)")
    if "@" in url.netloc or url.path not in ("", "/") or url.query or url.fragment or text.endswith(("?", "#")):
        raise ValueError("must be only a scheme, a host and an optional port, e.g. https://mail.example.com")
    if not (":" in host if url.netloc.startswith("[") else _HOST_NAME.match(host)):  # urlsplit checked a bracketed address
        raise ValueError(f"bad host {host!r}")
    if port == 0:
        raise ValueError("port 0 is not a port a client can reach")
    bracketed = f"[{host}]" if ":" in host else host
    return f"{scheme}://{bracketed}" + (f":{port}" if port is not None else "")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return text

    return parse


def boolean(text: str) -> bool:
    """A yes/no setting from the environment or the config file (on the command line: a flag)."""
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}.get(text.lower())
    if value is None:
        raise ValueError("must be yes or no")
    return value


def _worker_memory(text: str) -> int:
    """Bytes of address space for a parser worker: below 64 MiB, Python itself cannot start."""
    value = int(text)
    if value < 64 * 1024 * 1024:
        raise ValueError("must be at least 67108864 (64 MiB)")
    return value


def process_count(text: str) -> int:
    """A number of intake processes, or C{auto}: one per CPU."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return positive_int(text)



def _resolver_address(text: str):
    """The verification resolver's parser, imported when an address is given (dnspython is slow to import)."""
    from mailingest.verification.resolver import parse_resolver_address

    return parse_resolver_address(text)

@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    repeatable: bool = False
    secret: bool = False
    metavar: str = "VALUE"
    flag: bool = False

    @property
    def env(self) -> str:
        return "MAILINGEST_" + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


DAEMON_OPTIONS = (
    Option("smtp", ["tcp:2525"], "SMTP listening endpoint (repeatable)", repeatable=True, metavar="ENDPOINT"),
    Option("http", "tcp:8025:interface=127.0.0.1", "ops HTTP endpoint, or 'none'", metavar="ENDPOINT"),
    Option("domain", ["localhost"], "recipient domain we accept mail for (repeatable)", repeatable=True, metavar="DOMAIN"),
    Option("hostname", None, "name in the greeting and Received: header [default: this machine's FQDN]", metavar="NAME"),
    Option("max-message-size", 52428800, "largest message accepted, in bytes", positive_int, metavar="BYTES"),
    Option("max-recipients", 100, "recipients per message", positive_int, metavar="N"),
    Option("max-connections", 1000, "simultaneous SMTP connections in total", positive_int, metavar="N"),
    Option("max-connections-per-ip", 50, "simultaneous SMTP connections from one address", positive_int, metavar="N"),
    Option("timeout", 300.0, "idle client timeout in seconds", positive_float, metavar="SECONDS"),
    Option("tls-cert", None, "PEM certificate chain; with --tls-key, STARTTLS is offered", metavar="FILE"),
    Option("tls-key", None, "PEM private key for --tls-cert", metavar="FILE"),
    Option("poll-interval", 1.0, "extraction poll period in seconds", positive_float, metavar="SECONDS"),
    Option("max-attempts", 5, "attempts for transient extraction errors before 'failed'", positive_int, metavar="N"),
    Option("extraction-lease", 120.0, "seconds a daemon holds a message it extracts; after that another daemon may take it over", positive_float, metavar="SECONDS"),
    Option("extraction-processes", 1, "worker processes parsing messages for extraction", positive_int, metavar="N"),
    Option("extraction-timeout", 300.0, "seconds one message may take to parse before its worker is killed (the attempt is retried)", positive_float, metavar="SECONDS"),
    Option("proxy-trusted", [], "network (CIDR) whose PROXY headers are believed, repeatable or comma-separated; required with a haproxy: endpoint", _network, repeatable=True, metavar="CIDR"),
    Option("min-free-space", 104857600, "free bytes the local data directories need; below, /readyz answers 503", positive_int, metavar="BYTES"),
    Option("log-format", "text", "log format: text or json (JSON lines)", _choice("text", "json"), metavar="FORMAT"),
    Option("extraction-memory-limit", 1073741824, "address space one parser worker may use, in bytes; a message that needs more goes to 'failed'", _worker_memory, metavar="BYTES"),
    Option("store-timeout", 30.0, "seconds the end of DATA may take to store a message (object storage and database) before it is answered 451", positive_float, metavar="SECONDS"),
    Option("gc-interval", 3600.0, "seconds between sweeps removing blobs no row references; 0 disables", _non_negative_float, metavar="SECONDS"),
    Option("gc-min-age", 86400.0, "the sweeper removes only unreferenced blobs older than this", positive_float, metavar="SECONDS"),
    Option("retention-interval", 3600.0, "seconds between retention passes deleting what is past each organisation's retention period; 0 disables", _non_negative_float, metavar="SECONDS"),
    Option("dns-resolver", None, "DNS server for the SPF, DKIM, DMARC and ARC checks [default: the system's, /etc/resolv.conf]", _resolver_address, metavar="HOST[:PORT]"),
    Option("dns-budget", 5.0, "seconds of DNS lookups the sender checks of one message may take; past it a check gives temperror", positive_float, metavar="SECONDS"),
    Option("api", "none", "JSON API endpoint (e.g. tcp:8026:interface=127.0.0.1 or ssl:...), or 'none'", metavar="ENDPOINT"),
    Option("api-admin-token-file", None, "file holding the API's admin token, which sees every organisation [default: no admin token]", metavar="FILE"),
    Option("api-public-url", None, "the site's public base URL (https://host[:port]) as clients reach it: full document URLs in webhooks, and https:// makes the console's cookies Secure behind a TLS proxy [default: paths only]", public_url, metavar="URL"),
    Option("webhook-allow-http", False, "allow plain http:// webhook URLs", boolean, flag=True),
    Option("webhook-allow-private", False, "allow webhooks to loopback, private, link-local and other internal addresses", boolean, flag=True),
    Option("webhook-retry-horizon", 259200.0, "seconds a webhook event is retried before it is dead", positive_float, metavar="SECONDS"),
    Option("inline-images", "skip", "images the HTML body shows (cid:, Content-Location): skip, or keep them as documents too", _choice("skip", "keep"), metavar="skip|keep"),
    Option("clamd", None, "ClamAV's clamd to scan every document and raw message with: unix:/run/clamav/clamd.ctl or tcp:HOST:PORT [default: no malware scanning]", clamd_endpoint, metavar="ENDPOINT"),
    Option("clamd-max-stream", 26214400, "clamd's StreamMaxLength in bytes: a document larger is not sent and gets an 'error' verdict", positive_int, metavar="BYTES"),
    Option("rspamd", None, "rspamd's normal worker to ask for spam verdicts, e.g. http://127.0.0.1:11333 [default: no spam verdicts]", scanner_url, metavar="URL"),
    Option("scan-budget", 30.0, "seconds clamd, and rspamd, may take for one message; past it the part not scanned gets an 'error' verdict", positive_float, metavar="SECONDS"),
    Option("mx-host", [], "another host name a custom domain's MX may name besides --hostname (repeatable)", repeatable=True, metavar="NAME"),
    Option("domain-grace", 259200.0, "seconds a verified custom domain's TXT record may be missing before it is suspended", positive_float, metavar="SECONDS"),
    Option("domain-check-interval", 60.0, "seconds between the daemon's rounds of custom domain checks (pending ones are re-checked every 5 minutes, verified ones daily)", positive_float, metavar="SECONDS"),
    Option("processes", 1, "SMTP intake processes sharing the listening sockets, or 'auto' (one per CPU)", process_count, metavar="N"),
)

STORAGE_OPTIONS = (
    Option("database", "sqlite:///mailingest-data/mailingest.db", "sqlite:///path.db or postgresql://user:pass@host:port/db", secret=True, metavar="URL"),
    Option("storage", "file:mailingest-data/blobs", "file:DIR or s3://bucket/prefix", metavar="URL"),
    Option("s3-endpoint", None, "S3 endpoint URL (MinIO, Ceph, R2...) [default: AWS]", metavar="URL"),
    Option("s3-region", None, "S3 region [default: us-east-1]", metavar="REGION"),
)

ALL_OPTIONS = DAEMON_OPTIONS + STORAGE_OPTIONS


def default_hostname() -> str:
    return socket.getfqdn()


def read_config_file(path: str) -> dict[str, str]:
    """The [mailingest] section of an INI file, keyed by option name."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"bad config file {path}: {e.message.splitlines()[0]}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"config file {path} has no [{SECTION}] section")
    values = dict(parser.items(SECTION))
    known = {o.name for o in ALL_OPTIONS} | {o.key for o in ALL_OPTIONS}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return {k.replace("_", "-"): v for k, v in values.items()}


def _split(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


def resolve(
    options: tuple[Option, ...],
    given: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    config_path: str | None = None,
) -> dict[str, Any]:
    """
    Settle every option's value by precedence: C{given} (the command line;
    None or [] means not given), environment, config file, default.

    Keys of the result are the option names with dashes as underscores.
    """
    if config_path is None:
        config_path = environ.get("MAILINGEST_CONFIG") or None
    from_file = read_config_file(config_path) if config_path else {}
    settled = {}
    for option in options:
        value = given.get(option.key)
        if value in (None, []):
            text, origin = None, None
            if environ.get(option.env, "") != "":
                text, origin = environ[option.env], option.env
            elif option.name in from_file:
                text, origin = from_file[option.name], f"{config_path} [{SECTION}] {option.name}"
            if text is None:
                value = option.default
            elif option.repeatable:
                value = [_parse(option, item, origin) for item in _split(text)]
            else:
                value = _parse(option, text.strip(), origin)
        elif option.repeatable:
            value = [_parse(option, v, "--" + option.name) for v in value]
        else:
            value = _parse(option, value, "--" + option.name)
        settled[option.key] = value
    return settled


def _parse(option: Option, text: Any, origin: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return option.parse(text)
    except ValueError as e:
        shown = "***" if option.secret else repr(text)
        raise ConfigError(f"{origin}: invalid value {shown} ({e})") from None
