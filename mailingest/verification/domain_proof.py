"""
What DNS says about a custom domain (issue 27), and what that makes of it.

The owner of C{acme-corp.example} proves it wants the domain's mail here with
two records: a TXT record at C{_mailingest.acme-corp.example} holding
C{mailingest-verification=<token>} (the token C{org domain add} printed),
and an MX record naming one of our hosts (C{--hostname} or an C{--mx-host}).
A domain whose mail is forwarded to us by its own provider (its MX stays with
the provider) publishes C{mailingest-route=forward} at the same name instead
of the MX. Lookups go through the sender checks' resolver
(L{mailingest.verification.resolver}): C{--dns-resolver} and one
C{--dns-budget} for the whole check, run in a thread.

L{next_state} is the state machine, free of I/O so that it is tested on a
clock: pending until both records prove the domain; verified while the TXT
record stays; a verified domain whose TXT record is missing (an answer, not a
DNS failure) is suspended once it has been missing for the grace period;
a suspended domain is verified again by the same proof as a pending one.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from mailingest.verification.resolver import BudgetResolver, DnsRecordTooLarge, DnsTemporaryError

TXT_PREFIX = "_mailingest."
TOKEN_PREFIX = "mailingest-verification="
FORWARD_RECORD = b"mailingest-route=forward"
PENDING_RECHECK_SECONDS = 300.0
VERIFIED_RECHECK_SECONDS = 86400.0
DEFAULT_GRACE_SECONDS = 259200.0


@dataclass(frozen=True)
class Evidence:
    """
    One check's answers: C{txt} whether the token is published, C{mx} whether
    mail is routed to us (an MX, or the forwarding record), None for each when
    DNS did not answer (C{error} says why).
    """

    txt: bool | None
    mx: bool | None
    error: str | None = None


@dataclass(frozen=True)
class State:
    status: str
    next_check_at: datetime
    error: str | None
    txt_missing_since: datetime | None


def txt_name(domain: str) -> str:
    return TXT_PREFIX + domain


def token_record(token: str) -> str:
    return TOKEN_PREFIX + token


def dns_records(domain: str, token: str, hostname: str) -> list[str]:
    """The records the owner of C{domain} publishes, in zone file form."""
    return [
        f'{txt_name(domain)}. 3600 IN TXT "{token_record(token)}"',
        f"{domain}. 3600 IN MX 10 {hostname.rstrip('.')}.",
    ]


def look_up(domain: str, token: str, targets: frozenset[str], resolver: tuple[str, int] | None, budget: float) -> Evidence:
    """Blocking (run it in a thread): the TXT and MX answers for C{domain} within C{budget} seconds."""
    lookups = BudgetResolver(resolver, budget)
    try:
        records = lookups.txt(txt_name(domain))
    except (DnsTemporaryError, DnsRecordTooLarge) as e:
        return Evidence(None, None, str(e))
    txt = token_record(token).encode("ascii") in records
    if FORWARD_RECORD in records:
        return Evidence(txt, True, None if txt else f"no {token_record(token)} TXT record at {txt_name(domain)}")
    try:
        exchanges = {str(record.exchange).rstrip(".").lower() for record in lookups.query(domain, "MX")}
    except DnsTemporaryError as e:
        return Evidence(txt, None, str(e))
    mx = bool(exchanges & targets)
    problems = []
    if not txt:
        problems.append(f"no {token_record(token)} TXT record at {txt_name(domain)}")
    if not mx:
        shown = ", ".join(sorted(exchanges)) or "none"
        problems.append(f"MX ({shown}) names none of {', '.join(sorted(targets))}")
    return Evidence(txt, mx, "; ".join(problems) or None)


def mail_targets(hostname: str, mx_hosts) -> frozenset[str]:
    """The host names an MX record may name: C{--hostname} and every C{--mx-host}, compared lower case without a trailing dot."""
    return frozenset(name.rstrip(".").lower() for name in (hostname, *mx_hosts) if name)


def next_state(status: str, missing_since: datetime | None, evidence: Evidence, now: datetime, grace: float) -> State:
    """What a check with C{evidence} at C{now} makes of a domain in C{status}."""
    pending_again = now + timedelta(seconds=PENDING_RECHECK_SECONDS)
    if evidence.txt is None or (status != "verified" and evidence.mx is None):
        # DNS did not answer: nothing is decided, ask again soon.
        return State(status, pending_again, evidence.error, missing_since)
    if status != "verified":
        if evidence.txt and evidence.mx:
            return State("verified", now + timedelta(seconds=VERIFIED_RECHECK_SECONDS), None, None)
        return State(status, pending_again, evidence.error, missing_since)
    if evidence.txt:
        return State("verified", now + timedelta(seconds=VERIFIED_RECHECK_SECONDS), None if evidence.mx is not False else evidence.error, None)
    since = missing_since or now
    if now - since >= timedelta(seconds=grace):
        return State("suspended", pending_again, f"TXT record missing since {since.isoformat()}", since)
    # In the grace period: look again often enough to see it come back, or its end.
    recheck = min(PENDING_RECHECK_SECONDS * 12, grace / 4)
    return State("verified", min(now + timedelta(seconds=recheck), since + timedelta(seconds=grace)), evidence.error, since)
