"""
Log output of the daemon: a readable text format and JSON lines for log
shippers, both scrubbed of secrets.

Every line is masked as L{mailingest.ops.secrets.masker} does, so the database password and the S3
secret key cannot reach the log even when a library puts them in a message.

Under twistd, L{install_twistd_logger} gives these formats to the observer
twistd itself makes (stdout with C{--nodaemon}, else C{--logfile}, rotated on
SIGUSR1): the daemon's only log output, twistd's own start and stop lines
included.
"""

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, eventAsText, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from mailingest.ops.secrets import masker, url_passwords
from mailingest.timestamps import PerSecond
from mailingest.twisted_private import twistd_log_observer

FORMATS = ("text", "json")
JSON_KEYS = ("time", "level", "namespace", "message", "traceback")

# The name twistd resolves (with namedAny) when install_twistd_logger has
# chosen the log output; see twistd_observer.
TWISTD_LOGGER = "mailingest.ops.logs.twistd_observer"
_twistd_observer_factory: Callable[[], ILogObserver] | None = None


def daemon_secrets(database: str | None, environ: Mapping[str, str]) -> list[str]:
    """
    The secrets the daemon holds: the database password (as written in the URL
    C{database} and decoded) and the AWS secret key and session token.
    """
    secrets = list(url_passwords(database or ""))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if environ.get(name):
            secrets.append(environ[name])
    return secrets


def format_message(event: Mapping[str, Any]) -> str:
    """
    Twisted's C{formatEvent}, at a third of its cost for the formats we log
    (a line per message): a plain PEP 3101 format is filled by C{str.format_map},
    which gives the same text; one with Twisted's C{()} call syntax, a
    flattened event, or one that does not format (Twisted then says so) goes
    to C{formatEvent}.
    """
    text = event.get("log_format")
    if type(text) is str and "()" not in text and "log_flattened" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


def _utc(event: Mapping[str, Any]) -> datetime:
    when = event.get("log_time")
    return datetime.fromtimestamp(when, timezone.utc) if when is not None else datetime.now(timezone.utc)


_TEXT_STAMP = PerSecond(lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _text_stamp(event: Mapping[str, Any]) -> str:
    when = event.get("log_time")
    return _TEXT_STAMP(when if when is not None else time.time())


def _level(event: Mapping[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if level is not None else "-"


def _text_line(event: Mapping[str, Any], mask: Callable[[str], str]) -> str | None:
    if "log_failure" in event:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    else:
        text = format_message(event)
    if not text:
        return None
    stamp = _text_stamp(event)
    namespace = event.get("log_namespace", "-")
    # Continuation lines (tracebacks, multi-line messages) are indented, as in
    # Twisted's classic format, so every record starts at column 0.
    return mask(f"{stamp} [{namespace}#{_level(event)}] " + text.replace("\n", "\n\t"))


def _json_value(value: Any, mask: Callable[[str], str]) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return mask(value if isinstance(value, str) else str(value))


def _json_line(event: Mapping[str, Any], mask: Callable[[str], str]) -> str:
    record = {
        "time": _utc(event).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _level(event),
        "namespace": event.get("log_namespace", "-"),
        "message": mask(format_message(event)),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = mask(failure.getTraceback())
    for key, value in event.items():
        # Legacy log.err events repeat the failure under "failure": it is
        # already in "traceback".
        if key.startswith("log_") or key in JSON_KEYS or isinstance(value, Failure):
            continue
        record[key] = _json_value(value, mask)
    return json.dumps(record)


def _formatter(
    render: Callable[[Mapping[str, Any], Callable[[str], str]], str | None], secrets: Iterable[str]
) -> Callable[[Mapping[str, Any]], str | None]:
    """
    One record per event, secrets masked. Debug events are dropped: they are
    for development (the ops endpoint logs every probe at debug).
    """
    mask = masker(secrets)

    def format_event(event: Mapping[str, Any]) -> str | None:
        if event.get("log_level") is LogLevel.debug:
            return None
        line = render(event, mask)
        return None if line is None else line + "\n"

    return format_event


def event_formatter(log_format: str, secrets: Iterable[str] = ()) -> Callable[[Mapping[str, Any]], str | None]:
    """
    Formats an event as C{text} (one readable line, UTC timestamp) or C{json}
    (one JSON object per line), with C{secrets} masked, for a L{FileLogObserver}.
    """
    if log_format == "text":
        return _formatter(_text_line, secrets)
    if log_format == "json":
        return _formatter(_json_line, secrets)
    raise ValueError(f"unknown log format {log_format!r}: expected one of {', '.join(FORMATS)}")


def make_observer(log_format: str, stream: TextIO, secrets: Iterable[str] = ()) -> ILogObserver:
    """An observer writing events to C{stream} as L{event_formatter} formats them."""
    return FileLogObserver(stream, event_formatter(log_format, secrets))


def twistd_logger_for(
    server_options: Mapping[str, Any], log_format: str, secrets: Iterable[str] = ()
) -> Callable[[], ILogObserver]:
    """
    A factory, as twistd's C{--logger} expects, for the observer twistd itself
    would make (stdout with C{--nodaemon}, else C{--logfile}, default
    C{twistd.log}, rotated on SIGUSR1), formatting with L{event_formatter}.

    Twisted has no public way to get that observer with another format: a
    C{--logger} replaces twistd's own choice of destination. So this asks
    L{mailingest.twisted_private.twistd_log_observer} for it and sets the
    public C{formatEvent} of the L{FileLogObserver} it returns.
    """
    format_event = event_formatter(log_format, secrets)

    def factory() -> ILogObserver:
        observer = twistd_log_observer(server_options)
        observer.formatEvent = format_event
        return observer

    return factory


def twistd_observer() -> ILogObserver:
    """Called by twistd, which knows this function by the name L{TWISTD_LOGGER}."""
    if _twistd_observer_factory is None:
        return make_observer("text", sys.stdout)
    return _twistd_observer_factory()


def install_twistd_logger(
    plugin_options: usage.Options,
    log_format: str,
    database: str | None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """
    Make twistd log through L{event_formatter} in C{log_format} with the
    daemon's secrets (L{daemon_secrets}) masked. Call it from the plugin's C{postOptions}.

    twistd builds its log observer from its C{--logger} option (a dotted
    name) after all options are parsed and before the application starts, so
    this fills that option in. An operator's own C{--logger} or C{--syslog}
    wins. Outside twistd (no parent options) it does nothing.
    """
    global _twistd_observer_factory
    server_options = getattr(plugin_options, "parent", None)
    if server_options is None or server_options.get("logger") or server_options.get("syslog"):
        return
    _twistd_observer_factory = twistd_logger_for(
        server_options, log_format, daemon_secrets(database, environ)
    )
    server_options["logger"] = TWISTD_LOGGER
