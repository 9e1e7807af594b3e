"""
The local paths in C{--database} and C{--storage} URLs.

Relative paths are relative to the working directory, as an operator typing
them expects.
"""

from urllib.parse import urlsplit

from mailingest.errors import ConfigError


def url_scheme(url: str) -> str:
    """The scheme of a C{--database} or C{--storage} URL, lower case (C{sqlite}, C{postgresql}, C{file}, C{s3})."""
    return url.split(":", 1)[0].lower()


def sqlite_path(url: str) -> str:
    """C{sqlite:///rel/path.db} or C{sqlite:////abs/path.db} to a file path."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ConfigError(
            f"bad database URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return url[len("sqlite:///"):]


def local_dir(url: str) -> str:
    """C{file:relative/dir} or C{file:///absolute/dir} to a directory path."""
    rest = url[len("file:"):]
    if rest.startswith("//"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"bad storage URL {url!r}: file URLs name a local directory")
        rest = parts.path
    if not rest:
        raise ConfigError(f"bad storage URL {url!r}: use file:relative/dir or file:///absolute/dir")
    return rest
