"""
The admin command's commands (L{mailingest.app.cli} parses, then runs one
of these). What only some commands need is imported inside them, so a
command does not pay for the others' modules.
"""

import argparse
import contextlib
import hashlib
import os
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import BinaryIO

from twisted.internet import defer, task

from mailingest.app.cli import (
    DOCUMENT_TABLE, EVENT_TABLE, MESSAGE_DOCUMENT_TABLE, MESSAGE_FIELDS, MESSAGE_TABLE, ORG_TABLE, QUARANTINE_TABLE,
    SENDER_FIELDS, SHOWN_HEADERS, _DOMAIN, _WEBHOOK_POLICY_KEYS, CommandError, _cell, _describe_os_error, _fail,
    _quiet_broken_pipe, _secrets, _user_message, table, to_json,
)
from mailingest.app.options import DAEMON_OPTIONS, STORAGE_OPTIONS, resolve
from mailingest.app.settings import Settings, StorageSettings
from mailingest.errors import BlobNotFound, MailingestError, NoSuchMessage, NoSuchOrg
from mailingest.handoff.events import MESSAGE_EVENTS
from mailingest.interfaces import BlobInfo, IExtractionQueue, IIntakeStore, IOrgStore, IOutboxStore, IQuarantineStore, IReadStore, ISchemaStore
from mailingest.ops.secrets import redact_url
from mailingest.storage.blobs import open_blobs
from mailingest.storage.store import open_store
from mailingest.storage.urls import sqlite_path

# The full sweep says how far it got every this many blobs.
PROGRESS_EVERY = 100_000

# a command's storage


class CommandBackends:
    """The store of one command, and object storage for the commands that read blobs."""

    def __init__(self, settings: StorageSettings):
        self.settings = settings
        self.store: "ISchemaStore | IOrgStore | IIntakeStore | IReadStore | IExtractionQueue | IQuarantineStore | IOutboxStore | None" = None
        self._blobs = None

    def open_store(self) -> None:
        url = self.settings.database
        try:
            self.store = open_store(url, MESSAGE_EVENTS)
        except ValueError as e:
            raise CommandError(f"bad database URL: {e}") from None
        except OSError as e:
            raise CommandError(f"database {redact_url(url)}: {_describe_os_error(e)}") from None

    @property
    def blobs(self):
        if self._blobs is None:
            url = self.settings.storage
            try:
                self._blobs = open_blobs(url, self.settings.s3_endpoint, self.settings.s3_region)
            except ValueError as e:
                raise CommandError(f"bad storage URL: {e}") from None
            except OSError as e:
                raise CommandError(f"storage {redact_url(url)}: {_describe_os_error(e)}") from None
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
    from mailingest.delivery.routing import valid_slug

    slug = args.slug.lower()
    if not valid_slug(slug):
        raise CommandError(
            f"invalid organisation slug {args.slug!r}: use 1 to 63 of a-z 0-9 . _ -,"
            " starting with a letter or digit"
        )
    row = await session.store.add_org(slug, args.name)
    print(f"added organisation {row['slug']} (id {row['id']})")


async def cmd_org_list(session: CommandBackends, args: argparse.Namespace) -> None:
    from mailingest.delivery.routing import POSTMASTER_SLUG

    rows = [dict(row, reserved=row["slug"] == POSTMASTER_SLUG) for row in await session.store.list_orgs()]
    print(to_json(rows) if args.json else table(rows, ORG_TABLE))


async def cmd_org_disable(session: CommandBackends, args: argparse.Namespace) -> None:
    from mailingest.delivery.routing import POSTMASTER_SLUG

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


async def cmd_messages_show(session: CommandBackends, args: argparse.Namespace) -> None:
    """The row is shown even when object storage cannot give the headers: the reason takes their place."""
    row = await session.message(args.id)
    documents = await session.store.list_documents(message_id=args.id)
    try:
        headers, unread = await _shown_headers(session, row["raw_key"]), None
    except (MailingestError, OSError) as e:
        headers, unread = {}, _user_message(e, session.settings)
    if args.json:
        print(to_json({**row, "headers": headers, "documents": documents}))
        return
    print(f"headers: cannot read the stored copy: {unread}" if unread else "headers:" if headers else "headers: none in the stored copy")
    width = max(len(name) for name in SHOWN_HEADERS) + 1
    for name, value in headers.items():
        print(f"{name + ':':<{width}} {_cell(name, value, short=False)}")
    print()
    for fields in (MESSAGE_FIELDS, SENDER_FIELDS):
        if fields is SENDER_FIELDS:
            print("\nsender:")
        width = max(len(name) for name in fields) + 1
        for name in fields:
            print(f"{name + ':':<{width}} {_cell(name, row.get(name), short=False)}")
    print(f"\ndocuments ({len(documents)}):")
    if documents:
        print(table(documents, MESSAGE_DOCUMENT_TABLE))


async def cmd_messages_raw(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.message(args.id)
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
        print(f"{name + ':':<{width}} {_cell(name, value, short=False)}")


async def cmd_documents_get(session: CommandBackends, args: argparse.Namespace) -> None:
    row = await session.store.get_document(args.id)
    if row is None:
        raise CommandError(f"no document {args.id}")
    what = f"document {args.id}"
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
    policy = SenderPolicy.from_columns(row["sender_allow_domains"], row["sender_require"])
    print(f"sender policy of {row['slug']}: {policy.describe()}")


async def cmd_release(session: CommandBackends, args: argparse.Namespace) -> None:
    await session.store.release(args.id)
    print(f"released message {args.id}: queued for extraction")


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

    def show(blob: BlobInfo) -> None:
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


def _react(run: Callable[[], Awaitable[int]]) -> int:
    """One reactor run for one command; C{run} reports its own errors and returns the exit status."""
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
    if url.split(":", 1)[0].lower() == "sqlite" and not os.path.exists(sqlite_path(url)):
        raise CommandError(f"no database at {url}; run from the daemon's directory or pass --database")


async def _run_with_store(handler: Callable, args: argparse.Namespace, settings: StorageSettings) -> int:
    session = CommandBackends(settings)
    try:
        try:
            if handler is not cmd_migrate:
                _require_existing_database(settings.database)
            session.open_store()
            if handler is not cmd_migrate:
                await session.store.migrate()
            await handler(session, args)
        finally:
            await session.close()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as e:
        message = _user_message(e, settings)
        if message is None:
            traceback.print_exception(e)
            message = f"unexpected error: {e!r}"
        return _fail(message, _secrets(settings))
    return 0


def run(args: argparse.Namespace) -> int:
    """Settle the storage options and run the command C{args.handler} names."""
    handler = globals()[args.handler]
    try:
        if handler in (cmd_send_test, cmd_admin_token):
            return handler(args)
        given = {option.key: getattr(args, option.key) for option in STORAGE_OPTIONS}
        settings = StorageSettings.settle(given, os.environ, args.config)
    except MailingestError as e:
        return _fail(str(e))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
    return _react(lambda: _run_with_store(handler, args, settings))
