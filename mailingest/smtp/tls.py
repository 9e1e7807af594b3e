"""
TLS for SMTP: a certificate chain and key from PEM files, reloadable on SIGHUP,
for STARTTLS and for implicit-TLS (C{ssl:}) listeners alike.
"""

import re

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mailingest.errors import ConfigError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
IMPLICIT_TLS_PREFIX = "ssl:"


def _load(cert_path: str, key_path: str) -> tuple[ssl.CertificateOptions, x509.Certificate]:
    try:
        with open(cert_path, "rb") as f:
            chain = _PEM_CERT.findall(f.read())
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read TLS files: {e.filename}: {e.strerror}") from None
    if not chain:
        raise ConfigError(f"{cert_path} holds no PEM certificate")
    try:
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        certs = [ssl.Certificate.loadPEM(pem) for pem in chain]
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs[0].original,
            extraCertChain=[c.original for c in certs[1:]],
        )
        options.getContext()
    except Exception as e:
        raise ConfigError(f"cannot load TLS certificate or key: {e}") from None
    return options, certs[0].original.to_cryptography()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    The server side of TLS from a certificate chain and key on disk.

    Each new TLS connection (STARTTLS or implicit) takes the context current
    when it starts, so L{reload} after a certificate renewal applies to every
    later connection without reopening any listener; connections already
    encrypted keep theirs.
    """

    def __init__(self, cert_path: str, key_path: str):
        self.cert_path = cert_path
        self.key_path = key_path
        self._options, self.certificate = _load(cert_path, key_path)

    def reload(self) -> None:
        """Read the files again; on error (ConfigError) the previous certificate stays."""
        self._options, self.certificate = _load(self.cert_path, self.key_path)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def describe(self) -> str:
        """The certificate for the log: subject, names and expiry."""
        return describe_certificate(self.certificate)


def describe_certificate(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = ", ".join(str(name.value) for name in names)
    except x509.ExtensionNotFound:
        sans = "none"
    expires = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"subject {cert.subject.rfc4514_string()}, SANs {sans}, expires {expires}"


def implicit_tls_endpoint(reactor, description: str) -> tuple[endpoints.SSL4ServerEndpoint, ReloadableTLS]:
    """
    An C{ssl:} endpoint string as Twisted reads it (C{ssl:465:privateKey=KEY:
    certKey=CERT:interface=...:backlog=...}), built on a L{ReloadableTLS}
    instead of the fixed context C{serverFromString} would make, so SIGHUP
    renews its certificate too. This is Twisted's own SSL4ServerEndpoint with
    a connection creator we own: no wrapping of the listening factory, and
    C{getHost}, C{ISSLTransport} and C{startTLS} behave exactly as before.
    The chain belongs in the C{certKey} file (like C{--tls-cert});
    C{extraCertChain}, C{sslmethod} and C{dhParameters} are refused.
    """
    args, kwargs = _fields(description[len(IMPLICIT_TLS_PREFIX):])
    unsupported = sorted(set(kwargs) - {"port", "privateKey", "certKey", "interface", "backlog"})
    if unsupported:
        raise ConfigError(
            f"bad SMTP endpoint {description!r}: {', '.join(unsupported)} not supported "
            "(put the chain in the certKey file)"
        )
    if args:
        kwargs.setdefault("port", args.pop(0))
    if args or "port" not in kwargs:
        raise ConfigError(f"bad SMTP endpoint {description!r}: use ssl:PORT:privateKey=KEY:certKey=CERT")
    key = kwargs.get("privateKey", "server.pem")
    try:
        port, backlog = int(kwargs["port"]), int(kwargs.get("backlog", 50))
    except ValueError as e:
        raise ConfigError(f"bad SMTP endpoint {description!r}: {e}") from None
    tls = ReloadableTLS(kwargs.get("certKey", key), key)
    endpoint = endpoints.SSL4ServerEndpoint(reactor, port, tls, backlog, kwargs.get("interface", ""))
    return endpoint, tls


def _fields(text: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint-string syntax: ':'-separated fields, 'key=value', backslash escapes."""
    fields, escaped = [[""]], False
    for char in text:
        if escaped:
            fields[-1][-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append([""])
        elif char == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    args = [field[0] for field in fields if len(field) == 1]
    return args, {field[0]: field[1] for field in fields if len(field) == 2}
