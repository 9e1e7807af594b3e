"""
The admin command, C{mailingest}: schema, organisations, messages, documents,
reprocessing and test mail (README, "Admin command").

It reads the same C{--config}, C{--database} and C{--storage} settings as the
daemon, by the same precedence, and runs each command in one reactor run.
Every failure an operator can cause or fix ends in one line on stderr and exit
status 1; only a bug in mailingest shows a traceback.

This module is what every invocation loads: the parser, output and errors.
The commands themselves are in L{mailingest.app.commands}, imported once the
arguments are parsed, and each imports what only it needs, so C{--help} and
a simple listing start fast (issue 28).
"""

import argparse
import json
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from mailingest import __version__
from mailingest.app.options import DAEMON_OPTIONS, STORAGE_OPTIONS, positive_float, positive_int
from mailingest.errors import MailingestError
from mailingest.ops.secrets import masker, redact_url, url_passwords
from mailingest.storage.statuses import EVENT_STATUSES, MESSAGE_STATUSES
from mailingest.verification.requirements import REQUIREMENTS

if TYPE_CHECKING:
    from mailingest.app.settings import StorageSettings

PROG = "mailingest"
STATUSES = MESSAGE_STATUSES

ORG_TABLE = ("slug", "name", "active", "created_at", "reserved")
MESSAGE_TABLE = ("id", "org_slug", "status", "received_at", "mail_from", "subject")
MESSAGE_FIELDS = (
    "id", "org_slug", "source", "source_message_id", "mail_from", "rcpt_to", "subject",
    "raw_key", "raw_size", "raw_sha256", "status", "attempts", "last_error",
    "received_at", "parsed_at", "content_sha256",
)
SENDER_FIELDS = (
    "client_ip", "helo", "tls", "spf", "spf_domain", "dkim", "dkim_domain", "dmarc", "dmarc_domain",
    "dmarc_policy", "arc", "arc_domain", "authentication_results", "quarantine_reason", "released_at",
)
QUARANTINE_TABLE = (*MESSAGE_TABLE, "quarantine_reason")
SHOWN_HEADERS = ("From", "To", "Date", "Subject", "Message-ID")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DOCUMENT_TABLE = ("id", "org_slug", "inbound_message_id", "filename", "content_type", "size", "created_at")
MESSAGE_DOCUMENT_TABLE = ("id", "filename", "content_type", "size", "sha256")
EVENT_TABLE = ("id", "event_id", "org_slug", "event_type", "inbound_message_id", "status", "attempts", "last_status", "next_attempt_at", "last_error")
CELL_WIDTH = 64
# The daemon's options of its webhook target policy, which `org webhook` checks a URL against.
_WEBHOOK_POLICY_KEYS = ("webhook_allow_http", "webhook_allow_private")


class CommandError(MailingestError):
    """A request the store cannot satisfy, phrased for the operator."""


# output


def _timestamp(value: Any, short: bool) -> str:
    """The same ISO 8601 whether the database gave a datetime (PostgreSQL) or text (SQLite)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not short:
        return value.isoformat()
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _cell(column: str, value: Any, short: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column.endswith("_at"):
        text = _timestamp(value, short)
    else:
        text = str(value)
    text = "".join(c if c.isprintable() else " " for c in text)
    if short and len(text) > CELL_WIDTH:
        text = text[: CELL_WIDTH - 3] + "..."
    return text


def table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """Aligned columns headed by the column names, for people reading a terminal."""
    cells = [list(columns)] + [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
        for line in cells
    )


def _json_value(value: Any, column: str = "") -> Any:
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v, k) for k, v in value.items()}
    if isinstance(value, (datetime, date)) or (column.endswith("_at") and value is not None):
        return _timestamp(value, short=False)
    return value


def to_json(value: Any) -> str:
    """JSON keyed by the column names of README's Data section, timestamps as ISO 8601 strings."""
    return json.dumps(_json_value(value), indent=2, ensure_ascii=False)


# errors


def _one_line(text: str, secrets: Iterable[str] = ()) -> str:
    text = masker(secrets)(text)
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _database_errors() -> tuple[type[BaseException], ...]:
    """Errors of the database drivers loaded so far: an unloaded driver raises nothing."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is not None:
        errors.append(psycopg2.Error)
    return tuple(errors)


def _describe_os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


def _user_message(error: BaseException, settings: "StorageSettings") -> str | None:
    """The one line for an error the operator can act on, None for a bug."""
    if isinstance(error, MailingestError):
        return str(error)
    if isinstance(error, _database_errors()):
        return f"database {redact_url(settings.database)}: {error}"
    if isinstance(error, OSError):
        return _describe_os_error(error)
    return None


def _fail(message: str, secrets: Iterable[str] = ()) -> int:
    print(f"{PROG}: {_one_line(message, secrets) or 'failed'}", file=sys.stderr)
    return 1


def _secrets(settings: "StorageSettings") -> list[str]:
    return list(url_passwords(settings.database or ""))


# the parser


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option parser of the daemon's as an argparse type: its reason, then the text given."""

    def argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}: {text!r}") from None

    return argument


_positive_int = _argument(positive_int)
_positive_float = _argument(positive_float)


def _group(subparsers, name: str, help: str):
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=name + "_command", metavar="COMMAND", required=True)


def _global_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """
    C{--config} and the storage options: before the command, and after it too
    (where a value is kept only when given, so it never hides one given before).
    """
    suppress = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--config", metavar="FILE", help="INI file with a [mailingest] section", **suppress)
    for option in STORAGE_OPTIONS:
        shown = "" if option.default is None or "[default" in option.help else f" [default: {option.default}]"
        parser.add_argument("--" + option.name, metavar=option.metavar, help=option.help + shown, **suppress)


_AFTER_COMMAND = argparse.ArgumentParser(add_help=False)
_global_options(_AFTER_COMMAND, after_command=True)


def _command(subparsers, name: str, help: str, handler: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help, parents=[_AFTER_COMMAND])
    parser.set_defaults(handler=handler)
    return parser


def _listing(subparsers, help: str, handler: str, statuses: Sequence[str], what: str) -> None:
    listing = _command(subparsers, "list", help, handler)
    listing.add_argument("--org", metavar="SLUG", help="only this organisation's")
    listing.add_argument("--status", choices=statuses, help=f"only {what} in this status")
    listing.add_argument("--limit", type=_positive_int, default=50, metavar="N", help="at most N [default: 50]")
    listing.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer mailingest: schema, organisations, messages, documents, test mail.",
        epilog=(
            "Global options go before or after the command. Each can also be set as MAILINGEST_<OPTION>"
            " in the environment or in the [mailingest] section of the --config file"
            " (MAILINGEST_CONFIG also names it); the command line wins, then the environment,"
            " then the file."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _command(commands, "migrate", "create or upgrade the database schema", "cmd_migrate")

    org = _group(commands, "org", "manage organisations")
    add = _command(org, "add", "create an active organisation", "cmd_org_add")
    add.add_argument("slug", metavar="SLUG", help="the +SLUG of its addresses")
    add.add_argument("--name", default="", help="display name")
    listing = _command(org, "list", "list organisations", "cmd_org_list")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for name, handler, verb in (("disable", "cmd_org_disable", "refuse"), ("enable", "cmd_org_enable", "accept")):
        toggle = _command(org, name, f"{name} an organisation: {verb} its mail", handler)
        toggle.add_argument("slug", metavar="SLUG")

    policy = _command(org, "policy", "show or set which senders an organisation takes orders from", "cmd_org_policy")
    policy.add_argument("slug", metavar="SLUG")
    policy.add_argument(
        "--allow-domain", action="append", metavar="DOMAIN",
        help="accept From: this domain and its subdomains (repeatable; replaces the list)",
    )
    policy.add_argument("--any-domain", action="store_true", help="accept any From: domain again")
    policy.add_argument(
        "--require", choices=REQUIREMENTS,
        help="the check that must pass: dmarc, dkim or spf (aligned with From:), or none",
    )
    webhook = _command(org, "webhook", "set (or --remove) the URL an organisation's events are POSTed to", "cmd_org_webhook")
    webhook.add_argument("slug", metavar="SLUG")
    webhook.add_argument("--url", metavar="URL", help="https:// URL of the application's receiver")
    webhook.add_argument("--secret-file", metavar="FILE", help="whsec_ signing secret to use [default: a new one, printed once]")
    webhook.add_argument("--remove", action="store_true", help="stop sending this organisation's events")
    for option in DAEMON_OPTIONS:
        if option.key in _WEBHOOK_POLICY_KEYS:
            webhook.add_argument(
                "--" + option.name, action="store_true", default=None,
                help=f"{option.help}, as the daemon's --{option.name} [default: {option.env} or the --config file]",
            )
    token = _command(org, "token", "create (printed once) or revoke an organisation's API tokens", "cmd_org_token")
    token.add_argument("slug", metavar="SLUG")
    token.add_argument("--create", action="store_true", help="create a token")
    token.add_argument("--revoke", action="store_true", help="revoke all the organisation's tokens")

    events = _group(commands, "events", "inspect and redeliver webhook events")
    _listing(events, "list webhook events, newest first", "cmd_events_list", EVENT_STATUSES, "events")
    redeliver = _command(events, "redeliver", "send an event again now, with a fresh retry horizon", "cmd_events_redeliver")
    redeliver.add_argument("id", type=int, metavar="ID")

    messages = _group(commands, "messages", "inspect inbound messages")
    _listing(messages, "list messages, newest first", "cmd_messages_list", STATUSES, "messages")
    show = _command(messages, "show", "one message: headers, status, error, documents", "cmd_messages_show")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    raw = _command(messages, "raw", "write the stored raw MIME to stdout", "cmd_messages_raw")
    raw.add_argument("id", type=int, metavar="ID")

    documents = _group(commands, "documents", "inspect and download extracted documents")
    listing = _command(documents, "list", "list documents, newest first", "cmd_documents_list")
    listing.add_argument("--org", metavar="SLUG", help="only this organisation's")
    listing.add_argument("--message", type=int, metavar="ID", help="only this message's, in message order")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = _command(documents, "show", "one document: names, types, how it was attached", "cmd_documents_show")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    get = _command(documents, "get", "download a document", "cmd_documents_get")
    get.add_argument("id", type=int, metavar="ID")
    get.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it; - for stdout")

    reprocess = _command(commands, "reprocess", "queue messages for extraction again", "cmd_reprocess")
    reprocess.add_argument("id", type=int, nargs="?", metavar="ID", help="this message")
    reprocess.add_argument("--failed", action="store_true", help="every failed message")
    reprocess.add_argument("--org", metavar="SLUG", help="with --failed: only this organisation's")

    release = _command(commands, "release", "extract a quarantined message, past its organisation's sender policy", "cmd_release")
    release.add_argument("id", type=int, metavar="ID")

    send = _command(commands, "send-test", "send test mail over SMTP (no database needed)", "cmd_send_test")
    send.add_argument("--to", action="append", required=True, metavar="ADDR", help="recipient (repeatable)")
    send.add_argument(
        "--server", metavar="HOST:PORT",
        help="SMTP server [default: the daemon's SMTP endpoint on this machine: --smtp, else MAILINGEST_SMTP, else the --config file, else tcp:2525]",
    )
    send.add_argument(
        "--smtp", action="append", default=[], metavar="ENDPOINT",
        help="the daemon's --smtp endpoint (e.g. tcp:25): send to it on this machine",
    )
    send.add_argument(
        "--from", dest="sender", metavar="ADDR",
        help="envelope and header sender [default: mailingest-test@localhost]",
    )
    send.add_argument("--subject", metavar="TEXT", help="[default: mailingest test message]")
    send.add_argument(
        "--attach", action="extend", nargs="+", default=[], metavar="FILE",
        help="attach these files (repeatable)",
    )
    send.add_argument("--count", type=_positive_int, default=1, metavar="N", help="send N messages [default: 1]")
    send.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help="SMTP timeout [default: 30]"
    )

    admin_token = _command(
        commands, "admin-token", "write a new API admin token to a file, mode 0600 (no database needed)", "cmd_admin_token"
    )
    admin_token.add_argument("--write", required=True, metavar="FILE", help="the file, for --api-admin-token-file")
    admin_token.add_argument("--force", action="store_true", help="replace FILE if it exists")

    gc = _command(
        commands, "gc",
        "delete blobs no row references (left by failed or interrupted deliveries): every blob stored"
        " (progress on stderr), or with --recent only those the daemon's intent journal names",
        "cmd_gc",
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument(
        "--recent", action="store_true",
        help="the daemon's routine sweep: only the blobs put since its last one (its intent journal, under the scratch directory)",
    )
    gc.add_argument(
        "--min-age", type=_positive_float, metavar="SECONDS",
        help="only blobs older than this [default: the gc-min-age option, 86400]",
    )
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "org" and getattr(args, "any_domain", False) and args.allow_domain:
        parser.error("org policy: --allow-domain or --any-domain, not both")
    if args.command == "org" and args.org_command == "webhook" and args.remove == bool(args.url):
        parser.error("org webhook: give --url or --remove")
    if args.command == "org" and args.org_command == "token" and args.create == args.revoke:
        parser.error("org token: give --create or --revoke")
    if args.command == "reprocess":
        if args.id is None and not args.failed:
            parser.error("reprocess: give a message ID or --failed")
        if args.id is not None and args.failed:
            parser.error("reprocess: give a message ID or --failed, not both")
        if args.org is not None and not args.failed:
            parser.error("reprocess: --org goes with --failed")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, settle the storage options, run one command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    from mailingest.app import commands

    return commands.run(args)


def _quiet_broken_pipe() -> int:
    """The reader of our stdout went away (C{| head}): nothing left to say to it."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
