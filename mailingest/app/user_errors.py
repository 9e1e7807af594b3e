"""
The one line an operator reads for an error they can act on (a database
that refuses, a directory that cannot be made), shared by the admin command
and twistd's start-up: a traceback is for a bug.
"""

import sqlite3
import sys
from collections.abc import Iterable

from mailingest.errors import MailingestError
from mailingest.ops.secrets import masker, redact_url


def one_line(text: str, secrets: Iterable[str] = ()) -> str:
    """C{text} on one line, without C{secrets}."""
    text = masker(secrets)(text)
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def database_errors() -> tuple[type[BaseException], ...]:
    """Errors of the database drivers loaded so far: an unloaded driver raises nothing."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is not None:
        errors.append(psycopg2.Error)
    return tuple(errors)


def describe_os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


def user_message(error: BaseException, database_url: str | None) -> str | None:
    """The one line for an error the operator can act on, None for a bug."""
    if isinstance(error, MailingestError):
        return str(error)
    if isinstance(error, database_errors()):
        return f"database {redact_url(database_url)}: {error}"
    if isinstance(error, OSError):
        return describe_os_error(error)
    return None
