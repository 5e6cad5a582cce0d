"""Issuing the cluster's certificates: one CA, and a certificate per identity signed by it
(`failoverctl certs init` and `certs issue`).

Layout of a certificates directory::

    ca.crt, ca.key        the CA (ECDSA P-256, self-signed, may sign leaves only)
    NAME.crt, NAME.key    one identity: ECDSA P-256, signed by the CA

A leaf certificate carries its identity (`failover.core.permissions.Identity`) three ways:

* the URI subject alternative name ``failover://ROLE/NAME``: the one the servers read
  (`failover.net.tls.peer_identity`);
* the subject, as common name NAME and organizational unit ROLE, for people
  (``openssl x509 -noout -subject``);
* the DNS subject alternative name NAME, so a caller that knows the name of the peer it dials
  (an agent's host id) can check it (`failover.net.channels.secure_channel(server_name=)`).

The ``--san`` hosts and IP addresses are added as DNS and IP subject alternative names: a
client dialling ``10.0.0.5:7100`` checks that the server's certificate names ``10.0.0.5``.
Keys are written 0600 (`failover.storage.modes`); no file is ever overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from failover.core.permissions import (
    AGENT,
    COORDINATOR,
    Identity,
    check_identity_name,
    identity_uri,
)
from failover.errors import ConfigError, InvalidRequest
from failover.storage.modes import make_private_dir, write_private_file

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 365
ORGANIZATION = "failover"
# Backdate a certificate's start a little: a peer whose clock is behind still accepts it.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_DNS_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")

PrivateKey = ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> PrivateKey:
    """A fresh ECDSA P-256 key: small, fast, and what every TLS stack speaks."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(*, days: int = CA_DAYS, key: PrivateKey | None = None,
            not_before: datetime.datetime | None = None,
            common_name: str = "failover CA") -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA certificate valid for `days` and its key; it may sign leaf
    certificates only (path length 0)."""
    key = key or new_key()
    start = not_before or (_now() - CLOCK_SKEW)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def san_entry(text: str) -> x509.GeneralName:
    """A ``--san`` value as an IP address or a DNS name; ConfigError if it is neither."""
    value = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) > 253 or not _DNS_RE.fullmatch(value):
        raise ConfigError(f"--san {text!r} is neither an IP address nor a host name")
    return x509.DNSName(value)


def issue(ca_cert: x509.Certificate, ca_key: PrivateKey, identity: Identity, *,
          sans: Iterable[str] = (), days: int = LEAF_DAYS, key: PrivateKey | None = None,
          not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None) -> tuple[x509.Certificate, PrivateKey]:
    """A certificate for `identity` signed by the CA, and its key. Valid from `not_before`
    (default: now less `CLOCK_SKEW`) for `days`, or until `not_after` when given."""
    key = key or new_key()
    start = not_before or (_now() - CLOCK_SKEW)
    end = not_after or (start + datetime.timedelta(days=days))
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(identity_uri(identity)),
        x509.DNSName(identity.name),
    ]
    for text in sans:
        entry = san_entry(text)
        if entry not in names:
            names.append(entry)
    # Daemons both serve and dial; the command-line roles only dial.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.role in (AGENT, COORDINATOR):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey,
                what: str) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    for path in (cert_path, key_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists: {what} is never overwritten; move it away first")
    write_private_file(key_path, key_pem(key))
    try:
        write_private_file(cert_path, cert_pem(cert))
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise
    return cert_path, key_path


def init_ca(directory: str | Path, *, days: int = CA_DAYS) -> tuple[Path, Path]:
    """Makes a CA in `directory` (created 0700 if missing) as ca.crt and ca.key (0600);
    refuses (ConfigError) if either exists. Returns their paths."""
    if days < 1:
        raise ConfigError(f"--days {days}: a CA must be valid for at least a day")
    target = Path(directory)
    try:
        make_private_dir(target)
        cert, key = make_ca(days=days)
        return _write_pair(target, "ca", cert, key, "a CA")
    except OSError as exc:
        raise ConfigError(f"cannot write the CA to {target}: {exc.strerror or exc}") from exc


def load_ca(directory: str | Path) -> tuple[x509.Certificate, PrivateKey]:
    """The CA that `init_ca` wrote in `directory`; ConfigError naming the file otherwise."""
    target = Path(directory)
    cert_path, key_path = target / CA_CERT, target / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"CA certificate {cert_path}: {exc.strerror or exc}; make one with "
                          "`failoverctl certs init DIR`") from exc
    except ValueError as exc:
        raise ConfigError(f"CA certificate {cert_path} is not a PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"CA key {key_path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"CA key {key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {key_path} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"CA key {key_path} does not match the CA certificate {cert_path}")
    return cert, key


def issue_to_dir(directory: str | Path, role: str, name: str, *, sans: Iterable[str] = (),
                 days: int = LEAF_DAYS) -> tuple[Path, Path]:
    """Issues a certificate for role `role` and name `name` with the CA in `directory`, as
    NAME.crt and NAME.key (0600) there; refuses to overwrite either. Returns their paths."""
    if days < 1:
        raise ConfigError(f"--days {days}: a certificate must be valid for at least a day")
    try:
        check_identity_name(name)
        identity = Identity(role, name)
    except InvalidRequest as exc:
        raise ConfigError(str(exc)) from exc
    ca_cert, ca_key = load_ca(directory)
    cert, key = issue(ca_cert, ca_key, identity, sans=sans, days=days)
    if cert.not_valid_after_utc > ca_cert.not_valid_after_utc:
        raise ConfigError(
            f"--days {days}: the certificate would outlive the CA (valid until "
            f"{ca_cert.not_valid_after_utc:%Y-%m-%d}); issue it for fewer days")
    target = Path(directory)
    try:
        return _write_pair(target, name, cert, key, "a certificate")
    except OSError as exc:
        raise ConfigError(f"cannot write {name}.crt and {name}.key to {target}: "
                          f"{exc.strerror or exc}") from exc
