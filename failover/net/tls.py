"""Mutual TLS for every channel: the files a process presents (`TlsFiles`), checked when they
are loaded (`TlsFiles.load`), the gRPC credentials made from them, and the identity of the
peer on the other end of a call (`peer_identity`).

Every side presents a certificate of the cluster's CA (`failover.net.certs`) and accepts only
peers with one: a server asks for and verifies the client's certificate
(`server_credentials`, ``require_client_auth``), a channel verifies the server's against the
same CA (`channel_credentials`). Which peer may do what is `failover.core.permissions`.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from failover.core.permissions import Identity, parse_identity_uri
from failover.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files a process proves itself with: the cluster's CA certificate, its own
    certificate and its key (``--tls-ca``, ``--tls-cert``, ``--tls-key``)."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            object.__setattr__(self, name, Path(getattr(self, name)))

    @classmethod
    def from_options(cls, ca: str | Path | None, cert: str | Path | None,
                     key: str | Path | None) -> TlsFiles | None:
        """The files of ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (or their TOML keys and
        environment variables): all three, or None when none is given; ConfigError when only
        some are."""
        given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
        missing = [flag for flag, value in given.items() if not value]
        if len(missing) == len(given):
            return None
        if missing:
            raise ConfigError(f"TLS needs all of --tls-ca, --tls-cert and --tls-key: "
                              f"{', '.join(missing)} missing")
        return cls(Path(str(ca)), Path(str(cert)), Path(str(key)))

    def load(self, *, now: datetime.datetime | None = None) -> TlsMaterial:
        """Reads and checks the three files: each exists and parses, the key is the
        certificate's, the certificate is signed by the CA, carries a failover identity and is
        valid now. Raises ConfigError naming the file and what is wrong with it."""
        ca_pem, ca = _read_cert(self.ca, "CA certificate")
        cert_pem, cert = _read_cert(self.cert, "certificate")
        key_pem = _read(self.key, "key")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"TLS key {self.key} is not an unencrypted PEM private "
                              "key") from exc
        if key.public_key() != cert.public_key():
            raise ConfigError(f"TLS key {self.key} is not the key of the certificate "
                              f"{self.cert}: pass the .key file issued with it")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ConfigError(f"TLS certificate {self.cert} is not signed by the CA in "
                              f"{self.ca}: issue it with that CA (failoverctl certs issue)"
                              ) from exc
        identity = identity_of(cert)
        if identity is None:
            raise ConfigError(f"TLS certificate {self.cert} names no failover identity (no "
                              "failover://ROLE/NAME subject alternative name): issue it with "
                              "failoverctl certs issue")
        moment = now or datetime.datetime.now(datetime.UTC)
        for path, what, c in ((self.ca, "CA certificate", ca), (self.cert, "certificate", cert)):
            if moment > c.not_valid_after_utc:
                raise ConfigError(f"TLS {what} {path} expired on "
                                  f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue a new one")
            if moment < c.not_valid_before_utc:
                raise ConfigError(f"TLS {what} {path} is not valid before "
                                  f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                                  "host's clock")
        return TlsMaterial(self, ca_pem, cert_pem, key_pem, identity, cert.not_valid_after_utc)


@dataclass(frozen=True)
class TlsMaterial:
    """What `TlsFiles.load` read and checked: the PEM bytes, the identity the certificate
    carries and when it expires."""

    files: TlsFiles
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    identity: Identity
    not_after: datetime.datetime


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"TLS {what} {path}: {exc.strerror or exc}") from exc


def _read_cert(path: Path, what: str) -> tuple[bytes, x509.Certificate]:
    pem = _read(path, what)
    try:
        return pem, x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"TLS {what} {path} is not a PEM certificate") from exc


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The identity a certificate carries (its one ``failover://ROLE/NAME`` URI subject
    alternative name); None if it carries none, or more than one."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return _one_identity(sans.get_values_for_type(x509.UniformResourceIdentifier))


def _one_identity(uris: Iterable[str]) -> Identity | None:
    found = {parse_identity_uri(uri) for uri in uris}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    """Credentials for a server port: it presents `tls`'s certificate and refuses any client
    without a certificate signed by the CA (expired, not yet valid and foreign ones too)."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem,
        require_client_auth=True)


def channel_credentials(tls: TlsMaterial) -> grpc.ChannelCredentials:
    """Credentials for a channel: it presents `tls`'s certificate and trusts only servers
    whose certificate the CA signed."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem)


@functools.lru_cache(maxsize=1024)
def _identity_of_pem(pem: bytes) -> Identity | None:
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def peer_identity(context: Any) -> Identity | None:
    """The identity in the certificate of the peer of a call (`context`, a servicer context);
    None if the call came without TLS or the certificate carries no failover identity. The
    TLS handshake has verified the certificate against the CA already."""
    auth = context.auth_context() or {}
    if b"ssl" not in auth.get("transport_security_type", ()):
        return None
    if "peer_uri" in auth:  # the certificate's URI subject alternative names, as grpc read them
        return _one_identity(uri.decode("utf-8", "replace") for uri in auth["peer_uri"])
    pems = auth.get("x509_pem_cert") or ()
    return _identity_of_pem(bytes(pems[0])) if pems else None
