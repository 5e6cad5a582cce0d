"""`failoverctl` operator commands that talk to the coordinator: status, hosts, create,
delete, switchover, drain, undrain, history, and call (one request to a service through the
smart client).

Every coordinator call has a deadline (`--timeout-ms`, default 5 s, per coordinator address).
With several `--coordinator` addresses they are tried in order, each once; a coordinator that
is UNAVAILABLE (and, for read-only calls, one that does not answer in time) passes the call to
the next, except that a follower naming the leader (one of the addresses) passes it to the
leader at once (issue 15: only the leader acts; status and history are read from any).
With `--tls-ca/--tls-cert/--tls-key` every call is mutual TLS. Exit status: 0 done; 2 bad
arguments, or the coordinator refused the request (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE, PERMISSION_DENIED: the certificate's role
does not allow it); 1 no coordinator answered or the call failed otherwise. Every failure is
one line on stderr. What is printed, and the JSON contract for scripts, is in `failover.cli.output`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import grpc
import grpc.aio
from google.protobuf.message import Message

from failover import defaults
from failover.cli import output
from failover.client import Client
from failover.core.placement import POLICIES
from failover.core.roles import DUPLICA, PRIMARY
from failover.errors import (
    ConfigError,
    FailoverError,
    InvalidRequest,
    PermissionDenied,
    RequestRejected,
)
from failover.net import channels
from failover.net.address import parse_address_list
from failover.net.leader import LeaderFollower, leader_hint
from failover.net.tls import TlsFiles, TlsMaterial
from failover.v1 import coordinator_pb2, coordinator_pb2_grpc

F = TypeVar("F", bound=Callable[..., Any])

_UINT32_MAX = 2**32 - 1

# The coordinator understood the request and refused it: the operator has to change it.
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,  # the caller's certificate lacks the role
}


class CoordinatorRefused(click.UsageError):
    """The coordinator refused the request (exit 2); the message is the server's, one line."""


class CommandFailed(FailoverError):
    """A command could not be done (exit 1); the message is one line."""


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


def _timeout_option(function: F) -> F:
    return click.option(
        "--timeout-ms", type=click.IntRange(min=1), default=defaults.CALL_DEADLINE_MS,
        show_default=True, help="Deadline of the call, per coordinator address.",
    )(function)


def settings(ctx: click.Context) -> tuple[list[str], bool]:
    """The coordinator addresses and whether JSON was asked for, from the group's options."""
    obj = ctx.obj or {}
    text = obj.get("coordinator") or ""
    addresses = [str(a) for a in parse_address_list(text, what="--coordinator")]
    return addresses, obj.get("format") == "json"


def _tls_files(ctx: click.Context) -> TlsFiles | None:
    """The files of the group's --tls-ca, --tls-cert and --tls-key (None: no TLS)."""
    return TlsFiles.from_options(*((ctx.obj or {}).get("tls") or (None, None, None)))


def tls_material(ctx: click.Context) -> TlsMaterial | None:
    """The TLS material every call presents, loaded and checked once (ConfigError: exit 2,
    naming the file and what is wrong with it)."""
    obj = ctx.obj if ctx.obj is not None else {}
    if "tls_material" not in obj:
        files = _tls_files(ctx)
        obj["tls_material"] = files.load() if files is not None else None
    return obj["tls_material"]


class CoordinatorCaller:
    """Calls one `Coordinator` method on the first of `addresses` that answers (with `tls`,
    over mutual TLS)."""

    def __init__(self, addresses: list[str], tls: TlsMaterial | None = None) -> None:
        if not addresses:
            raise ConfigError("--coordinator is empty: give at least one HOST:PORT")
        self.addresses = addresses
        self.tls = tls
        self.answered_by: str | None = None  # the address that answered the last `call`

    def call(self, method: str, request: Message, *, timeout_ms: int,
             idempotent: bool) -> Any:
        """Runs `method` and returns its reply.

        Raises `CoordinatorRefused` when the coordinator refuses the request and
        `CommandFailed` when no coordinator answered or the call failed otherwise.
        `idempotent` calls also move on to the next address after a missed deadline; others
        do not, since the first coordinator may have done the change.
        """
        return asyncio.run(self._call(method, request, timeout_ms, idempotent))

    def stream(self, method: str, request: Message, on_message: Callable[[Any], None], *,
               timeout_ms: int | None) -> None:
        """Runs a server-streaming `method` on the first coordinator that answers and hands
        each message to `on_message`; errors as for `call`. Not retried elsewhere once a
        message arrived (the operation is under way there). `timeout_ms` None: no deadline
        (a stream that follows events until the caller stops it)."""
        asyncio.run(self._stream(method, request, on_message, timeout_ms))

    def _follower(self) -> LeaderFollower:
        # One pass over the addresses, no wait between them: the operator gets an answer or
        # a one-line failure within about `timeout_ms` per address, never a retry loop.
        return LeaderFollower(self.addresses, backoff_min_ms=0, backoff_max_ms=0)

    async def _stream(self, method: str, request: Message, on_message: Callable[[Any], None],
                      timeout_ms: int | None) -> None:
        tried: list[str] = []
        coordinators = self._follower()
        passed = 0  # addresses that failed without naming the leader
        while passed < len(self.addresses):
            address = coordinators.current
            channel = channels.channel(address, self.tls)
            received = False
            try:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                timeout_s = timeout_ms / 1000 if timeout_ms is not None else None
                async for message in getattr(stub, method)(request, timeout=timeout_s):
                    received = True
                    on_message(message)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = one_line(exc.details() or "")
                if code in _REFUSALS:
                    raise CoordinatorRefused(
                        f"{details or code.name.lower()} ({code.name} from coordinator "
                        f"{address})") from None
                # Refused before it started (no such server, or not the leader): the
                # operation is not under way there, so another coordinator may run it.
                if code == grpc.StatusCode.UNAVAILABLE and not received and (
                        "failed to connect" in details.lower() or _not_leader(exc, details)):
                    tried.append(_unavailable(address, exc, details))
                    coordinators.failed(exc)
                    passed += 0 if coordinators.redirected else 1
                    continue
                raise CommandFailed(f"{method} on coordinator {address} failed: "
                                    f"{details or code.name}") from None
            finally:
                await channel.close()
        raise CommandFailed(
            f"no coordinator answered {method}; tried {', '.join(tried)}; check that a "
            "coordinator runs there, or set --coordinator / FAILOVER_COORDINATOR")

    async def _call(self, method: str, request: Message, timeout_ms: int,
                    idempotent: bool) -> Any:
        tried: list[str] = []
        coordinators = self._follower()
        passed = 0  # addresses that failed without naming the leader
        while passed < len(self.addresses):
            address = coordinators.current
            channel = channels.channel(address, self.tls)
            try:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                reply = await getattr(stub, method)(request, timeout=timeout_ms / 1000)
                self.answered_by = address
                return reply
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = one_line(exc.details() or "")
                if code in _REFUSALS:
                    raise CoordinatorRefused(
                        f"{details or code.name.lower()} ({code.name} from coordinator "
                        f"{address})") from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # Nothing was done there (a follower refuses before acting): the leader
                    # it names is tried next, else the next address.
                    tried.append(_unavailable(address, exc, details))
                    coordinators.failed(exc)
                    passed += 0 if coordinators.redirected else 1
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if idempotent:
                        tried.append(f"{address} (no answer within {timeout_ms} ms)")
                        coordinators.failed(exc)
                        passed += 1
                        continue
                    raise CommandFailed(
                        f"coordinator {address} did not answer {method} within {timeout_ms} "
                        "ms: it may or may not have been done; check `failoverctl status`"
                    ) from None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise CommandFailed(
                        f"coordinator {address} does not implement {method} (an older "
                        "version?)") from None
                raise CommandFailed(
                    f"coordinator {address} failed {method}: {code.name}: {details}") from None
            finally:
                await channel.close()
        raise CommandFailed(
            f"no coordinator answered {method}; tried {', '.join(tried)}; check that a "
            "coordinator runs there, or set --coordinator / FAILOVER_COORDINATOR")


def _not_leader(exc: grpc.aio.AioRpcError, details: str) -> bool:
    """A follower coordinator's refusal (issue 15): it names the leader, or says it is not."""
    return bool(leader_hint(exc)) or "is not the leader" in details


def _unavailable(address: str, exc: grpc.aio.AioRpcError, details: str) -> str:
    """How an UNAVAILABLE address is listed in the failure message."""
    hint = leader_hint(exc)
    if hint:
        return f"{address} (not the leader; the leader is {hint})"
    if "is not the leader" in details:
        return f"{address} (not the leader; no leader known)"
    return f"{address} (unavailable: {details[:200]})" if details else f"{address} (unavailable)"


def _echo_json(document: Any) -> None:
    click.echo(json.dumps(document))


def _stdin_is_interactive() -> bool:
    """True when a person can answer a prompt on stdin."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# --- commands ------------------------------------------------------------------------------


def cluster_status(ctx: click.Context, timeout_ms: int) -> Any:
    """The cluster's status from any coordinator; from the leader when that one is another
    of the addresses: a follower reads the store, which holds no live host metrics and no
    heartbeat ages. Should the leader not answer, the follower's status stands."""
    addresses, _ = settings(ctx)
    caller = CoordinatorCaller(addresses, tls_material(ctx))
    request = coordinator_pb2.ClusterStatusRequest()
    status = caller.call("GetClusterStatus", request, timeout_ms=timeout_ms, idempotent=True)
    leader = next((c.address for c in status.coordinators if c.leader), None)
    if leader is None or leader == caller.answered_by or leader not in addresses:
        return status
    try:
        return CoordinatorCaller([leader], caller.tls).call(
            "GetClusterStatus", request, timeout_ms=timeout_ms, idempotent=True)
    except (CommandFailed, CoordinatorRefused):
        return status


@click.command("status")
@_timeout_option
@click.pass_context
def status_command(ctx: click.Context, timeout_ms: int) -> None:
    """Show hosts and services with their replicas."""
    addresses, as_json = settings(ctx)
    document = output.cluster_status_json(cluster_status(ctx, timeout_ms))
    if as_json:
        _echo_json(document)
        return
    last: dict[str, Any] | None = None
    if document["services"]:
        # The last event of each service, from the newest events: status stands without it
        # (a coordinator too old to keep history, say), so a failure here only omits it.
        try:
            reply = CoordinatorCaller(addresses, tls_material(ctx)).call(
                "GetHistory", coordinator_pb2.HistoryRequest(
                    limit=defaults.STATUS_HISTORY_EVENTS), timeout_ms=timeout_ms,
                idempotent=True)
            last = output.last_events(output.history_json(reply))
        except (CommandFailed, CoordinatorRefused):
            last = None
    output.render_status(output.make_console(), document, last)


@click.command("create")
@click.argument("service")
@click.option("--kind", required=True, help="Service kind: kv, bank, kvcache or a plug-in.")
@click.option("--replicas", type=click.IntRange(min=1), default=2,
              show_default=True, help="Desired replicas, the primary included.")
@click.option("--mode", type=click.Choice(sorted(output.MODE_VALUES)), default="sync",
              show_default=True, help="sync: a write is acknowledged once every in-sync "
              "duplica has it on disk; async: once the primary has.")
@click.option("--placement", type=click.Choice(POLICIES), default=None,
              help="Where its replicas go (default: the coordinator's --placement).")
@_timeout_option
@click.pass_context
def create_command(ctx: click.Context, service: str, kind: str, replicas: int, mode: str,
                   placement: str | None, timeout_ms: int) -> None:
    """Create SERVICE, a replica set of one kind."""
    addresses, as_json = settings(ctx)
    if not service.strip():
        raise click.UsageError("SERVICE is empty: give the service a name")
    if not kind.strip():
        raise click.UsageError("--kind is empty: give a kind such as kv or bank")
    if replicas > _UINT32_MAX:
        raise click.UsageError(f"--replicas {replicas} is over {_UINT32_MAX}")
    request = coordinator_pb2.CreateServiceRequest(
        name=service, kind=kind, replicas=replicas, mode=output.MODE_VALUES[mode],
        placement=placement or "")
    reply = CoordinatorCaller(addresses, tls_material(ctx)).call(
        "CreateService", request, timeout_ms=timeout_ms, idempotent=False)
    document = output.service_json(reply.service)
    if as_json:
        _echo_json(document)
        return
    console = output.make_console()
    console.print(f"created service {service}", markup=False)
    console.print(output.services_table([document]))


@click.command("delete")
@click.argument("service")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_timeout_option
@click.pass_context
def delete_command(ctx: click.Context, service: str, yes: bool, timeout_ms: int) -> None:
    """Delete SERVICE and its replicas (asks unless --yes)."""
    addresses, as_json = settings(ctx)
    if not yes:
        if not _stdin_is_interactive():
            raise click.UsageError(
                f"delete {service}: stdin is not a terminal, so nobody can confirm; "
                "pass --yes to delete without asking")
        click.confirm(f"Delete service {service!r} and every replica of it?", abort=True,
                      err=True)
    CoordinatorCaller(addresses, tls_material(ctx)).call(
        "DeleteService", coordinator_pb2.DeleteServiceRequest(name=service),
        timeout_ms=timeout_ms, idempotent=False)
    if as_json:
        _echo_json({"deleted": service})
    else:
        click.echo(f"deleted service {service}")


@click.command("switchover")
@click.argument("service")
@click.option("--to", "to_host", default="", metavar="HOST",
              help="Host to hand the primary role to (default: the coordinator picks an "
              "in-sync duplica).")
@_timeout_option
@click.pass_context
def switchover_command(ctx: click.Context, service: str, to_host: str, timeout_ms: int) -> None:
    """Hand SERVICE's primary role to a duplica (planned).

    Clients see a short stall, no failed request.
    """
    addresses, as_json = settings(ctx)
    request = coordinator_pb2.SwitchoverRequest(service=service, to_host_id=to_host)
    reply = CoordinatorCaller(addresses, tls_material(ctx)).call(
        "Switchover", request, timeout_ms=timeout_ms, idempotent=False)
    document = output.switchover_json(service, reply)
    if as_json:
        _echo_json(document)
    else:
        click.echo(f"switched over {service}: primary {reply.primary_host_id}, epoch "
                   f"{reply.epoch}, stall {reply.stall_ms} ms")


@click.command("hosts")
@_timeout_option
@click.pass_context
def hosts_command(ctx: click.Context, timeout_ms: int) -> None:
    """Show hosts: resources, zone, state, draining and the replicas each holds."""
    _, as_json = settings(ctx)
    documents = output.hosts_json(cluster_status(ctx, timeout_ms))
    if as_json:
        _echo_json(documents)
    elif not documents:
        click.echo("no hosts registered")
    else:
        output.make_console().print(output.hosts_detail_table(documents))


def _set_draining(ctx: click.Context, host: str, draining: bool, timeout_ms: int,
                  must_finish: bool = False) -> Any:
    addresses, _ = settings(ctx)
    if not host.strip():
        raise click.UsageError("HOST is empty: give a host id (see `failoverctl hosts`)")
    return CoordinatorCaller(addresses, tls_material(ctx)).call(
        "DrainHost", coordinator_pb2.DrainHostRequest(host_id=host, draining=draining,
                                                      must_finish=must_finish),
        timeout_ms=timeout_ms, idempotent=True)


def _held(ctx: click.Context, host: str, timeout_ms: int) -> list[dict[str, Any]]:
    document = next((h for h in output.hosts_json(cluster_status(ctx, timeout_ms))
                     if h["host_id"] == host), None)
    return document["services"] if document else []


@click.command("drain")
@click.argument("host")
@click.option("--wait", "wait_s", type=click.IntRange(min=0), default=0, metavar="SECONDS",
              help="Wait up to SECONDS until the host holds no replica (exit 1 if not). A "
              "drain that cannot finish (no other host can take a replica) is refused at "
              "once, saying why, and nothing changes.")
@_timeout_option
@click.pass_context
def drain_command(ctx: click.Context, host: str, wait_s: int, timeout_ms: int) -> None:
    """Drain HOST: no new replicas go there, its primaries move off by switchover, and its
    replicas are rebuilt on other hosts, then retired (redundancy never drops)."""
    _, as_json = settings(ctx)
    reply = _set_draining(ctx, host, True, timeout_ms, must_finish=wait_s > 0)
    if reply.cannot_finish and not as_json:
        click.echo(f"warning: {host} cannot be drained completely as things stand: "
                   f"{one_line(reply.cannot_finish)}", err=True)
    deadline = time.monotonic() + wait_s
    held = _held(ctx, host, timeout_ms) if wait_s else []
    with output.CountdownView(f"draining {host}", len(held), "replicas",
                              enabled=not as_json) as view:
        while held and time.monotonic() < deadline:
            view.update(len(held), ", ".join(f"{h['service']} ({h['role']})" for h in held))
            time.sleep(0.2)  # polling the coordinator's status, under the deadline above
            held = _held(ctx, host, timeout_ms)
        view.update(len(held), "")
    if held:
        left = ", ".join(f"{h['service']} ({h['role']})" for h in held)
        raise CommandFailed(f"{host} still holds {left} after {wait_s} s; it stays draining: "
                            "see `failoverctl status` and `failoverctl history`")
    if as_json:
        _echo_json(output.host_json(reply.host))
    elif wait_s:
        click.echo(f"{host} is drained: it holds no replica")
    else:
        click.echo(f"{host} is draining; `failoverctl hosts` shows what it still holds")


def _service_left(document: dict[str, Any]) -> tuple[int, str]:
    """How many of a service's desired replicas are not yet serving, or in sync and
    promotable (a switchover may choose it), and which."""
    good = [r for r in document["replicas"] if r["role"] == PRIMARY or (
        r["role"] == DUPLICA and r["in_sync"] and r["promotable"])]
    pending = [f"{r['host_id']} ({r['role']})" for r in document["replicas"] if r not in good]
    left = max(0, document["desired_replicas"] - len(good))
    return left, ", ".join(pending) or ("placing" if left else "")


@click.command("wait")
@click.option("--hosts", "hosts_min", type=click.IntRange(min=1), default=None, metavar="N",
              help="Wait until at least N hosts are registered and alive.")
@click.option("--service", default="", metavar="SERVICE",
              help="Wait until SERVICE has all its replicas, each serving or in sync and "
              "promotable (a create's or a rebuild's replicas built; a switchover may "
              "choose any). One that cannot be placed is refused at once, with the "
              "placement reasons.")
@click.option("--timeout-ms", type=click.IntRange(min=1), default=60_000, show_default=True,
              help="Give up (exit 1) after this long.")
@click.pass_context
def wait_command(ctx: click.Context, hosts_min: int | None, service: str,
                 timeout_ms: int) -> None:
    """Wait until the cluster is ready: the coordinator answers, enough hosts are alive, a
    service's replicas are built and in sync. For scripts between starting daemons and
    using them; a progress bar on a terminal."""
    _, as_json = settings(ctx)
    if hosts_min is None and not service:
        raise click.UsageError("give --hosts N, --service SERVICE, or both")
    deadline = time.monotonic() + timeout_ms / 1000
    why = "the coordinator did not answer"
    total = hosts_min or 0
    with output.CountdownView(f"waiting for {service or 'hosts'}", total, "left",
                              enabled=not as_json) as view:
        while True:
            # Each poll gets at least WAIT_POLL_CALL_MS, so a last one near the deadline is
            # not failed by a deadline too short to answer in.
            per_call_ms = min(defaults.CALL_DEADLINE_MS, max(
                defaults.WAIT_POLL_CALL_MS, int((deadline - time.monotonic()) * 1000)))
            try:
                status = cluster_status(ctx, per_call_ms)
            except CommandFailed as exc:  # not up yet: the daemons may be starting
                status, why = None, str(exc)
            if status is not None:
                alive = sum(1 for h in status.hosts if h.alive)
                left, detail = (max(0, total - alive), f"{alive} of {total} hosts alive") \
                    if hosts_min else (0, "")
                if service:
                    found = next((s for s in status.services if s.name == service), None)
                    if found is None:
                        raise CoordinatorRefused(f"no service {service!r}; `failoverctl "
                                                 "status` lists them")
                    document = output.service_json(found)
                    if document["unplaced"]:
                        raise CommandFailed(f"{service} cannot get its replicas: "
                                            f"{one_line(document['unplaced'])}")
                    if left == 0:
                        view.total = document["desired_replicas"]
                        left, detail = _service_left(document)
                        view.description = f"building {service}"
                if left == 0:
                    break
                why = f"{left} left: {detail}"
                view.update(left, detail)
            if time.monotonic() >= deadline:
                raise CommandFailed(f"not ready after {timeout_ms} ms: {one_line(why)}")
            time.sleep(0.2)  # polling the coordinator's status, under the deadline above
    if as_json:
        _echo_json({"ready": True, "hosts": hosts_min, "service": service or None})
    else:
        click.echo("ready")


@click.command("undrain")
@click.argument("host")
@_timeout_option
@click.pass_context
def undrain_command(ctx: click.Context, host: str, timeout_ms: int) -> None:
    """Take HOST back: new replicas may be placed on it again."""
    _, as_json = settings(ctx)
    reply = _set_draining(ctx, host, False, timeout_ms)
    if as_json:
        _echo_json(output.host_json(reply.host))
    else:
        click.echo(f"{host} takes replicas again")


@click.command("migrate")
@click.argument("service")
@click.option("--to", "to_host", required=True, metavar="HOST", help="Host to move to.")
@click.option("--replica", type=click.Choice([PRIMARY, DUPLICA]), default=PRIMARY,
              show_default=True, help="Which replica moves (a primary moves by migrating a "
              "new duplica, switching over to it and retiring the source).")
@click.option("--from", "from_host", default="", metavar="HOST",
              help="With --replica duplica: which duplica (default: any).")
@click.option("--max-downtime-ms", type=click.IntRange(min=1, max=60_000),
              default=defaults.MAX_DOWNTIME_MS, show_default=True,
              help="Pre-copy rounds go on until the last one is predicted to fit this.")
@click.option("--method", type=click.Choice(["precopy", "stopcopy", "replay"]),
              default="precopy", show_default=True,
              help="precopy: rounds of dirty pages, then a short pause; stopcopy: pause and "
              "copy everything; replay: build the copy from a snapshot and the log.")
@click.option("--max-bandwidth-mib-s", type=click.FloatRange(min=0), default=0.0,
              help="Cap the copy at this many MiB per second on the wire (0: no cap).")
@click.option("--timeout-ms", type=click.IntRange(min=1), default=defaults.MIGRATION_TIMEOUT_MS,
              show_default=True, help="Deadline of the whole move.")
@click.pass_context
def migrate_command(ctx: click.Context, service: str, to_host: str, replica: str,
                    from_host: str, max_downtime_ms: int, method: str,
                    max_bandwidth_mib_s: float, timeout_ms: int) -> None:
    """Move a replica of SERVICE to another host, live: clients see no failed request."""
    addresses, as_json = settings(ctx)
    request = coordinator_pb2.MigrateRequest(
        service=service, to_host_id=to_host, replica=replica, from_host_id=from_host,
        max_downtime_ms=max_downtime_ms, method=method,
        max_bandwidth_bytes_s=int(max_bandwidth_mib_s * (1 << 20)))
    final: dict[str, Any] = {}
    with output.MigrationProgressView(enabled=not as_json) as view:
        def on_message(progress: Any) -> None:
            view.update(progress)
            if progress.phase == "done":
                final.update(json.loads(progress.stats_json or b"{}"))

        CoordinatorCaller(addresses, tls_material(ctx)).stream("Migrate", request, on_message,
                                            timeout_ms=timeout_ms)
    if not final:
        raise CommandFailed(f"the coordinator ended the migration of {service} without a "
                            "result; see `failoverctl history`")
    if as_json:
        _echo_json(final)
    else:
        output.make_console().print(output.migration_stats_table(service, final))


@click.command("patch")
@click.argument("hosts", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every host, one at a time.")
@click.option("--command", default="", metavar="NAME",
              help="The name of a command in each host's allowlist ([patch.commands] in the "
              "agent's TOML), run before its agent re-executes (e.g. a package upgrade); a "
              "non-zero exit stops the patch. Never a command line: what runs on a host is "
              "set on the host. Its output is shown to an admin certificate only.")
@click.option("--failback", is_flag=True, help="Move its primaries back afterwards.")
@click.option("--method", type=click.Choice(["precopy", "switchover"]), default="precopy",
              show_default=True, help="How primaries leave: surge-migrate them to a spare "
              "host (redundancy never drops), or switch over to an in-sync duplica.")
@click.option("--command-timeout-ms", type=click.IntRange(min=1),
              default=defaults.PATCH_COMMAND_TIMEOUT_MS, show_default=True)
@click.option("--timeout-ms", type=click.IntRange(min=1), default=3_600_000,
              show_default=True, help="Deadline of the whole patch.")
@click.pass_context
def patch_command(ctx: click.Context, hosts: tuple[str, ...], everything: bool, command: str,
                  failback: bool, method: str, command_timeout_ms: int,
                  timeout_ms: int) -> None:
    """Restart HOSTS on new code with no failed request: move primaries off, run the
    command, re-execute the agent, let its replicas catch up."""
    addresses, as_json = settings(ctx)
    if bool(hosts) == everything:
        raise click.UsageError("name the hosts to patch, or give --all (not both)")
    request = coordinator_pb2.PatchRequest(
        host_ids=list(hosts), all=everything, command=command, failback=failback,
        method=method, command_timeout_ms=command_timeout_ms)
    steps: list[dict[str, Any]] = []
    total = len(hosts) if hosts else len(cluster_status(ctx, timeout_ms).hosts)
    patched: set[str] = set()

    with output.CountdownView("patching", total, "hosts", enabled=not as_json,
                              plain_updates=False) as view:
        def on_message(progress: Any) -> None:
            steps.append({"host_id": progress.host_id, "step": progress.step,
                          "message": progress.message, "ok": progress.ok})
            mark = "[red]x[/red]" if progress.step == "failed" else (
                "[green]ok[/green]" if progress.step == "done" else "..")
            view.print(f"{mark} {output.escape(progress.message)}", markup=True)
            if progress.step == "done":
                patched.add(progress.host_id)
            view.update(total - len(patched), f"{progress.host_id}: {progress.step}")

        CoordinatorCaller(addresses, tls_material(ctx)).stream("Patch", request, on_message,
                                                       timeout_ms=timeout_ms)
    failed = [s for s in steps if s["step"] == "failed"]
    if as_json:
        _echo_json({"ok": not failed, "steps": steps})
    if failed:
        raise CommandFailed(failed[0]["message"])


@click.command("history")
@click.argument("service", required=False, default="")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50,
              show_default=True, help="Most recent events to show.")
@_timeout_option
@click.pass_context
def history_command(ctx: click.Context, service: str, limit: int, timeout_ms: int) -> None:
    """Show recent events (failovers, switchovers, ...).

    Events of SERVICE, or of every service when none is given.
    """
    addresses, as_json = settings(ctx)
    request = coordinator_pb2.HistoryRequest(service=service, limit=limit)
    reply = CoordinatorCaller(addresses, tls_material(ctx)).call(
        "GetHistory", request, timeout_ms=timeout_ms, idempotent=True)
    events = output.history_json(reply)
    if as_json:
        _echo_json(events)
    elif not events:
        click.echo(f"no events{' of ' + service if service else ''}")
    else:
        output.make_console().print(output.history_table(events))


async def _call_service(addresses: list[str], service: str, request: dict[str, Any],
                        timeout_ms: int, tls: TlsFiles | None = None) -> dict[str, Any]:
    async with Client(coordinator=addresses, deadline_ms=timeout_ms, tls=tls) as client:
        return await client.call(service, request)


@click.command("call")
@click.argument("service")
@click.argument("request_json", metavar="JSON")
@click.option("--timeout-ms", type=click.IntRange(min=1), default=defaults.CALL_DEADLINE_MS,
              show_default=True, help="Deadline of the request, retries included.")
@click.pass_context
def call_command(ctx: click.Context, service: str, request_json: str, timeout_ms: int) -> None:
    """Run one JSON request on SERVICE and print the result.

    The request goes to the primary through the smart client; the result is printed as
    JSON whatever --format says.

    Example: failoverctl call kv '{"op": "get", "key": "user:1"}'
    """
    addresses, _ = settings(ctx)
    try:
        request = json.loads(request_json)
    except json.JSONDecodeError as exc:
        raise click.UsageError(
            f"JSON is not valid: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(request, dict):
        raise click.UsageError(
            f"JSON must be an object such as '{{\"op\": \"get\"}}', not {type(request).__name__}")
    try:
        result = asyncio.run(_call_service(addresses, service, request, timeout_ms,
                                           _tls_files(ctx)))
    except ConfigError:
        raise
    except PermissionDenied as exc:
        raise click.UsageError(one_line(str(exc))) from None
    except InvalidRequest as exc:
        raise click.UsageError(f"{service}: invalid request: {one_line(str(exc))}") from None
    except RequestRejected as exc:
        raise CommandFailed(f"{service} refused the request: {one_line(str(exc))}") from None
    except FailoverError as exc:
        raise CommandFailed(one_line(str(exc))) from None
    _echo_json(output.jsonable(result))


COMMANDS: tuple[click.Command, ...] = (
    status_command, hosts_command, create_command, delete_command, switchover_command,
    drain_command, undrain_command, migrate_command, patch_command, history_command,
    call_command, wait_command,
)
"""The commands this module adds to `failoverctl`."""
