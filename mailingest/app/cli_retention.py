"""
The admin command's retention commands (README, "Retention and erasure"):
C{org retention}, C{hold add|remove|list}, C{erase} and C{audit list}.
What they do is the store's (L{mailingest.interfaces.IRetentionStore},
L{mailingest.interfaces.IHoldStore}); an erasure deletes its blobs at once
(L{mailingest.storage.retention.purge}), and whatever it could not delete
is left queued for the daemon's next retention pass.
"""

import argparse
import getpass
import re
from collections.abc import Callable
from typing import Any

from mailingest.errors import MailingestError

# A period: a number and its unit, or keep (forever).
_PERIOD = re.compile(r"^([0-9]{1,6})([smhdwy])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
HOLD_TABLE = ("id", "org_slug", "scope", "inbound_message_id", "sender", "reason", "created_by", "created_at", "removed_at")
AUDIT_TABLE = ("id", "at", "actor", "action", "org_slug", "inbound_message_id", "document_id", "hold_id", "reason", "sha256")


class RetentionCommandError(MailingestError):
    """A retention command that did not do all it was asked (its one line on stderr, exit 1)."""


def period(text: str) -> int | None:
    """Seconds of C{90d}, C{10y}, C{12h}...; None for C{keep}. A year is 365 days."""
    text = text.strip().lower()
    if text == "keep":
        return None
    found = _PERIOD.match(text)
    if not found or int(found.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"invalid period {text!r}: a number and s, m, h, d, w or y (90d, 10y), or keep")
    return int(found.group(1)) * _UNITS[found.group(2)]


def describe_period(seconds: int | None) -> str:
    if seconds is None:
        return "keep"
    for unit in "ywdhms":
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def actor() -> str:
    """Who runs the command, for the audit trail."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _print_rows(rows: list[dict], columns: tuple[str, ...], as_json: bool) -> None:
    from mailingest.app.cli_output import table, to_json

    print(to_json(rows) if as_json else table(rows, columns))


async def cmd_org_retention(session, args: argparse.Namespace) -> None:
    given = {name: getattr(args, name) for name in ("raw", "documents") if getattr(args, name) is not ...}
    row = await session.store.set_retention(args.slug, **given)
    print(
        f"retention of {row['slug']}: raw {describe_period(row['retention_raw_seconds'])},"
        f" documents {describe_period(row['retention_documents_seconds'])}"
    )


async def cmd_hold_add(session, args: argparse.Namespace) -> None:
    hold = await session.store.add_hold(args.org, args.reason, actor(), message_id=args.message, sender=args.sender)
    what = {"message": f"message {hold['inbound_message_id']}", "sender": f"messages from {hold['sender']}"}.get(
        hold["scope"], "every message"
    )
    print(f"added legal hold {hold['id']} on {what} of {hold['org_slug']}")


async def cmd_hold_remove(session, args: argparse.Namespace) -> None:
    hold = await session.store.remove_hold(args.id, actor())
    print(f"removed legal hold {hold['id']} of {hold['org_slug']}")


async def cmd_hold_list(session, args: argparse.Namespace) -> None:
    await session.require_org(args.org)
    rows = await session.store.list_holds(org_slug=args.org, include_removed=args.all)
    _print_rows(rows, HOLD_TABLE, args.json)


async def erase(session, message_id: int | None, sender: str | None, org: str | None) -> tuple[list[dict], list[dict]]:
    """Erase one message or a sender's messages of an organisation, batch by batch, deleting the blobs of each."""
    from mailingest.storage.retention import delete_now, erase_message  # Twisted: only for the commands that need it

    if message_id is not None:
        gone, refused = [await erase_message(session.store, session.blobs, message_id, actor())], []
    else:
        gone = []
        while True:
            batch, refused = await session.store.erase_sender(org, sender, actor())
            await delete_now(session.store, session.blobs, batch)
            gone += batch
            if not batch:
                break
    # The search index's file forgets their text now, whether a daemon runs or not.
    await session.store.index_search()
    return gone, refused


async def cmd_erase(session, args: argparse.Namespace) -> None:
    gone, refused = await erase(session, args.message, args.sender, args.org)
    if args.message is not None:
        print(f"erased message {args.message}: raw copy and documents deleted ({gone[0]['bytes']} bytes), tombstone kept")
        return
    print(f"erased {len(gone)} message(s) from {args.sender.lower()} of {args.org.lower()}: {', '.join(str(row['id']) for row in gone) or 'none'}")
    if refused:
        for row in refused:
            print(f"not erased: {row['reason']}")
        raise RetentionCommandError(f"{len(refused)} message(s) from {args.sender.lower()} were not erased (see above)")


async def cmd_audit_list(session, args: argparse.Namespace) -> None:
    org_id = None
    if args.org is not None:
        await session.require_org(args.org)
        org_id = (await session.store.get_org(args.org))["id"]
    rows = await session.store.list_audit(org_id=org_id, message_id=args.message, limit=args.limit)
    _print_rows(rows, AUDIT_TABLE, args.json)


def add_commands(commands, org, command: Callable[..., Any], group: Callable[..., Any], positive_int) -> None:
    """The retention commands on the admin command's parser (C{command} and C{group} are its helpers)."""
    retention = command(org, "retention", "show or set how long an organisation's raw messages and documents are kept", cmd_org_retention)
    retention.add_argument("slug", metavar="SLUG")
    for name, what in (("raw", "raw messages"), ("documents", "documents")):
        retention.add_argument(
            f"--{name}", type=period, default=..., metavar="PERIOD",
            help=f"how long {what} are kept after they arrived: 90d, 10y, 12h... or keep (forever, the default)",
        )

    holds = group(commands, "hold", "legal holds: what retention and erasure never delete")
    add = command(holds, "add", "hold a message, a sender's messages or a whole organisation", cmd_hold_add)
    add.add_argument("--org", required=True, metavar="SLUG")
    which = add.add_mutually_exclusive_group(required=True)
    which.add_argument("--message", type=int, metavar="ID", help="this message")
    which.add_argument("--sender", metavar="ADDRESS", help="every message from this envelope sender")
    which.add_argument("--all", action="store_true", help="every message of the organisation")
    add.add_argument("--reason", required=True, metavar="TEXT", help="why (the case, the request), for the audit trail")
    remove = command(holds, "remove", "end a legal hold", cmd_hold_remove)
    remove.add_argument("id", type=int, metavar="ID")
    listing = command(holds, "list", "legal holds in force", cmd_hold_list)
    listing.add_argument("--org", metavar="SLUG")
    listing.add_argument("--all", action="store_true", help="removed holds too")
    listing.add_argument("--json", action="store_true", help="print JSON")

    erasing = command(commands, "erase", "erase a message, or every message of a sender to an organisation (GDPR art. 17)", cmd_erase)
    target = erasing.add_mutually_exclusive_group(required=True)
    target.add_argument("--message", type=int, metavar="ID")
    target.add_argument("--sender", metavar="ADDRESS", help="with --org: every message from this envelope sender")
    erasing.add_argument("--org", metavar="SLUG", help="the organisation, with --sender")

    audit = group(commands, "audit", "the audit trail of incinerations, erasures and holds")
    listing = command(audit, "list", "audit rows, newest first", cmd_audit_list)
    listing.add_argument("--org", metavar="SLUG")
    listing.add_argument("--message", type=int, metavar="ID")
    listing.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N [default: 50]")
    listing.add_argument("--json", action="store_true", help="print JSON")
