"""Conversions between the wire (failover/v1 protobufs) and the core's values.

The servicers and the daemons' callers only adapt: every role, mode, report, assignment and
status crosses the wire through this module, so each mapping is written once.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import psutil

from failover.core.coordinator import (
    AssignRole,
    CoordinatorCore,
    HookReport,
    HostInfo,
    ReplicaReport,
)
from failover.core.roles import ASYNC, BUILDING, DUPLICA, PRIMARY, RETIRED, SYNC
from failover.errors import InvalidRequest
from failover.v1 import agent_pb2, common_pb2, coordinator_pb2


class ReportsStatus(Protocol):
    """What replica_status needs of a replica (failover.agent.replica.Replica)."""

    def status(self) -> dict[str, Any]: ...

ROLE_TO_PROTO = {
    PRIMARY: common_pb2.ROLE_PRIMARY,
    DUPLICA: common_pb2.ROLE_DUPLICA,
    BUILDING: common_pb2.ROLE_BUILDING,
    RETIRED: common_pb2.ROLE_RETIRED,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
MODE_TO_PROTO = {SYNC: common_pb2.REPLICATION_MODE_SYNC,
                 ASYNC: common_pb2.REPLICATION_MODE_ASYNC}
MODE_FROM_PROTO = {common_pb2.REPLICATION_MODE_UNSPECIFIED: SYNC,
                   common_pb2.REPLICATION_MODE_SYNC: SYNC,
                   common_pb2.REPLICATION_MODE_ASYNC: ASYNC}


def assign_request(action: AssignRole) -> agent_pb2.AssignRoleRequest:
    """The coordinator core's AssignRole action as the agent's request."""
    request = agent_pb2.AssignRoleRequest(
        service=action.service, kind=action.kind, role=ROLE_TO_PROTO[action.role],
        epoch=action.epoch, mode=MODE_TO_PROTO[action.mode],
        duplicas=[agent_pb2.ReplicaPeer(host_id=h, address=a)
                  for h, a in sorted(action.duplicas.items())],
        in_sync=list(action.in_sync), in_sync_generation=action.in_sync_generation,
        reason=action.reason,
    )
    if action.primary is not None:
        request.primary.CopyFrom(agent_pb2.ReplicaPeer(host_id=action.primary[0],
                                                       address=action.primary[1]))
    return request


class RoleAssignment(NamedTuple):
    """An AssignRole request in the arguments of `Agent.assign_role`, in their order."""

    service: str
    kind: str
    role: str
    epoch: int
    mode: str
    primary: tuple[str, str] | None
    duplicas: dict[str, str]
    in_sync: set[str]
    in_sync_generation: int
    reason: str = ""  # "failover" when a failover made it (the agent's on_failover hooks)


def role_assignment(request: agent_pb2.AssignRoleRequest) -> RoleAssignment:
    """The agent's side of assign_request; InvalidRequest for a role or peer left out."""
    if request.role not in ROLE_FROM_PROTO:
        raise InvalidRequest("role is required (primary, duplica, building, retired)")
    primary = ((request.primary.host_id, request.primary.address)
               if request.primary.host_id else None)
    duplicas = {p.host_id: p.address for p in request.duplicas}
    if any(not h or not a for h, a in duplicas.items()):
        raise InvalidRequest("every duplica needs a host_id and an address")
    return RoleAssignment(
        request.service, request.kind, ROLE_FROM_PROTO[request.role], request.epoch,
        MODE_FROM_PROTO.get(request.mode, SYNC), primary, duplicas, set(request.in_sync),
        request.in_sync_generation, request.reason)


def replica_reports(request: coordinator_pb2.HeartbeatRequest) -> list[ReplicaReport]:
    """A heartbeat's replicas as the coordinator core's reports."""
    return [replica_report(r) for r in request.replicas]


def replica_report(r: agent_pb2.ReplicaStatus) -> ReplicaReport:
    """One replica of a heartbeat as the coordinator core's report."""
    return ReplicaReport(
        service=r.service, role=ROLE_FROM_PROTO.get(r.role, RETIRED), epoch=r.epoch,
        durable_index=r.indexes.durable_index, commit_index=r.indexes.commit_index,
        applied_index=r.indexes.applied_index, truncated_entries=r.truncated_entries,
        matched_index=r.matched_index, disk_full=r.disk_full,
        broken=(r.last_error or "it cannot read its snapshot or log") if r.broken else "",
        in_sync=tuple(r.in_sync) if r.role == common_pb2.ROLE_PRIMARY else None,
        in_sync_generation=r.in_sync_generation,
        in_sync_lag_ms=dict(r.in_sync_lag_ms) if r.role == common_pb2.ROLE_PRIMARY else None,
        primary_host_id=r.primary_host_id if r.role != common_pb2.ROLE_PRIMARY else None,
        duplicas=tuple(r.duplicas) if r.role == common_pb2.ROLE_PRIMARY else None)


class ReportCache:
    """`replica_reports` that reuses the report of a replica whose status came in the same
    bytes in its host's previous heartbeat (reports are frozen, so one object serves both).

    At rest nearly every status repeats, ten times a second per host: converting each one
    anew was a fifth of an idle coordinator's CPU, where serialising it to compare costs a
    microsecond or two. Each heartbeat replaces its host's entries, so a host holds no more
    than its last heartbeat's replicas. Only registered hosts are kept (`keep`), at most
    `hosts_max` of them: a caller that names hosts nobody registered (without TLS, anyone
    can) must not make the coordinator hold what it sends."""

    def __init__(self, hosts_max: int) -> None:
        assert hosts_max > 0
        self.hosts_max = hosts_max
        self._hosts: dict[str, dict[str, tuple[bytes, ReplicaReport]]] = {}

    def reports(self, request: coordinator_pb2.HeartbeatRequest,
                keep: bool) -> list[ReplicaReport]:
        """The reports of a heartbeat; `keep`: its host is registered, so its statuses are
        kept to compare with its next heartbeat's (otherwise any it had are dropped)."""
        before = self._hosts.get(request.host_id)
        if not keep or (before is None and len(self._hosts) >= self.hosts_max):
            self._hosts.pop(request.host_id, None)
            return replica_reports(request)
        before = before or {}
        now: dict[str, tuple[bytes, ReplicaReport]] = {}
        out = []
        for r in request.replicas:
            wire = r.SerializeToString(deterministic=True)
            hit = before.get(r.service)
            report = hit[1] if hit is not None and hit[0] == wire else replica_report(r)
            now[r.service] = (wire, report)
            out.append(report)
        self._hosts[request.host_id] = now
        return out


def hook_reports(request: coordinator_pb2.HeartbeatRequest) -> list[HookReport]:
    """A heartbeat's hook results as the coordinator core's reports (it checks them)."""
    return [HookReport(h.seq, h.service, h.event, h.command, h.role, h.epoch, h.exit_code,
                       h.output, h.duration_ms, h.timed_out, h.skipped)
            for h in request.hook_results]


def host_info(request: coordinator_pb2.RegisterRequest) -> HostInfo:
    """A registering agent as the coordinator core's HostInfo (not draining)."""
    return HostInfo(request.host_id, request.address, request.zone, False, request.version,
                    request.started_at, incarnation=request.incarnation)


def heartbeat_reply(leases: list[tuple[str, int, int]]) -> coordinator_pb2.HeartbeatReply:
    """The leases granted to a heartbeat, as (service, epoch, lease_ms)."""
    return coordinator_pb2.HeartbeatReply(leases=[
        coordinator_pb2.LeaseGrant(service=s, epoch=e, lease_ms=ms) for s, e, ms in leases])


def metrics_dict(metrics: agent_pb2.HostMetrics) -> dict[str, float]:
    """A host's metrics as the coordinator core's dict."""
    return {"cpu_percent": metrics.cpu_percent, "memory_percent": metrics.memory_percent,
            "disk_free_bytes": float(metrics.disk_free_bytes),
            "disk_total_bytes": float(metrics.disk_total_bytes),
            "memory_total_bytes": float(metrics.memory_total_bytes),
            "cpu_count": float(metrics.cpu_count)}


def replica_status(replica: ReportsStatus) -> agent_pb2.ReplicaStatus:
    """A replica's status() as the agent reports it (heartbeats, AssignRole, Status)."""
    return status_message(replica.status())


def status_message(s: dict[str, Any]) -> agent_pb2.ReplicaStatus:
    """A replica's status() dict as its wire message."""
    return agent_pb2.ReplicaStatus(
        service=s["service"], kind=s["kind"], role=ROLE_TO_PROTO[s["role"]], epoch=s["epoch"],
        indexes=common_pb2.ReplicaIndexes(durable_index=s["durable_index"],
                                          commit_index=s["commit_index"],
                                          applied_index=s["applied_index"]),
        lag_entries=s["lag_entries"], mode=MODE_TO_PROTO[s["mode"]],
        truncated_entries=s["truncated_entries"], last_error=s["last_error"],
        disk_full=s["disk_full"], broken=s["broken"],
        matched_index=s["matched_index"], in_sync=s["in_sync"],
        in_sync_generation=s["in_sync_generation"], in_sync_lag_ms=s["in_sync_lag_ms"],
        primary_host_id=s["primary_host_id"], duplicas=s["duplicas"],
    )


def host_metrics(data_dir: str) -> agent_pb2.HostMetrics:
    """psutil's view of this host (cpu_percent since the previous call)."""
    disk = psutil.disk_usage(data_dir)
    memory = psutil.virtual_memory()
    return agent_pb2.HostMetrics(
        cpu_percent=psutil.cpu_percent(interval=None), memory_percent=memory.percent,
        disk_free_bytes=disk.free, memory_total_bytes=memory.total,
        cpu_count=psutil.cpu_count() or 1, disk_total_bytes=disk.total,
    )


def cluster_status(core: CoordinatorCore, now: int) -> coordinator_pb2.ClusterStatus:
    """The coordinator core's hosts and services as GetClusterStatus answers them."""
    out = coordinator_pb2.ClusterStatus()
    for host_id, info in sorted(core.hosts.items()):
        live = core.live.get(host_id)
        m = live.metrics if live else {}
        out.hosts.append(coordinator_pb2.HostStatus(
            host_id=host_id, address=info.address, zone=info.zone, draining=info.draining,
            alive=bool(live and live.alive), version=info.version,
            started_at=info.started_at,
            metrics=agent_pb2.HostMetrics(
                cpu_percent=m.get("cpu_percent", 0.0),
                memory_percent=m.get("memory_percent", 0.0),
                disk_free_bytes=int(m.get("disk_free_bytes", 0)),
                disk_total_bytes=int(m.get("disk_total_bytes", 0)),
                memory_total_bytes=int(m.get("memory_total_bytes", 0)),
                cpu_count=int(m.get("cpu_count", 0))),
            heartbeat_age_ms=max(0, now - live.last_heartbeat_ms) if live else 0,
            dead=bool(live and live.dead),
            incarnation=info.incarnation, exited_incarnation=live.exited if live else 0,
        ))
    for name, service in sorted(core.services.items()):
        primary_report = _report(core, service.primary, name)
        view = coordinator_pb2.ServiceStatus(
            name=name, kind=service.kind, mode=MODE_TO_PROTO[service.mode], epoch=service.epoch,
            desired_replicas=service.desired_replicas,
            placement=service.placement or core.placement_policy,
            unplaced=core.unplaced.get(name, ""))
        for host_id, role in sorted(service.replicas.items()):
            report = _report(core, host_id, name)
            durable = report.durable_index if report else 0
            lag = max(0, primary_report.durable_index - durable) if primary_report else 0
            view.replicas.append(coordinator_pb2.ReplicaView(
                host_id=host_id, role=ROLE_TO_PROTO[role],
                indexes=common_pb2.ReplicaIndexes(
                    durable_index=durable,
                    commit_index=report.commit_index if report else 0,
                    applied_index=report.applied_index if report else 0),
                lag_entries=0 if host_id == service.primary else lag,
                in_sync=host_id in service.in_sync,
                promotable=host_id in service.promotable and host_id in service.in_sync,
            ))
        out.services.append(view)
    return out


def _report(core: CoordinatorCore, host_id: str, service: str) -> ReplicaReport | None:
    live = core.live.get(host_id)
    return live.replicas.get(service) if live else None
