"""Certificates and mutual TLS (issue 13, items 1 and 2): `failoverctl certs` writes a CA and
certificates, `TlsFiles` refuses bad files by name, and a real gRPC server with
`require_client_auth` reads each role's identity from the peer's certificate and refuses a
foreign-CA, expired, not-yet-valid or missing client certificate at the handshake."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner
from cryptography import x509

from failover.cli.main import cli, main
from failover.core.permissions import ROLES, Identity
from failover.errors import ConfigError
from failover.net import certs, channels
from failover.net.authorization import RoleCheck
from failover.net.tls import TlsFiles, TlsMaterial, identity_of, peer_identity

METHOD = "/test.Echo/Call"
SERVER = Identity("agent", "h1")
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certs_cli(*args: str) -> None:
    result = CliRunner().invoke(cli, ["certs", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the server's certificate (agent h1 at 127.0.0.1) and one caller per role."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    certs_cli("init", str(directory))
    certs_cli("issue", str(directory), "--role", "agent", "--name", "h1", "--san", "127.0.0.1")
    for role in ROLES:
        certs_cli("issue", str(directory), "--role", role, "--name", f"{role}-1")
    return directory


def files(directory: Path, name: str) -> TlsFiles:
    return TlsFiles(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


# --- the command line ----------------------------------------------------------------------


def test_certs_init_and_issue_write_0600_keys(tmp_path: Path, umask0: None) -> None:
    directory = tmp_path / "new" / "certs"
    certs_cli("init", str(directory))
    certs_cli("issue", str(directory), "--role", "coordinator", "--name", "coord",
              "--san", "10.0.0.5", "--san", "coord.example", "--san", "::1", "--days", "30")
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.crt", "ca.key", "coord.crt", "coord.key"]
    assert mode(directory) == 0o700
    for name in ("ca.key", "coord.key", "ca.crt", "coord.crt"):
        assert mode(directory / name) == 0o600, name
    cert = x509.load_pem_x509_certificate((directory / "coord.crt").read_bytes())
    assert identity_of(cert) == Identity("coordinator", "coord")
    subject = cert.subject.rfc4514_string()
    assert "CN=coord" in subject and "OU=coordinator" in subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord", "coord.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30)
    loaded = files(directory, "coord").load()
    assert loaded.identity == Identity("coordinator", "coord")


def test_certs_json_output(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--format", "json", "certs", "init", str(tmp_path)])
    assert result.exit_code == 0
    assert '"key": "' in result.output


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_certs_refuse_to_overwrite_and_bad_arguments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    main_ok = ["certs", "init", str(directory)]
    with pytest.raises(SystemExit) as exited:
        main(main_ok)
    assert exited.value.code == 0
    ca_before = (directory / "ca.key").read_bytes()
    assert "ca.crt exists" in _fails(main_ok, capsys)
    assert (directory / "ca.key").read_bytes() == ca_before
    issue = ["certs", "issue", str(directory)]
    assert "--role" in _fails([*issue, "--role", "root", "--name", "h1"], capsys)
    assert "identity name" in _fails([*issue, "--role", "agent", "--name", "../h1"], capsys)
    assert "identity name 'ca'" in _fails([*issue, "--role", "agent", "--name", "ca"], capsys)
    assert "--san 'a b'" in _fails(
        [*issue, "--role", "agent", "--name", "h1", "--san", "a b"], capsys)
    assert "outlive the CA" in _fails(
        [*issue, "--role", "agent", "--name", "h1", "--days", "99999"], capsys)
    assert not (directory / "h1.key").exists()
    with pytest.raises(SystemExit):
        main([*issue, "--role", "agent", "--name", "h1"])
    assert "h1.crt exists" in _fails([*issue, "--role", "client", "--name", "h1"], capsys)
    assert "CA certificate" in _fails(
        ["certs", "issue", str(tmp_path), "--role", "agent", "--name", "h2"], capsys)


# --- loading -------------------------------------------------------------------------------


def test_tls_files_load(pki: Path) -> None:
    loaded = files(pki, "operator-1").load()
    assert loaded.identity == Identity("operator", "operator-1")
    assert loaded.ca_pem == (pki / "ca.crt").read_bytes()
    assert "BEGIN" not in repr(loaded)  # no key material in logs
    assert TlsFiles(str(pki / "ca.crt"), "c", "k").cert == Path("c")


def test_tls_files_refused_by_name(pki: Path, tmp_path: Path) -> None:
    good = files(pki, "client-1")
    with pytest.raises(ConfigError, match=f"TLS key {tmp_path / 'missing.key'}: No such"):
        TlsFiles(good.ca, good.cert, tmp_path / "missing.key").load()
    with pytest.raises(ConfigError, match=f"TLS key {pki / 'admin-1.key'} is not the key of"):
        TlsFiles(good.ca, good.cert, pki / "admin-1.key").load()
    (tmp_path / "junk.crt").write_bytes(b"not a cert")
    with pytest.raises(ConfigError, match="junk.crt is not a PEM certificate"):
        TlsFiles(tmp_path / "junk.crt", good.cert, good.key).load()
    with pytest.raises(ConfigError, match="TLS key .*ca.crt is not an unencrypted PEM"):
        TlsFiles(good.ca, good.cert, good.ca).load()
    other = tmp_path / "other"
    certs.init_ca(other)
    with pytest.raises(ConfigError, match=f"{good.cert} is not signed by the CA in "
                                          f"{other / 'ca.crt'}"):
        TlsFiles(other / "ca.crt", good.cert, good.key).load()
    with pytest.raises(ConfigError, match="expired on"):
        good.load(now=NOW + 400 * DAY)
    with pytest.raises(ConfigError, match="not valid before"):
        good.load(now=NOW - DAY)


def test_tls_options_all_or_none() -> None:
    assert TlsFiles.from_options(None, "", None) is None
    assert TlsFiles.from_options("ca", "c", "k") == TlsFiles(Path("ca"), Path("c"), Path("k"))
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key missing"):
        TlsFiles.from_options("ca", None, "")


def test_a_certificate_without_identity_is_refused(pki: Path, tmp_path: Path) -> None:
    ca_cert, ca_key = certs.load_ca(pki)
    cert, key = certs.issue(ca_cert, ca_key, Identity("client", "c"))
    bare = (
        x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
        .sign(ca_key, certs.hashes.SHA256())
    )
    (tmp_path / "bare.crt").write_bytes(certs.cert_pem(bare))
    (tmp_path / "bare.key").write_bytes(certs.key_pem(key))
    with pytest.raises(ConfigError, match="bare.crt names no failover identity"):
        TlsFiles(pki / "ca.crt", tmp_path / "bare.crt", tmp_path / "bare.key").load()


# --- a real server -------------------------------------------------------------------------


@dataclass
class EchoServer:
    address: str
    seen: list[Identity | None]


async def _serve(tls: TlsMaterial | None) -> tuple[grpc.aio.Server, EchoServer]:
    seen: list[Identity | None] = []

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(peer_identity(context))
        return request

    server = channels.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})])
    port = channels.add_port(server, "127.0.0.1:0", tls)
    assert port > 0
    await server.start()
    return server, EchoServer(f"127.0.0.1:{port}", seen)


@pytest.fixture
async def tls_server(pki: Path) -> AsyncIterator[EchoServer]:
    server, echo = await _serve(files(pki, SERVER.name).load())
    yield echo
    await server.stop(None)


async def _call(channel: grpc.aio.Channel) -> bytes:
    async with channel:
        return await channel.unary_unary(METHOD)(b"ping", timeout=5)


async def _refused(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("role", ROLES)
async def test_the_server_reads_each_roles_identity(
        pki: Path, tls_server: EchoServer, role: str) -> None:
    tls = files(pki, f"{role}-1").load()
    assert await _call(channels.channel(tls_server.address, tls)) == b"ping"
    assert tls_server.seen == [Identity(role, f"{role}-1")]


async def test_the_server_is_checked_by_name_too(pki: Path, tls_server: EchoServer) -> None:
    tls = files(pki, "client-1").load()
    port = tls_server.address.rsplit(":", 1)[1]
    # Dialled by a name its certificate does not carry: refused, unless told whom to expect.
    await _refused(channels.secure_channel(f"localhost:{port}", tls, own_connection=True))
    assert await _call(channels.secure_channel(f"localhost:{port}", tls,
                                               server_name=SERVER.name)) == b"ping"
    await _refused(channels.secure_channel(tls_server.address, tls, server_name="h2",
                                           own_connection=True))
    assert tls_server.seen == [Identity("client", "client-1")]


def _credentials(ca_pem: bytes, cert: x509.Certificate | None = None,
                 key: certs.PrivateKey | None = None) -> grpc.ChannelCredentials:
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=certs.key_pem(key),
                                        certificate_chain=certs.cert_pem(cert))


def _raw_channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


async def test_bad_client_certificates_fail_the_handshake(
        pki: Path, tls_server: EchoServer, tmp_path: Path) -> None:
    ca_pem = (pki / "ca.crt").read_bytes()
    ca_cert, ca_key = certs.load_ca(pki)
    admin = Identity("admin", "root-1")
    foreign_ca, foreign_key = certs.make_ca()
    bad = {
        "foreign CA": certs.issue(foreign_ca, foreign_key, admin),
        "expired": certs.issue(ca_cert, ca_key, admin, not_before=NOW - 10 * DAY,
                               not_after=NOW - DAY),
        "not yet valid": certs.issue(ca_cert, ca_key, admin, not_before=NOW + DAY, days=10),
    }
    for cert, key in bad.values():
        await _refused(_raw_channel(tls_server.address, _credentials(ca_pem, cert, key)))
    await _refused(_raw_channel(tls_server.address, _credentials(ca_pem)))  # no certificate
    await _refused(channels.insecure_channel(tls_server.address, own_connection=True))
    assert tls_server.seen == []
    # The same CA and identity, valid now: accepted, so the refusals above were the dates'.
    good = certs.issue(ca_cert, ca_key, admin)
    assert await _call(_raw_channel(tls_server.address, _credentials(ca_pem, *good))) == b"ping"
    assert tls_server.seen == [admin]


async def test_a_client_refuses_a_server_of_another_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certs.init_ca(other)
    certs.issue_to_dir(other, "agent", "h1", sans=["127.0.0.1"])
    server, echo = await _serve(files(other, "h1").load())
    try:
        await _refused(channels.channel(echo.address, files(pki, "admin-1").load(),
                                        own_connection=True))
        assert echo.seen == []
    finally:
        await server.stop(None)


async def test_without_tls_channels_and_servers_work_as_before() -> None:
    server, echo = await _serve(None)
    try:
        assert await _call(channels.channel(echo.address)) == b"ping"
        assert await _call(channels.insecure_channel(echo.address)) == b"ping"
        assert echo.seen == [None, None]
    finally:
        await server.stop(None)


def test_no_clear_text_beyond_loopback_unless_told() -> None:
    for loopback in ("127.0.0.1:7100", "localhost:7100", "[::1]:7100", "127.0.0.2:0"):
        channels.check_listen(loopback, tls=False, insecure=False)
    for open_address in ("0.0.0.0:7100", "10.0.0.5:7100", "[::]:7100", "host.example:7100"):
        refusal = re.escape(f"refusing to listen on {open_address} without TLS")
        with pytest.raises(ConfigError, match=refusal):
            channels.check_listen(open_address, tls=False, insecure=False)
        channels.check_listen(open_address, tls=True, insecure=False)
        channels.check_listen(open_address, tls=False, insecure=True)


# --- the role check in front of the handlers ----------------------------------------------


async def _serve_checked(tls: TlsMaterial) -> tuple[grpc.aio.Server, str, list[str]]:
    """A TLS server with `RoleCheck` and stand-in handlers, of each streaming shape, under
    real method names (and one the table does not know); returns the methods that ran."""
    ran: list[str] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ran.append("unary")
        return request

    async def generator(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ran.append("generator")
        yield b"one"
        yield b"two"

    async def writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
        ran.append("writer")
        await context.write(b"written")

    async def stream_in(requests: AsyncIterator[bytes],
                        context: grpc.aio.ServicerContext) -> bytes:
        ran.append("stream_in")
        return b"".join([r async for r in requests])

    async def both(requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ran.append("both")
        async for request in requests:
            yield request

    server = channels.server(interceptors=[RoleCheck()])
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("failover.v1.Coordinator", {
            "Switchover": grpc.unary_unary_rpc_method_handler(unary),
            "WatchRoutes": grpc.unary_stream_rpc_method_handler(generator),
            "Patch": grpc.unary_stream_rpc_method_handler(writer),
            "Bogus": grpc.unary_unary_rpc_method_handler(unary),
        }),
        grpc.method_handlers_generic_handler("failover.v1.Replication", {
            "InstallSnapshot": grpc.stream_unary_rpc_method_handler(stream_in),
            "Ship": grpc.stream_stream_rpc_method_handler(both),
        }),
    ])
    port = channels.add_port(server, "127.0.0.1:0", tls)
    await server.start()
    return server, f"127.0.0.1:{port}", ran


async def _invoke(channel: grpc.aio.Channel, method: str, *, send: bool = True) -> list[bytes]:
    """Calls `method` in its shape; with `send` False a client stream sends nothing (see
    below)."""
    async def requests() -> AsyncIterator[bytes]:
        if not send:
            await asyncio.Event().wait()  # until the call ends and the iterator is cancelled
        yield b"a"
        yield b"b"

    name = method.rsplit("/", 1)[1]
    if name in ("Switchover", "Bogus"):
        return [await channel.unary_unary(method)(b"x", timeout=5)]
    if name in ("WatchRoutes", "Patch"):
        return [reply async for reply in channel.unary_stream(method)(b"x", timeout=5)]
    if name == "InstallSnapshot":
        return [await channel.stream_unary(method)(requests(), timeout=5)]
    return [reply async for reply in channel.stream_stream(method)(requests(), timeout=5)]


CHECKED = [
    # caller role, method, what the handler sends back, or the refusal's words
    ("client", "Coordinator/WatchRoutes", [b"one", b"two"]),
    ("client", "Coordinator/Switchover",
     "client 'client-1' may not switchover: it needs role operator or admin"),
    ("operator", "Coordinator/Switchover", [b"x"]),
    ("operator", "Coordinator/Patch", "operator 'operator-1' may not patch: it needs role admin"),
    ("admin", "Coordinator/Patch", [b"written"]),
    ("agent", "Replication/Ship", [b"a", b"b"]),
    ("agent", "Replication/InstallSnapshot", [b"ab"]),
    ("agent", "Coordinator/Switchover", "agent 'agent-1' may not switchover"),
    ("coordinator", "Replication/Ship", "coordinator 'coordinator-1' may not ship: it needs "
                                        "role agent"),
    ("admin", "Coordinator/Bogus", "may not call /failover.v1.Coordinator/Bogus"),
]


async def test_the_role_check_refuses_before_the_handler_runs(pki: Path) -> None:
    server, address, ran = await _serve_checked(files(pki, SERVER.name).load())
    try:
        for role, method, expected in CHECKED:
            full = f"/failover.v1.{method}"
            ran.clear()
            async with channels.channel(address, files(pki, f"{role}-1").load()) as channel:
                if isinstance(expected, list):
                    assert await _invoke(channel, full) == expected, (role, method)
                    assert len(ran) == 1
                    continue
                # A client that is still writing when the server refuses may report INTERNAL
                # ("Failed execute_batch") instead of the server's status: a grpc aio client
                # bug (grpc/grpc#36066). The refusal here is the server's either way.
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _invoke(channel, full, send=False)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, method)
            assert expected in (caught.value.details() or ""), (role, method)
            assert ran == [], (role, method)
    finally:
        await server.stop(None)
