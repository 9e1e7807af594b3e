"""
C{mailingest org domain ...}: an organisation's own domains (issue 27).

C{add} prints the DNS records the domain's owner publishes; C{verify} looks
them up at once, as the daemon does periodically, with the daemon's
C{--hostname}, C{--mx-host}, C{--dns-resolver} and C{--dns-budget} (its
options here, else the same environment and file as the daemon's).
"""

import argparse
import os
from collections.abc import Callable

from mailingest.app.settings import Settings
from mailingest.delivery.domains import BadDomain, domain_key, local_parts_of, new_token, shown_domain
from mailingest.delivery.routing import normalise_domain
from mailingest.errors import MailingestError, NoSuchDomain

DOMAIN_TABLE = ("domain", "shown", "org_slug", "status", "local_parts", "checked_at", "last_error")
_VERIFY_OPTIONS = ("hostname", "mx_host", "dns_resolver", "dns_budget", "domain_grace")


class DomainCommandError(MailingestError):
    """A domain command that cannot be done, phrased for the operator."""


def _key(text: str) -> str:
    try:
        return domain_key(text)
    except BadDomain as e:
        raise DomainCommandError(f"{text!r}: {e}") from None


def _daemon(args: argparse.Namespace) -> Settings:
    given = {key: getattr(args, key, None) for key in _VERIFY_OPTIONS}
    return Settings.settle(given, os.environ, args.config)


async def cmd_domain_add(session, args: argparse.Namespace) -> None:
    # Here, not at the top: the admin command's parser loads this module, and --help must start fast (issue 28).
    from mailingest.verification.domain_proof import FORWARD_RECORD, dns_records, txt_name

    key = _key(args.domain)
    daemon = _daemon(args)
    if key in {normalise_domain(d) for d in (*daemon.domain, daemon.hostname)}:
        raise DomainCommandError(f"{key} is one of the daemon's own --domain/--hostname names: its mail is LOCAL+SLUG@{key}")
    try:
        parts = local_parts_of(args.local_part)
    except BadDomain as e:
        raise DomainCommandError(f"--local-part: {e}") from None
    row = await session.store.add_domain(args.slug, key, new_token(), parts)
    shown = shown_domain(key)
    print(f"added domain {key}{f' ({shown})' if shown != key else ''} to {row['org_slug']}: pending")
    print(f"token: {row['token']}")
    print("publish these DNS records, then run: mailingest org domain verify " + key)
    for record in dns_records(key, row["token"], daemon.hostname):
        print("  " + record)
    print(f'  (mail forwarded to us instead of an MX: {txt_name(key)}. 3600 IN TXT "{FORWARD_RECORD.decode()}")')


async def cmd_domain_list(session, args: argparse.Namespace) -> None:
    from mailingest.app.cli_output import table, to_json

    await session.require_org(args.slug)
    rows = await session.store.list_domains(args.slug)
    for row in rows:
        row["shown"] = shown_domain(row["domain"])
        row.pop("token")
    if args.json:
        print(to_json(rows))
    else:
        print(table([dict(row, local_parts=",".join(row["local_parts"]) or "*") for row in rows], DOMAIN_TABLE))


async def cmd_domain_remove(session, args: argparse.Namespace) -> None:
    key = _key(args.domain)
    await session.store.remove_domain(key)
    print(f"removed domain {key}: its mail is refused from now on")


async def cmd_domain_verify(session, args: argparse.Namespace) -> None:
    key = _key(args.domain)
    row = await session.store.get_domain(key)
    if row is None:
        raise NoSuchDomain(f"no organisation has the domain {key}")
    from twisted.internet import reactor

    from mailingest.verification.domain_checker import DomainChecker
    from mailingest.verification.domain_proof import mail_targets

    daemon = _daemon(args)
    checker = DomainChecker(
        session.store, mail_targets(daemon.hostname, daemon.mx_host), daemon.dns_resolver, daemon.dns_budget, reactor,
        grace=daemon.domain_grace,
    )
    updated = await checker.check(row)
    print(f"{key} of {updated['org_slug']}: {updated['status']}" + (f" ({updated['last_error']})" if updated["last_error"] else ""))
    if updated["status"] != "verified":
        raise DomainCommandError(f"{key} is not verified: publish the records `org domain add` printed")


def add_domain_commands(org, command: Callable) -> None:
    """The C{org domain} group under C{org}; C{command} makes one command's parser (the admin command's own)."""
    parser = org.add_parser("domain", help="an organisation's own domains", description="an organisation's own domains")
    domain = parser.add_subparsers(dest="domain_command", metavar="COMMAND", required=True)
    add = command(domain, "add", "give an organisation a domain (pending until DNS proves it); prints the records to publish", cmd_domain_add)
    add.add_argument("slug", metavar="SLUG")
    add.add_argument("domain", metavar="DOMAIN", help="the domain, in U-label or A-label (xn--) form")
    add.add_argument("--local-part", action="append", metavar="NAME", help="accept only this local part (repeatable) [default: any]")
    listing = command(domain, "list", "list domains and their verification state", cmd_domain_list)
    listing.add_argument("slug", nargs="?", metavar="SLUG", help="only this organisation's")
    listing.add_argument("--json", action="store_true", help="print JSON")
    remove = command(domain, "remove", "remove a domain: its mail is refused from then on", cmd_domain_remove)
    remove.add_argument("domain", metavar="DOMAIN")
    verify = command(domain, "verify", "look the domain's TXT and MX records up now", cmd_domain_verify)
    verify.add_argument("domain", metavar="DOMAIN")
    for sub in (add, verify):
        sub.add_argument("--hostname", metavar="NAME", help="the daemon's --hostname [default: its environment or --config file]")
        sub.add_argument("--mx-host", action="append", metavar="NAME", help="the daemon's --mx-host (repeatable)")
        sub.add_argument("--dns-resolver", metavar="HOST[:PORT]", help="the daemon's --dns-resolver")
        sub.add_argument("--dns-budget", metavar="SECONDS", help="the daemon's --dns-budget")
        sub.add_argument("--domain-grace", metavar="SECONDS", help="the daemon's --domain-grace")
