"""
The admin command, C{mailingest}: schema, organisations, messages, documents,
reprocessing and test mail (README, "Admin command").

It reads the same C{--config}, C{--database} and C{--storage} settings as the
daemon, by the same precedence, and runs each command in one reactor run.
Every failure an operator can cause or fix ends in one line on stderr and exit
status 1; only a bug in mailingest shows a traceback.
"""

import argparse
import contextlib
import hashlib
import os
import pwd
import re
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from mailingest import __version__
from mailingest.app import cli_retention
from mailingest.app.cli_domains import add_domain_commands
from mailingest.app.cli_output import cell, table, to_json
from mailingest.app.options import DAEMON_OPTIONS, STORAGE_OPTIONS, positive_float, positive_int, resolve
from mailingest.app.settings import Settings, StorageSettings
from mailingest.app.user_errors import describe_os_error, one_line, user_message
from mailingest.errors import BlobNotFound, ContentGone, MailingestError, NoSuchMessage, NoSuchOrg
from mailingest.delivery.routing import POSTMASTER_SLUG, valid_slug
from mailingest.ops.secrets import redact_url, url_passwords
from mailingest.storage.statuses import EVENT_STATUSES
from mailingest.storage.urls import sqlite_path, url_scheme
from mailingest.scanning.content_policy import ON_VIRUS, UNSCANNED, ContentPolicy
from mailingest.scanning.release import allow_infected
from mailingest.verification.requirements import REQUIREMENTS

# Twisted, the store, the console and the API are imported inside the
# functions that use them: --help and a simple listing start fast (issue 28).
if TYPE_CHECKING:
    from mailingest.interfaces import (
        BlobInfo, IExtractionQueue, IIntakeStore, IOrgStore, IOutboxStore, IQuarantineStore, IReadStore, ISchemaStore,
    )

PROG = "mailingest"
STATUSES = ("received", "parsed", "failed", "quarantined", "incinerated")

ORG_TABLE = ("slug", "name", "active", "created_at", "reserved")
MESSAGE_TABLE = ("id", "org_slug", "status", "received_at", "mail_from", "subject")
MESSAGE_FIELDS = (
    "id", "org_slug", "source", "source_message_id", "mail_from", "rcpt_to", "subject",
    "raw_key", "raw_size", "raw_sha256", "status", "attempts", "last_error",
    "received_at", "parsed_at", "content_sha256",
)
TOMBSTONE_FIELDS = ("incinerated_at", "incinerated_reason")
SENDER_FIELDS = (
    "client_ip", "helo", "tls", "spf", "spf_domain", "dkim", "dkim_domain", "dmarc", "dmarc_domain",
    "dmarc_policy", "arc", "arc_domain", "authentication_results", "quarantine_reason", "released_at",
)
CONTENT_FIELDS = (
    "virus", "virus_detail", "spam_action", "spam_score", "spam_required", "spam_symbols", "spam_detail",
    "unscanned", "infected_allowed_at",
)
QUARANTINE_TABLE = (*MESSAGE_TABLE, "quarantine_reason")
SHOWN_HEADERS = ("From", "To", "Date", "Subject", "Message-ID")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DOCUMENT_TABLE = ("id", "org_slug", "inbound_message_id", "filename", "content_type", "size", "created_at")
MESSAGE_DOCUMENT_TABLE = ("id", "filename", "content_type", "size", "sha256", "virus", "virus_detail")
EVENT_TABLE = ("id", "event_id", "org_slug", "event_type", "inbound_message_id", "status", "attempts", "last_status", "next_attempt_at", "last_error")
# The full sweep says how far it got every this many blobs.
PROGRESS_EVERY = 100_000
# The daemon's options of its webhook target policy, which `org webhook` checks a URL against.
_WEBHOOK_POLICY_KEYS = ("webhook_allow_http", "webhook_allow_private")


class CommandError(MailingestError):
    """A request the store cannot satisfy, phrased for the operator."""


# output


# errors


def _fail(message: str, secrets: Iterable[str] = ()) -> int:
    print(f"{PROG}: {one_line(message, secrets) or 'failed'}", file=sys.stderr)
    return 1


def _secrets(settings: StorageSettings) -> list[str]:
    return list(url_passwords(settings.database or ""))


# a command's storage


class CommandBackends:
    """The store of one command, and object storage for the commands that read blobs."""

    def __init__(self, settings: StorageSettings):
        self.settings = settings
        self.store: "ISchemaStore | IOrgStore | IIntakeStore | IReadStore | IExtractionQueue | IQuarantineStore | IOutboxStore | None" = None
        self._blobs = None

    def open_store(self) -> None:
        from mailingest.handoff.events import MESSAGE_EVENTS
        from mailingest.storage.store import open_store

        url = self.settings.database
        try:
            self.store = open_store(url, MESSAGE_EVENTS)
        except ValueError as e:
            raise CommandError(f"bad database URL: {e}") from None
        except OSError as e:
            raise CommandError(f"database {redact_url(url)}: {describe_os_error(e)}") from None

    @property
    def blobs(self):
        from mailingest.storage.blobs import open_blobs

        if self._blobs is None:
            url = self.settings.storage
            try:
                self._blobs = open_blobs(url, self.settings.s3_endpoint, self.settings.s3_region)
            except ValueError as e:
                raise CommandError(f"bad storage URL: {e}") from None
            except OSError as e:
                raise CommandError(f"storage {redact_url(url)}: {describe_os_error(e)}") from None
        return self._blobs

    async def close(self) -> None:
        if self._blobs is not None:
            await self._blobs.close()
        if self.store is not None:
            await self.store.close()

    async def require_org(self, slug: str | None) -> None:
        """Filtering by an organisation that does not exist is a typo, not an empty result."""
        if slug is not None and await self.store.get_org(slug) is None:
            raise NoSuchOrg(f"no organisation {slug.lower()!r}")

    async def message(self, message_id: int) -> dict:
        row = await self.store.get_message(message_id)
        if row is None:
            raise NoSuchMessage(f"no message {message_id}")
        return row


class _Verifying:
    """Passes blob bytes through while hashing them, to check them against their row."""

    def __init__(self, fileobj: BinaryIO):
        self._fileobj = fileobj
        self._sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._fileobj.write(data)
        self._sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._fileobj.flush()

    def check(self, what: str, sha256: str | None, size: int | None) -> None:
        if (sha256 and self._sha256.hexdigest() != sha256) or (size is not None and self.size != size):
            raise CommandError(
                f"{what}: object storage returned {self.size} bytes that do not match"
                f" the recorded size {size} and sha256 {sha256}"
            )


async def _copy_blob(session: CommandBackends, key: str, out: BinaryIO, what: str, sha256, size) -> None:
    verifying = _Verifying(out)
    try:
        await session.blobs.read_to(key, verifying)
    except BlobNotFound:
        raise CommandError(f"{what}: blob {key} is missing from object storage") from None
    verifying.check(what, sha256, size)


# commands


async def cmd_migrate(session: CommandBackends, args: argparse.Namespace) -> None:
    applied = await session.store.migrate()
    if applied:
        print("applied schema version(s) " + ", ".join(str(v) for v in applied))
    else:
        print("schema up to date")
    # What migrations leave to build online (the search index); the daemon does it too when it starts.
    await session.store.build_indexes(lambda line: print(line, flush=True))


async def cmd_org_add(session: CommandBackends, args: argparse.Namespace) -> None:
    slug = args.slug.lower()
    if not valid_slug(slug):
        raise CommandError(
            f"invalid organisation slug {args.slug!r}: use 1 to 63 of a-z 0-9 . _ -,"
            " starting with a letter or digit"
        )
    row = await session.store.add_org(slug, args.name)
    print(f"added organisation {row['slug']} (id {row['id']})")


async def cmd_org_list(session: CommandBackends, args: argparse.Namespace) -> None:
    rows = [dict(row, reserved=row["slug"] == POSTMASTER_SLUG) for row in await session.store.list_orgs()]
    print(to_json(rows) if args.json else table(rows, ORG_TABLE))


async def cmd_org_disable(session: CommandBackends, args: argparse.Namespace) -> None:
    if args.slug.lower() == POSTMASTER_SLUG:
        raise CommandError(
            f"organisation {POSTMASTER_SLUG} is reserved: mail for postmaster is always accepted (RFC 5321 4.5.1)"
        )
    row = await session.store.set_org_active(args.slug, False)
    print(f"disabled organisation {row['slug']}")


async def cmd_org_enable(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.store.set_org_active(args.slug, True)
    print(f"enabled organisation {row['slug']}")


async def cmd_messages_list(session: CommandBackends, args: argparse.Namespace) -> None:
    await session.require_org(args.org)
    rows = await session.store.list_messages(org_slug=args.org, status=args.status, limit=args.limit)
    columns = QUARANTINE_TABLE if args.status == "quarantined" else MESSAGE_TABLE
    print(to_json(rows) if args.json else table(rows, columns))


async def _shown_headers(session: CommandBackends, raw_key: str) -> dict[str, str]:
    """The first of each of L{SHOWN_HEADERS} in the stored copy, read as the console reads them, unfolded."""
    from mailingest.console.resource import head_of, read_headers

    headers, _ = read_headers(await head_of(session.blobs, raw_key))
    first: dict[str, str] = {}
    for name, value in headers:
        first.setdefault(name.lower(), value.replace("\n", "").strip())
    return {name: first[name.lower()] for name in SHOWN_HEADERS if name.lower() in first}


def _refuse_gone(row: dict) -> None:
    """A message incinerated, or a document deleted, by retention or erasure: its content is gone, say so."""
    from mailingest.storage.retention import gone

    if gone(row):
        raise ContentGone(gone(row))


async def cmd_messages_show(session: CommandBackends, args: argparse.Namespace) -> None:
    """The row is shown even when object storage cannot give the headers: the reason takes their place."""
    row = await session.message(args.id)
    documents = await session.store.list_documents(message_id=args.id)
    try:
        _refuse_gone(row)
        headers, unread = await _shown_headers(session, row["raw_key"]), None
    except (MailingestError, OSError) as e:
        headers, unread = {}, user_message(e, session.settings.database)
    if args.json:
        print(to_json({**row, "headers": headers, "documents": documents}))
        return
    print(f"headers: cannot read the stored copy: {unread}" if unread else "headers:" if headers else "headers: none in the stored copy")
    width = max(len(name) for name in SHOWN_HEADERS) + 1
    for name, value in headers.items():
        print(f"{name + ':':<{width}} {cell(name, value, short=False)}")
    print()
    shown = (MESSAGE_FIELDS, SENDER_FIELDS, CONTENT_FIELDS) + ((TOMBSTONE_FIELDS,) if row["status"] == "incinerated" else ())
    for fields in shown:
        if fields is not MESSAGE_FIELDS:
            print({SENDER_FIELDS: "\nsender:", CONTENT_FIELDS: "\ncontent:"}.get(fields, "\ntombstone:"))
        width = max(len(name) for name in fields) + 1
        for name in fields:
            print(f"{name + ':':<{width}} {cell(name, row.get(name), short=False)}")
    print(f"\ndocuments ({len(documents)}):")
    if documents:
        print(table(documents, MESSAGE_DOCUMENT_TABLE))


async def cmd_messages_raw(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.message(args.id)
    _refuse_gone(row)
    _refuse_infected(row, f"message {args.id}")
    out = sys.stdout.buffer
    await _copy_blob(session, row["raw_key"], out, f"message {args.id}", row["raw_sha256"], row["raw_size"])
    out.flush()


async def cmd_documents_list(session: CommandBackends, args: argparse.Namespace) -> None:
    await session.require_org(args.org)
    if args.message is not None:
        await session.message(args.message)
    rows = await session.store.list_documents(org_slug=args.org, message_id=args.message)
    print(to_json(rows) if args.json else table(rows, DOCUMENT_TABLE))


async def cmd_documents_show(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.store.get_document(args.id)
    if row is None:
        raise CommandError(f"no document {args.id}")
    if args.json:
        print(to_json(row))
        return
    width = max(len(name) for name in row) + 1
    for name, value in row.items():
        print(f"{name + ':':<{width}} {cell(name, value, short=False)}")


async def cmd_documents_get(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.store.get_document(args.id)
    if row is None:
        raise CommandError(f"no document {args.id}")
    _refuse_gone(row)
    what = f"document {args.id}"
    if row.get("virus") == "infected":
        _refuse_infected(await session.message(row["inbound_message_id"]), what)
    if args.output == "-":
        await _copy_blob(session, row["storage_key"], sys.stdout.buffer, what, row["sha256"], row["size"])
        sys.stdout.buffer.flush()
        return
    await _download(session, row, args.output, what)


@contextlib.contextmanager
def _complete_or_nothing(path: str, mode: int, replace: bool = True) -> Iterator[BinaryIO]:
    """
    A temporary file beside C{path} (created with C{mode}), renamed to it once
    complete: never a partial file. Without C{replace} an existing C{path}
    is left alone (L{FileExistsError}).
    """
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)
            os.unlink(partial)
    except BaseException:
        os.unlink(partial)
        raise


async def _download(session: CommandBackends, row: dict, path: str, what: str) -> None:
    with _complete_or_nothing(path, 0o666) as out:
        await _copy_blob(session, row["storage_key"], out, what, row["sha256"], row["size"])
    print(f"wrote {row['size']} bytes to {path}")


async def cmd_org_policy(session: CommandBackends, args: argparse.Namespace) -> None:
    from mailingest.verification.policy import SenderPolicy

    domains = None
    if args.any_domain:
        domains = []
    elif args.allow_domain:
        domains = [domain.lower().rstrip(".") for domain in args.allow_domain]
        for domain in domains:
            if not _DOMAIN.match(domain):
                raise CommandError(f"invalid domain {domain!r} for --allow-domain")
    row = await session.store.set_sender_policy(args.slug, domains, args.require)
    row = await session.store.set_content_policy(
        args.slug, args.on_virus, args.spam_threshold, args.unscanned, args.spam_threshold_none
    )
    policy = SenderPolicy.from_columns(row["sender_allow_domains"], row["sender_require"])
    print(f"sender policy of {row['slug']}: {policy.describe()}")
    print(f"content policy of {row['slug']}: {ContentPolicy.from_row(row).describe()}")


async def cmd_release(session: CommandBackends, args: argparse.Namespace) -> None:
    """An infected message is released only with C{--allow-infected}, which is recorded and lets its documents out."""
    row = await session.message(args.id)
    if row.get("virus") == "infected":
        if not args.allow_infected:
            raise CommandError(
                f"message {args.id} is infected ({row['virus_detail']}): release it with --allow-infected"
                " if its documents may be downloaded anyway"
            )
        # Recorded where the message's story is told: its status history (the console shows it).
        for line in await allow_infected(session.store, row):
            print(line)
        return
    await session.store.release(args.id)
    print(f"released message {args.id}: queued for extraction")


def _refuse_infected(message: dict, what: str) -> None:
    if message.get("virus") == "infected" and message.get("infected_allowed_at") is None:
        raise CommandError(
            f"{what} is infected ({message['virus_detail']}); `mailingest release {message['id']} --allow-infected` first"
        )


async def cmd_reprocess(session: CommandBackends, args: argparse.Namespace) -> None:
    if args.id is not None:
        await session.store.reprocess(args.id)
        print(f"queued message {args.id} for extraction again")
        return
    await session.require_org(args.org)
    count = await session.store.reprocess_failed(org_slug=args.org)
    print(f"queued {count} failed message{'' if count == 1 else 's'} for extraction again")


async def cmd_gc(session: CommandBackends, args: argparse.Namespace) -> None:
    """The daemon's options (same environment and file) give the default margin and its floor."""
    from mailingest.app.service import DEFAULT_SCRATCH_DIR
    from mailingest.storage.journal import JOURNAL_DIR, IntentJournal
    from mailingest.storage.sweeper import check_min_age, sweep, sweep_journal

    daemon = Settings.settle(environ=os.environ, config_path=args.config)
    min_age = check_min_age(daemon.gc_min_age if args.min_age is None else args.min_age, daemon.gc_floor)

    def show(blob: "BlobInfo") -> None:
        print(f"orphan {blob.key}" + (f" ({blob.size} bytes)" if blob.mtime else ""))

    def progress(found) -> None:
        # On stderr, so stdout stays the list of orphans.
        if found.scanned // PROGRESS_EVERY != getattr(progress, "shown", 0):
            progress.shown = found.scanned // PROGRESS_EVERY
            print(f"gc: {found.scanned} blob(s) scanned, {found.orphans} orphaned so far", file=sys.stderr, flush=True)

    if args.recent:
        journal = IntentJournal(os.path.join(session.blobs.scratch_dir or DEFAULT_SCRATCH_DIR, JOURNAL_DIR))
        found = await sweep_journal(session.store, session.blobs, journal, min_age, dry_run=args.dry_run, on_orphan=show)
        what = "key(s) of the intent journal checked"
    else:
        found = await sweep(session.store, session.blobs, min_age, dry_run=args.dry_run, on_orphan=show, on_page=progress)
        what = "blob(s) scanned"
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {found.orphans} orphaned blob(s) ({found.orphan_bytes} bytes) and {found.temporaries}"
        f" stale temporary file(s) ({found.temporary_bytes} bytes); {found.scanned} {what},"
        f" only those older than {min_age:g} s considered"
    )


async def cmd_org_webhook(session: CommandBackends, args: argparse.Namespace) -> None:
    """
    The daemon's target policy decides which URLs are allowed: its options
    here, else the same environment and file as the daemon's.
    """
    from mailingest.handoff.events import BadSecret, check_secret, new_secret
    from mailingest.handoff.targets import TargetPolicy, check_target

    if args.remove:
        removed = await session.store.remove_webhook(args.slug)
        print(f"removed the webhook of {args.slug.lower()}" if removed else f"{args.slug.lower()} had no webhook")
        return
    daemon = Settings.settle(environ=os.environ, config_path=args.config)
    allowed = {key: getattr(daemon, key) or bool(getattr(args, key)) for key in _WEBHOOK_POLICY_KEYS}
    await check_target(TargetPolicy(allowed["webhook_allow_http"], allowed["webhook_allow_private"]), args.url)
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as f:
            try:
                secret = check_secret(f.readline())
            except BadSecret as e:
                raise CommandError(f"--secret-file {args.secret_file}: {e}; without --secret-file a new secret is made") from None
    else:
        secret = new_secret()
    await session.store.set_webhook(args.slug, args.url, secret)
    print(f"webhook of {args.slug.lower()}: {args.url}")
    for key in _WEBHOOK_POLICY_KEYS:
        if allowed[key] and not getattr(daemon, key):
            name = key.replace("_", "-")
            print(
                f"note: the daemon checks the URL again before every delivery: run it with --{name} too"
                f" ({name} = yes in its --config file, or MAILINGEST_{key.upper()}=yes)"
            )
    if not args.secret_file:
        print(f"signing secret (shown once, give it to the receiver): {secret}")


async def cmd_org_token(session: CommandBackends, args: argparse.Namespace) -> None:
    from mailingest.handoff.api import new_token, token_hash

    if args.revoke:
        count = await session.store.revoke_tokens(args.slug)
        print(f"revoked {count} API token(s) of {args.slug.lower()}")
        return
    token = new_token()
    await session.store.add_token(args.slug, token_hash(token))
    print(f"API token of {args.slug.lower()} (shown once, only its hash is kept):")
    print(token)


async def cmd_events_list(session: CommandBackends, args: argparse.Namespace) -> None:
    await session.require_org(args.org)
    rows = await session.store.list_events(org_slug=args.org, status=args.status, limit=args.limit)
    print(to_json(rows) if args.json else table(rows, EVENT_TABLE))


async def cmd_events_redeliver(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.store.redeliver(args.id)
    print(f"event {row['id']} ({row['event_id']}) queued for delivery again")


def cmd_admin_token(args: argparse.Namespace) -> int:
    """
    A new admin token straight into its file, mode 0600: never on a terminal,
    in shell history or in a process list.
    """
    from mailingest.handoff.api import new_token

    exists = f"{args.write} exists: --force replaces it (the daemon reads its token file at start)"
    if not args.force and os.path.lexists(args.write):
        raise CommandError(exists)
    try:
        with _complete_or_nothing(args.write, 0o600, replace=args.force) as out:
            out.write(new_token().encode("ascii") + b"\n")
    except FileExistsError:
        raise CommandError(exists) from None
    except OSError as e:
        raise CommandError(f"cannot write {args.write}: {e.strerror}") from None
    print(f"wrote a new admin token to {args.write} (mode 0600): give it to the daemon as --api-admin-token-file {args.write}")
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    """
    Plain blocking SMTP, no database: to C{--server}, else to the daemon's
    SMTP endpoint, found as the daemon finds it (C{--smtp}, environment, file).
    """
    from mailingest.app import mail_sender as send_test

    if args.server:
        server, found_as = args.server, ""
    else:
        smtp = next(option for option in DAEMON_OPTIONS if option.key == "smtp")
        descriptions = resolve((smtp,), {"smtp": args.smtp}, os.environ, args.config)["smtp"]
        server, endpoint = send_test.daemon_server(descriptions)
        found_as = f" (the daemon's SMTP endpoint {endpoint}; --server HOST:PORT sends elsewhere)"
    sender = args.sender or send_test.DEFAULT_SENDER
    attachments = [send_test.FileToAttach.load(path) for path in args.attach]
    messages = (
        send_test.build_test_message(
            sender, args.to, attachments, args.subject, index, args.count
        ).as_bytes()
        for index in range(1, args.count + 1)
    )
    replies = send_test.send(server, sender, args.to, messages, args.timeout, found_as)
    for index, reply in enumerate(replies, 1):
        print(f"sent {index}/{args.count} to {server}: {reply}", flush=True)
    return 0


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


def _command(subparsers, name: str, help: str, handler: Callable) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help, parents=[_AFTER_COMMAND])
    parser.set_defaults(handler=handler)
    return parser


def _listing(subparsers, help: str, handler: Callable, statuses: Sequence[str], what: str) -> None:
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

    _command(commands, "migrate", "create or upgrade the database schema", cmd_migrate)

    org = _group(commands, "org", "manage organisations")
    add = _command(org, "add", "create an active organisation", cmd_org_add)
    add.add_argument("slug", metavar="SLUG", help="the +SLUG of its addresses")
    add.add_argument("--name", default="", help="display name")
    listing = _command(org, "list", "list organisations", cmd_org_list)
    listing.add_argument("--json", action="store_true", help="print JSON")
    for name, handler, verb in (("disable", cmd_org_disable, "refuse"), ("enable", cmd_org_enable, "accept")):
        toggle = _command(org, name, f"{name} an organisation: {verb} its mail", handler)
        toggle.add_argument("slug", metavar="SLUG")

    policy = _command(org, "policy", "show or set which senders an organisation takes orders from", cmd_org_policy)
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
    policy.add_argument(
        "--on-virus", choices=ON_VIRUS,
        help="a message clamd finds infected: quarantine it (default), reject-documents (drop the infected ones) or tag it",
    )
    policy.add_argument(
        "--spam-threshold", type=float, metavar="SCORE", help="quarantine a message rspamd scores above SCORE"
    )
    policy.add_argument("--no-spam-threshold", dest="spam_threshold_none", action="store_true", help="no spam quarantine (default)")
    policy.add_argument(
        "--unscanned", choices=UNSCANNED,
        help="a scanner that cannot answer: hold the message (default; retried, up to --max-attempts) or pass it, marked unscanned",
    )
    webhook = _command(org, "webhook", "set (or --remove) the URL an organisation's events are POSTed to", cmd_org_webhook)
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
    token = _command(org, "token", "create (printed once) or revoke an organisation's API tokens", cmd_org_token)
    token.add_argument("slug", metavar="SLUG")
    token.add_argument("--create", action="store_true", help="create a token")
    token.add_argument("--revoke", action="store_true", help="revoke all the organisation's tokens")

    add_domain_commands(org, _command)

    events = _group(commands, "events", "inspect and redeliver webhook events")
    _listing(events, "list webhook events, newest first", cmd_events_list, EVENT_STATUSES, "events")
    redeliver = _command(events, "redeliver", "send an event again now, with a fresh retry horizon", cmd_events_redeliver)
    redeliver.add_argument("id", type=int, metavar="ID")

    messages = _group(commands, "messages", "inspect inbound messages")
    _listing(messages, "list messages, newest first", cmd_messages_list, STATUSES, "messages")
    show = _command(messages, "show", "one message: headers, status, error, documents", cmd_messages_show)
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    raw = _command(messages, "raw", "write the stored raw MIME to stdout", cmd_messages_raw)
    raw.add_argument("id", type=int, metavar="ID")

    documents = _group(commands, "documents", "inspect and download extracted documents")
    listing = _command(documents, "list", "list documents, newest first", cmd_documents_list)
    listing.add_argument("--org", metavar="SLUG", help="only this organisation's")
    listing.add_argument("--message", type=int, metavar="ID", help="only this message's, in message order")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = _command(documents, "show", "one document: names, types, how it was attached", cmd_documents_show)
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    get = _command(documents, "get", "download a document", cmd_documents_get)
    get.add_argument("id", type=int, metavar="ID")
    get.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it; - for stdout")

    reprocess = _command(commands, "reprocess", "queue messages for extraction again", cmd_reprocess)
    reprocess.add_argument("id", type=int, nargs="?", metavar="ID", help="this message")
    reprocess.add_argument("--failed", action="store_true", help="every failed message")
    reprocess.add_argument("--org", metavar="SLUG", help="with --failed: only this organisation's")

    release = _command(commands, "release", "extract a quarantined message, past its organisation's sender and content policy", cmd_release)
    release.add_argument("id", type=int, metavar="ID")
    release.add_argument(
        "--allow-infected", action="store_true",
        help="an infected message: let its documents be downloaded through the API and the console (logged)",
    )

    send = _command(commands, "send-test", "send test mail over SMTP (no database needed)", cmd_send_test)
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
        commands, "admin-token", "write a new API admin token to a file, mode 0600 (no database needed)", cmd_admin_token
    )
    admin_token.add_argument("--write", required=True, metavar="FILE", help="the file, for --api-admin-token-file")
    admin_token.add_argument("--force", action="store_true", help="replace FILE if it exists")

    cli_retention.add_commands(commands, org, _command, _group, _positive_int)

    gc = _command(
        commands, "gc",
        "delete blobs no row references (left by failed or interrupted deliveries): every blob stored"
        " (progress on stderr), or with --recent only those the daemon's intent journal names",
        cmd_gc,
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
    if args.command == "erase" and (args.sender is None) != (args.org is None):
        parser.error("erase: --sender goes with --org (and --org with --sender)")
    if args.command == "org" and getattr(args, "any_domain", False) and args.allow_domain:
        parser.error("org policy: --allow-domain or --any-domain, not both")
    if args.command == "org" and getattr(args, "spam_threshold_none", False) and args.spam_threshold is not None:
        parser.error("org policy: --spam-threshold or --no-spam-threshold, not both")
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


# running


def _react(run: Callable[[], Awaitable[int]]) -> int:
    """One reactor run for one command; C{run} reports its own errors and returns the exit status."""
    from twisted.internet import defer, task

    status: list[int] = []

    async def recorded() -> None:
        status.append(await run())

    try:
        task.react(lambda reactor: defer.ensureDeferred(recorded()))
    except SystemExit:
        pass
    return status[0] if status else 1


def _require_existing_database(url: str) -> None:
    """Only C{migrate} creates a database: another command in the wrong directory must not make an empty one."""
    if url_scheme(url) == "sqlite" and not os.path.exists(sqlite_path(url)):
        raise CommandError(f"no database at {url}; run from the daemon's directory or pass --database")


def _refuse_root_in_another_users_directory(url: str) -> None:
    """
    Root running a command on a SQLite database whose directory another user
    owns (the daemon's): the files it would create there (the database, its
    search file, WAL) would be root's, and the daemon could not write them.
    """
    if os.geteuid() != 0 or url_scheme(url) != "sqlite":
        return
    directory = os.path.dirname(os.path.abspath(sqlite_path(url)))
    try:
        owner = os.stat(directory).st_uid
    except OSError:
        return
    if owner != 0:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise CommandError(
            f"{directory} belongs to {name}: run this command as that user (sudo -u {name} mailingest ...),"
            " or the files it makes there would be root's and the daemon could not write them"
        )


class _Warnings:
    """
    A log observer keeping our warnings while a command runs (a search file
    made again, say), said on stderr, a command's only log, when it
    succeeds; when it fails, its one line says what went wrong.
    """

    def __init__(self, secrets: Iterable[str]):
        self.secrets = list(secrets)
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        from twisted.logger import LogLevel, formatEvent

        if event.get("log_level") is LogLevel.warn and event.get("log_namespace", "").startswith("mailingest."):
            self.lines.append(one_line(formatEvent(event), self.secrets))

    def say(self) -> None:
        for line in self.lines:
            print(f"{PROG}: warning: {line}", file=sys.stderr)


async def _run_with_store(handler: Callable, args: argparse.Namespace, settings: StorageSettings) -> int:
    from twisted.logger import globalLogPublisher

    session = CommandBackends(settings)
    warnings = _Warnings(_secrets(settings))
    globalLogPublisher.addObserver(warnings)
    try:
        try:
            if handler is not cmd_migrate:
                _require_existing_database(settings.database)
            _refuse_root_in_another_users_directory(settings.database)
            session.open_store()
            if handler is not cmd_migrate:
                await session.store.migrate()
            await handler(session, args)
        finally:
            await session.close()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as e:
        message = user_message(e, settings.database)
        if message is None:
            traceback.print_exception(e)
            message = f"unexpected error: {e!r}"
        return _fail(message, _secrets(settings))
    finally:
        globalLogPublisher.removeObserver(warnings)
    warnings.say()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, settle the storage options, run one command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        if args.handler in (cmd_send_test, cmd_admin_token):
            return args.handler(args)
        given = {option.key: getattr(args, option.key) for option in STORAGE_OPTIONS}
        settings = StorageSettings.settle(given, os.environ, args.config)
    except MailingestError as e:
        return _fail(str(e))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
    return _react(lambda: _run_with_store(args.handler, args, settings))


def _quiet_broken_pipe() -> int:
    """The reader of our stdout went away (C{| head}): nothing left to say to it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
