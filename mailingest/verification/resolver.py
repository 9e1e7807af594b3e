"""
DNS for the sender checks: one resolver, one time budget per message.

The checks run in threads of the sender check process with blocking lookups
(pyspf and dkimpy are synchronous). Every lookup of one message draws on the
same deadline, so a server that never answers costs the message C{budget}
seconds at most and gives C{temperror}, never a stuck thread. Answers are
cached for the life of the process (dnspython's LRU cache, by TTL): a sender's records are asked once,
not per message. A name whose server did not answer is remembered as dead
(L{DeadNames}) for a minute, with the names under it: a silent DNS server
costs the budget once a minute, not once per message of its domain.

A check may also be asked from the cache alone (C{cached_only}): nothing is
sent, and a lookup the cache cannot answer ends the check with L{NotCached}.
The check process runs such checks at once, in the thread that reads the
requests, and hands only the others to its threads.
"""

import threading
import time
from collections import OrderedDict

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

# Bigger TXT answers than this are no SPF, DKIM key or DMARC record anyone
# publishes (a 4096-bit RSA key is about 800 bytes): refused unread.
MAX_TXT_BYTES = 4096
DEFAULT_BUDGET_SECONDS = 5.0


class DnsTemporaryError(Exception):
    """A timeout, SERVFAIL or an exhausted budget: the check's result is C{temperror}."""


class DnsRecordTooLarge(Exception):
    """A TXT answer above L{MAX_TXT_BYTES}: the check's result is C{permerror}."""


class NotCached(Exception):
    """A check from the cache alone needed an answer the cache does not hold: it must be asked of DNS."""


class _Unasked(OSError):
    """What L{_CacheOnly} raises: dnspython drops a server raising an OSError and gives up (no server left)."""


class _CacheOnly(dns.nameserver.Nameserver):
    """A nameserver nothing is ever sent to: a resolver with only this one answers from its cache or not at all."""

    def __str__(self) -> str:
        return "cache-only"

    def kind(self) -> str:
        return "cache-only"

    def is_always_max_size(self) -> bool:
        return False

    def answer_nameserver(self) -> str:
        return "cache-only"

    def answer_port(self) -> int:
        return 0

    def query(self, request, timeout, source, source_port, max_size, one_rr_per_rrset=False, ignore_trailing=False):
        raise _Unasked("not in the cache")


def parse_resolver_address(text: str) -> tuple[str, int]:
    """C{HOST[:PORT]} (an IPv6 address in brackets when a port follows) as (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError("no host")
    try:
        number = int(port) if port else 53
    except ValueError:
        raise ValueError("the port is not a number") from None
    if not 0 < number < 65536:
        raise ValueError("the port must be 1 to 65535")
    return host, number


# A lookup that had at least this long (or half the budget) and got no answer
# marks its name dead; a shorter one only says the budget was nearly spent.
DEAD_AFTER_SECONDS = 1.0
DEAD_FOR_SECONDS = 60.0
DEAD_NAMES_MAX = 10_000


class DeadNames:
    """
    Names whose DNS server did not answer within a lookup's time, each kept
    for C{ttl} seconds, at most C{size} (the oldest forgotten first). A name
    under a dead one is dead too: its records are served by the same servers
    or delegated by them. Shared by the threads of a checking process.
    """

    def __init__(self, ttl: float = DEAD_FOR_SECONDS, size: int = DEAD_NAMES_MAX):
        self._ttl = ttl
        self._size = size
        self._until: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, name: str, now: float) -> None:
        key = name.lower().rstrip(".")
        with self._lock:
            self._until.pop(key, None)
            self._until[key] = now + self._ttl
            while len(self._until) > self._size:
                self._until.popitem(last=False)

    def covering(self, name: str, now: float) -> str | None:
        """The dead name C{name} is, or is under; None when there is none."""
        labels = name.lower().rstrip(".").split(".")
        with self._lock:
            for start in range(len(labels)):
                key = ".".join(labels[start:])
                until = self._until.get(key)
                if until is not None and until <= now:
                    del self._until[key]
                elif until is not None:
                    return key
        return None


_resolvers: dict[tuple, dns.resolver.Resolver] = {}
_cache_only: dict[tuple, dns.resolver.Resolver] = {}
# Per server, like the answers: another server may well answer.
_dead_names: dict[tuple, DeadNames] = {}


def _resolver(address: tuple[str, int] | None) -> dns.resolver.Resolver:
    """One dnspython resolver (and its cache) per server, kept for the life of the process."""
    if address not in _resolvers:
        if address is None:
            resolver = dns.resolver.Resolver()
        else:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [address[0]]
            resolver.port = address[1]
        resolver.cache = dns.resolver.LRUCache(4096)
        _resolvers[address] = resolver
    return _resolvers[address]


def _cache_only_resolver(address: tuple[str, int] | None) -> dns.resolver.Resolver:
    """A resolver reading the cache of C{address}'s, asking no server (dnspython's own cache rules, NXDOMAIN too)."""
    if address not in _cache_only:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [_CacheOnly()]
        resolver.cache = _resolver(address).cache
        _cache_only[address] = resolver
    return _cache_only[address]


class BudgetResolver:
    """
    Lookups against C{address} (None: /etc/resolv.conf) until C{budget}
    seconds have passed; with C{cached_only}, from the cache alone: a lookup
    it lacks is C{temperror} for the check and sets C{missed}, and the
    check's result must not be used (L{NotCached}).
    """

    def __init__(
        self,
        address: tuple[str, int] | None,
        budget: float = DEFAULT_BUDGET_SECONDS,
        clock=time.monotonic,
        dead: DeadNames | None = None,
        cached_only: bool = False,
    ):
        self._resolver = _cache_only_resolver(address) if cached_only else _resolver(address)
        self.cached_only = cached_only
        self.missed = False
        self._clock = clock
        self._dead = _dead_names.setdefault(address, DeadNames()) if dead is None else dead
        self._dead_after = min(budget / 2, DEAD_AFTER_SECONDS)
        self.deadline = clock() + budget

    def remaining(self) -> float:
        return self.deadline - self._clock()

    def query(self, name: str, rdtype: str) -> list:
        """The answer's records; [] for NXDOMAIN or no records of that type."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DnsTemporaryError("DNS time budget exhausted")
        dead = self._dead.covering(name, self._clock())
        if dead is not None:
            raise DnsTemporaryError(f"DNS timeout for {dead} within the last {DEAD_FOR_SECONDS:g} s")
        try:
            answer = self._resolver.resolve(
                name, rdtype, lifetime=remaining, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers:
            if self.cached_only:
                self.missed = True
                raise DnsTemporaryError(f"{name} is not in the DNS cache") from None
            raise DnsTemporaryError(f"DNS server failure for {name}") from None
        except dns.exception.Timeout:
            if remaining >= self._dead_after:
                self._dead.add(name, self._clock())
            raise DnsTemporaryError(f"DNS timeout for {name}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return []  # a name nobody can publish at: nothing is published there
        except dns.exception.DNSException as e:
            raise DnsTemporaryError(f"DNS error for {name}: {type(e).__name__}") from None
        return list(answer.rrset or ())

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined, as RFC 7208 and 6376 read them."""
        records = [b"".join(record.strings) for record in self.query(name, "TXT")]
        if sum(len(record) for record in records) > MAX_TXT_BYTES:
            raise DnsRecordTooLarge(f"TXT records at {name} larger than {MAX_TXT_BYTES} bytes")
        return records
