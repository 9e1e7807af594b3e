"""
The daemon's settings as one frozen value, settled once from the option table
(L{mailingest.app.options}: command line, environment, INI file, default) and
passed down, so a misspelt name fails where it is written and a part cannot
change a setting another part reads. The fields are the options' keys;
L{StorageSettings} is the part the admin command needs.
"""

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mailingest.app.options import ALL_OPTIONS, STORAGE_OPTIONS, Option, default_hostname, resolve
from mailingest.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class StorageSettings:
    """Where the messages live: what the admin command and every daemon process open."""

    OPTIONS: ClassVar[tuple[Option, ...]] = STORAGE_OPTIONS

    database: str
    storage: str
    s3_endpoint: str | None
    s3_region: str | None

    @classmethod
    def settle(
        cls, given: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ, config_path: str | None = None
    ):
        """The settings from C{given} (the command line), the environment, the config file and the defaults."""
        return cls.from_values(resolve(cls.OPTIONS, given or {}, environ, config_path))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]):
        """Settings from parsed values keyed like the fields (a repeatable one as a list); a missing or unknown key is a TypeError."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


@dataclass(frozen=True)
class Settings(StorageSettings):
    """
    Everything the daemon runs with. C{hostname} None means this machine's
    FQDN; the checks that concern several options at once are made here, so
    no part of the daemon starts with settings that do not go together.
    """

    OPTIONS: ClassVar[tuple[Option, ...]] = ALL_OPTIONS

    smtp: tuple[str, ...]
    http: str
    domain: tuple[str, ...]
    hostname: str
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    timeout: float
    tls_cert: str | None
    tls_key: str | None
    poll_interval: float
    max_attempts: int
    extraction_lease: float
    extraction_processes: int
    extraction_timeout: float
    proxy_trusted: tuple[Network, ...]
    min_free_space: int
    log_format: str
    extraction_memory_limit: int
    store_timeout: float
    gc_interval: float
    gc_min_age: float
    retention_interval: float
    dns_resolver: tuple[str, int] | None
    dns_budget: float
    api: str
    api_admin_token_file: str | None
    api_public_url: str | None
    webhook_allow_http: bool
    webhook_allow_private: bool
    webhook_retry_horizon: float
    inline_images: str
    clamd: str | None
    clamd_max_stream: int
    rspamd: str | None
    scan_budget: float
    mx_host: tuple[str, ...]
    domain_grace: float
    domain_check_interval: float
    processes: int

    def __post_init__(self) -> None:
        if self.hostname is None:
            object.__setattr__(self, "hostname", default_hostname())
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        # Here, not at the top: the admin command settles StorageSettings without the SMTP side.
        from mailingest.smtp.proxy import ENDPOINT_PREFIX

        if any(d.startswith(ENDPOINT_PREFIX) for d in self.smtp) and not self.proxy_trusted:
            raise ConfigError(
                "a haproxy: endpoint believes the client address its peer sends: "
                "give --proxy-trusted with the networks of your load balancers (CIDR)"
            )

    @property
    def gc_floor(self) -> float:
        """How old a blob whose row is still to come can be: the least margin the sweeper may be given."""
        return self.store_timeout + self.extraction_lease + self.extraction_timeout

    @property
    def multi_process(self) -> bool:
        """SMTP is served by C{processes} intake processes (L{mailingest.app.processes}), not by the daemon's own process."""
        return self.processes > 1

