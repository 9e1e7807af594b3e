"""
What the parent and its intake processes (C{--processes N}) say to each
other: AMP commands (L{twisted.protocols.amp}) over the child's stdin and
stdout, each argument typed, each failure a declared error.

The parent runs Internet-facing code in its children, so it decodes nothing
from them but these commands' fields: no object is rebuilt from their bytes,
a message row is a fixed set of typed fields (a missing, unknown, repeated or
malformed one refuses the whole call with L{BadRecords}) and a command the
parent does not declare is refused by AMP itself.

Parent to child: L{StartIntake} (the daemon's settings), L{StopIntake},
L{RecipientRefused} (another process refused a recipient). Child to parent:
L{RecipientRefused}, and when the parent is the one writer (SQLite) the
intake's store calls L{InsertMessages}, L{RawKeyInUse}, L{LookupOrg},
L{ActiveOrgs} and L{RoutedDomains}.

Message rows travel in batches: a child sends the rows of every message stored
in the same turn of its reactor in one L{InsertMessages} call
(L{ParentStore}), so the cost of a call is shared by the messages of a busy
moment. Records are
packed by hand in AMP's own box format (L{pack}, L{unpack}): the generic
L{amp.AmpList} costs several times more per row and holds at most 64 KiB.
"""

import dataclasses
import ipaddress
import struct
import typing
from datetime import datetime

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp
from zope.interface import implementer

from mailingest.app.settings import Network, Settings, StorageSettings
from mailingest.interfaces import Collision, Duplicate, IClosable, IDomainRoutes, IIntakeStore

# Values longer than this do not fit in one AMP value; records are packed
# into as many values as they need.
MAX_VALUE = amp.MAX_VALUE_LENGTH
# A list argument is at most this many AMP values (about 64 MiB).
MAX_CHUNKS = 1024
BAD_RECORDS = b"BAD_RECORDS"


class StoreCallFailed(Exception):
    """The parent's store refused a call (the database is locked, full, gone): the sender gets a 451."""


class BadRecords(ValueError):
    """Records that are not what the command declares: missing, unknown, repeated or malformed fields."""


def _text(value: bytes) -> str:
    return value.decode("utf-8")


def _count(value: bytes) -> int:
    if not value.isdigit() or len(value) > 20:
        raise ValueError("not a count")
    return int(value)


def _time(value: bytes) -> datetime:
    moment = datetime.fromisoformat(value.decode("ascii"))
    if moment.tzinfo is None:
        raise ValueError("a time without its zone")
    return moment


def _number(value: bytes) -> float:
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return number


def _digest(value: bytes) -> str:
    text = value.decode("ascii")
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise ValueError("not a hex sha256")
    return text


def _raw_key(value: bytes) -> str:
    text = value.decode("ascii")
    if not text.startswith("raw/") or ".." in text:
        raise ValueError("not a raw message key")
    return text


# A field's kind: how it is written, how it is read back (and checked).
TEXT = (lambda v: v.encode("utf-8"), _text)
COUNT = (lambda v: b"%d" % v, _count)
TIME = (lambda v: v.isoformat().encode("ascii"), _time)
NUMBER = (lambda v: repr(float(v)).encode("ascii"), _number)
DIGEST = (lambda v: v.encode("ascii"), _digest)
RAW_KEY = (lambda v: v.encode("ascii"), _raw_key)


_LENGTH = struct.Struct(">H")


class Field:
    """One field of a record: its kind, and whether it may be absent (None)."""

    def __init__(self, kind: tuple, optional: bool = False):
        self.encode, self.decode = kind
        self.optional = optional


def pack(record: dict, fields: dict[str, Field]) -> bytes:
    """One record as an AMP box (key and value each led by its 16-bit length, an empty key at the end); None is left out."""
    parts = []
    for name, field in fields.items():
        value = record.get(name) if field.optional else record[name]
        if value is None:
            if not field.optional:
                raise BadRecords(f"{name} is required")
            continue
        data = field.encode(value)
        if len(data) > MAX_VALUE:
            raise BadRecords(f"{name} is longer than {MAX_VALUE} bytes")
        parts += (_LENGTH.pack(len(name)), name.encode("ascii"), _LENGTH.pack(len(data)), data)
    parts.append(b"\0\0")
    return b"".join(parts)


def unpack(data: bytes, fields: dict[str, Field]) -> list[dict]:
    """The records packed in C{data}, each checked against C{fields}; L{BadRecords} for anything else."""
    records, record, at, end = [], {}, 0, len(data)
    length_at = _LENGTH.unpack_from
    try:
        while at < end:
            (length,) = length_at(data, at)
            at += 2
            if not length:
                records.append(_checked(record, fields))
                record = {}
                continue
            key = data[at:at + length].decode("ascii")
            (size,) = length_at(data, at + length)
            at += length + 2
            value = data[at:at + size]
            at += size
            if len(value) != size:
                raise BadRecords("truncated")
            field = fields.get(key)
            if field is None:
                raise BadRecords(f"unknown field {key!r}")
            if key in record:
                raise BadRecords(f"field {key!r} repeated")
            record[key] = field.decode(value)
    except struct.error:
        raise BadRecords("truncated") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRecords(str(e)) from None
    if record:
        raise BadRecords("truncated")
    return records


def _checked(record: dict, fields: dict[str, Field]) -> dict:
    for name, field in fields.items():
        if name not in record:
            if not field.optional:
                raise BadRecords(f"{name} is missing")
            record[name] = None
    return record


class Records(amp.Argument):
    """
    A list of records with the given fields. On the wire: the argument's own
    key holds how many values follow, C{name.0}, C{name.1}... the records
    packed (L{pack}), as many per value as fit. Records already packed may be
    given as C{bytes}. Reading refuses the call with a declared L{BadRecords}
    (never by closing the connection, as a failure AMP does not know would).
    """

    def __init__(self, fields: dict[str, Field]):
        super().__init__()
        self.fields = fields

    def toBox(self, name, strings, objects, proto):
        values, chunk, size = [], [], 0
        for record in objects.pop(name.decode("ascii")):
            data = record if isinstance(record, bytes) else pack(record, self.fields)
            if len(data) > MAX_VALUE:
                raise BadRecords(f"a record of {len(data)} bytes does not fit in one AMP value")
            if size + len(data) > MAX_VALUE:
                values.append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            values.append(b"".join(chunk))
        strings[name] = b"%d" % len(values)
        for index, value in enumerate(values):
            strings[b"%s.%d" % (name, index)] = value

    def fromBox(self, name, strings, objects, proto):
        try:
            count = _count(strings.pop(name))
            if count > MAX_CHUNKS:
                raise BadRecords(f"more than {MAX_CHUNKS} values")
            records = []
            for index in range(count):
                value = strings.pop(b"%s.%d" % (name, index), None)
                if value is None:
                    raise BadRecords(f"value {index} missing")
                records += unpack(value, self.fields)
        except (KeyError, ValueError) as e:
            raise amp.RemoteAmpError(BAD_RECORDS, f"{name.decode()}: {e}") from None
        objects[name.decode("ascii")] = records


ROW_FIELDS = {
    "batch": Field(COUNT),
    "org_id": Field(COUNT),
    "source": Field(TEXT),
    "source_message_id": Field(TEXT),
    "mail_from": Field(TEXT),
    "rcpt_to": Field(TEXT),
    "subject": Field(TEXT, optional=True),
    "raw_key": Field(RAW_KEY),
    "raw_size": Field(COUNT),
    "raw_sha256": Field(DIGEST),
    "content_sha256": Field(DIGEST, optional=True),
    "received_at": Field(TIME),
    "client_ip": Field(TEXT, optional=True),
    "helo": Field(TEXT, optional=True),
    "tls": Field(TEXT, optional=True),
    "rcpt_domain": Field(TEXT, optional=True),
}
ORG_FIELDS = {"slug": Field(TEXT), "id": Field(COUNT)}
DOMAIN_FIELDS = {"domain": Field(TEXT), "org_id": Field(COUNT), "slug": Field(TEXT), "local_parts": Field(TEXT)}
REFUSAL_FIELDS = {"peer": Field(TEXT), "at": Field(NUMBER)}

_STORE_ERRORS = {StoreCallFailed: b"STORE_CALL_FAILED"}


class _Network(amp.Argument):
    """An IP network (C{--proxy-trusted}), as its CIDR text."""

    def toString(self, inObject: Network) -> bytes:
        return str(inObject).encode("ascii")

    def fromString(self, inString: bytes) -> Network:
        return ipaddress.ip_network(inString.decode("ascii"))


class _HostPort(amp.Argument):
    """A (host, port) pair (C{--dns-resolver}); the port, last, has no colon."""

    def toString(self, inObject: tuple[str, int]) -> bytes:
        return f"{inObject[0]}:{inObject[1]}".encode()

    def fromString(self, inString: bytes) -> tuple[str, int]:
        host, _, port = inString.decode().rpartition(":")
        return host, int(port)


_ARGUMENTS = {str: amp.Unicode, int: amp.Integer, float: amp.Float, bool: amp.Boolean, Network: _Network, tuple[str, int]: _HostPort}


def _argument(hint) -> amp.Argument:
    """The AMP argument for a settings field of type C{hint}: optional for C{X | None}, a list for C{tuple[X, ...]}."""
    if hint in _ARGUMENTS:
        return _ARGUMENTS[hint]()
    parts = typing.get_args(hint)
    if type(None) in parts:
        [inner] = [part for part in parts if part is not type(None)]
        argument = _argument(inner)
        argument.optional = True
        return argument
    if typing.get_origin(hint) is tuple and parts[1:] == (Ellipsis,):
        return amp.ListOf(_argument(parts[0]))
    raise TypeError(f"no AMP argument for a setting of type {hint}")


def settings_arguments(cls: type[StorageSettings]) -> list[tuple[bytes, amp.Argument]]:
    """AMP arguments carrying every field of C{cls}, typed as the field is."""
    hints = typing.get_type_hints(cls)
    return [(field.name.encode(), _argument(hints[field.name])) for field in dataclasses.fields(cls)]


class StartIntake(amp.Command):
    """Parent to child, once: the daemon's settings (every field of L{Settings}) and the refused recipients counted so far."""

    arguments = settings_arguments(Settings) + [
        (b"through_parent", amp.Boolean()),
        (b"refusals", Records(REFUSAL_FIELDS)),
    ]
    response = []


class StopIntake(amp.Command):
    """Parent to child: stop as on SIGTERM (drain the sessions); the pipes stay open for the last store calls."""

    arguments = []
    response = []
    requiresAnswer = False


class RecipientRefused(amp.Command):
    """
    A recipient refused to a client address: child to parent, which counts it
    and tells every other child, so the per-address limit holds across processes.
    """

    arguments = [(b"peer", amp.Unicode())]
    response = []
    requiresAnswer = False


class InsertMessages(amp.Command):
    """Child to parent (the one writer): the rows of one or more messages, C{batch} telling whose."""

    arguments = [(b"rows", Records(ROW_FIELDS))]
    # What became of each row, in the order of the rows: C{kinds} has a letter
    # per row (L{KINDS}: new, duplicate, collision; C{f}: its batch failed),
    # C{ids} its id (0 when failed), C{errors} the store's error for each failed row.
    response = [(b"kinds", amp.String()), (b"ids", amp.ListOf(amp.Integer())), (b"errors", amp.ListOf(amp.Unicode()))]
    errors = {**_STORE_ERRORS, BadRecords: BAD_RECORDS}


class RawKeyInUse(amp.Command):
    arguments = [(b"key", amp.Unicode())]
    response = [(b"used", amp.Boolean())]
    errors = _STORE_ERRORS


class LookupOrg(amp.Command):
    """An organisation by slug: its id and whether it is active (none: no such organisation)."""

    arguments = [(b"slug", amp.Unicode())]
    response = [(b"id", amp.Integer(optional=True)), (b"active", amp.Boolean())]
    errors = _STORE_ERRORS


class ActiveOrgs(amp.Command):
    arguments = []
    response = [(b"orgs", Records(ORG_FIELDS))]
    errors = _STORE_ERRORS


class RoutedDomains(amp.Command):
    """The verified custom domains, unless the routing table is still at C{known} (then C{changed} is false and none are sent)."""

    arguments = [(b"known", amp.Integer(optional=True))]
    response = [(b"version", amp.Integer()), (b"changed", amp.Boolean()), (b"domains", Records(DOMAIN_FIELDS))]
    errors = _STORE_ERRORS


def domains_answer(result: tuple) -> dict:
    """L{RoutedDomains}' answer from the store's C{routed_domains} result."""
    version, domains = result
    packed = [dict(d, local_parts=",".join(d["local_parts"])) for d in domains or ()]
    return {"version": version, "changed": domains is not None, "domains": packed}


def domains_result(answer: dict) -> tuple:
    """The store's C{routed_domains} result from L{RoutedDomains}' answer."""
    if not answer["changed"]:
        return answer["version"], None
    return answer["version"], [dict(d, local_parts=[p for p in d["local_parts"].split(",") if p]) for d in answer["domains"]]


class QuietAMP(amp.AMP):
    """
    AMP without its log line per connection made and lost (which names the
    pipes' addresses): the intake processes' start and end are logged as such.
    """

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)


KINDS = {ord("n"): int, ord("d"): Duplicate, ord("c"): Collision}
FAILED = b"f"


def kind_of(row_id: int) -> bytes:
    """The letter of an id from the store's C{insert_messages} in L{InsertMessages}' C{kinds}."""
    return b"d" if isinstance(row_id, Duplicate) else b"c" if isinstance(row_id, Collision) else b"n"


def answer(d: defer.Deferred) -> defer.Deferred:
    """
    The answer to a C{callRemote}, in a Deferred of its own: AMP ends the
    call's Deferred with a handler that drops the connection when a failure
    is left in it, and the caller's caller may see that failure much later.
    """
    result = defer.Deferred()
    d.addCallbacks(result.callback, result.errback)
    return result


@implementer(IIntakeStore, IDomainRoutes, IClosable)
class ParentStore:
    """
    The store calls of the SMTP side, answered by the parent, the one writer
    (SQLite): message inserts from every intake process share its group
    commits instead of contending for the database's write lock.
    """

    # Calls in flight at once: with two, the parent's group commit always has
    # the next call of each process waiting, so a commit takes every
    # process's rows (with one, commits would alternate between processes).
    MAX_IN_FLIGHT = 2

    def __init__(self, parent: amp.AMP, clock: IReactorTime):
        self.parent = parent
        self.clock = clock
        self._queued: list[tuple[list[bytes], defer.Deferred]] = []
        self._next_batch = 0
        self._in_flight = 0
        self._scheduled = False

    def insert_messages(self, rows: list[dict]) -> defer.Deferred:
        """
        The rows go in one call with those of every other message stored in
        the same turn of the reactor, or while L{MAX_IN_FLIGHT} calls wait
        for their answers. A row that cannot be sent is refused at once.
        """
        self._next_batch += 1
        try:
            packed = [pack(dict(row, batch=self._next_batch), ROW_FIELDS) for row in rows]
        except (BadRecords, KeyError, AttributeError, TypeError) as e:
            return defer.fail(StoreCallFailed(f"message row not sendable: {e}"))
        d = defer.Deferred()
        self._queued.append((packed, d))
        if not self._scheduled and self._in_flight < self.MAX_IN_FLIGHT:
            self._scheduled = True
            self.clock.callLater(0, self._send)
        return d

    def _send(self) -> None:
        self._scheduled = False
        batches, self._queued = self._queued, []
        self._in_flight += 1
        d = self.parent.callRemote(InsertMessages, rows=[row for packed, _ in batches for row in packed])
        d.addBoth(self._answered, batches)

    def _answered(self, answer, batches) -> None:
        self._in_flight -= 1
        if self._queued and not self._scheduled:
            self._send()
        if not isinstance(answer, dict):
            error = StoreCallFailed(answer.getErrorMessage())
            for _, d in batches:
                d.errback(error)
            return
        kinds, ids, errors = answer["kinds"], answer["ids"], iter(answer["errors"])
        if len(kinds) != len(ids) or len(ids) != sum(len(packed) for packed, _ in batches):
            error = StoreCallFailed("the parent's answer does not match the rows sent")
            for _, d in batches:
                d.errback(error)
            return
        at = 0
        for packed, d in batches:
            mine = range(at, at + len(packed))
            at += len(packed)
            if any(kinds[i] not in KINDS for i in mine):
                d.errback(StoreCallFailed(next(errors, "not stored")))
                for i in mine[1:]:
                    next(errors, None)
            else:
                d.callback([KINDS[kinds[i]](ids[i]) for i in mine])

    def raw_key_in_use(self, key: str) -> defer.Deferred:
        return self._call(RawKeyInUse, key=key).addCallback(lambda answer: answer["used"])

    def active_orgs(self) -> defer.Deferred:
        return self._call(ActiveOrgs).addCallback(lambda answer: {org["slug"]: org["id"] for org in answer["orgs"]})

    def get_org(self, slug: str) -> defer.Deferred:
        """The organisation as far as the SMTP side reads it (id and active), or None."""
        def org(answer):
            return None if answer["id"] is None else {"id": answer["id"], "slug": slug.lower(), "active": answer["active"]}

        return self._call(LookupOrg, slug=slug).addCallback(org)

    def routed_domains(self, known_version=None) -> defer.Deferred:
        return self._call(RoutedDomains, known=known_version).addCallback(domains_result)

    def _call(self, command, **arguments) -> defer.Deferred:
        d = answer(self.parent.callRemote(command, **arguments))
        d.addErrback(lambda f: f if f.check(StoreCallFailed) else defer.fail(StoreCallFailed(f.getErrorMessage())))
        return d

    def close(self) -> defer.Deferred:
        return defer.succeed(None)
