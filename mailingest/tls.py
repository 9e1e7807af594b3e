"""TLS server context from PEM files: a certificate chain and its private key."""

import re

from OpenSSL import crypto
from twisted.internet import ssl

from mailingest.errors import ConfigError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_tls(cert_path: str, key_path: str) -> ssl.CertificateOptions:
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
    except Exception as e:
        raise ConfigError(f"cannot load TLS certificate or key: {e}") from None
    return ssl.CertificateOptions(
        privateKey=key.original,
        certificate=certs[0].original,
        extraCertChain=[c.original for c in certs[1:]],
    )
