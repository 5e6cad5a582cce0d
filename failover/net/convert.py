"""Conversions between the wire (failover/v1 protobufs) and the core's values.

The servicers and the daemons' callers only adapt: every role, mode, report, assignment and
status crosses the wire through this module, so each mapping is written once.
"""

from __future__ import annotations

from typing import Any, Protocol

import psutil

from failover.core.coordinator import AssignRole, ReplicaReport
from failover.core.roles import ASYNC, BUILDING, DUPLICA, PRIMARY, RETIRED, SYNC
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
    )
    if action.primary is not None:
        request.primary.CopyFrom(agent_pb2.ReplicaPeer(host_id=action.primary[0],
                                                       address=action.primary[1]))
    return request


def replica_reports(request: coordinator_pb2.HeartbeatRequest) -> list[ReplicaReport]:
    """A heartbeat's replicas as the coordinator core's reports."""
    return [
        ReplicaReport(
            service=r.service, role=ROLE_FROM_PROTO.get(r.role, RETIRED), epoch=r.epoch,
            durable_index=r.indexes.durable_index, commit_index=r.indexes.commit_index,
            applied_index=r.indexes.applied_index, truncated_entries=r.truncated_entries,
            matched_index=r.matched_index, disk_full=r.disk_full,
            broken=(r.last_error or "it cannot read its snapshot or log") if r.broken else "",
            in_sync=tuple(r.in_sync) if r.role == common_pb2.ROLE_PRIMARY else None,
            in_sync_generation=r.in_sync_generation,
            in_sync_lag_ms=dict(r.in_sync_lag_ms) if r.role == common_pb2.ROLE_PRIMARY else None)
        for r in request.replicas
    ]


def metrics_dict(metrics: agent_pb2.HostMetrics) -> dict[str, float]:
    """A host's metrics as the coordinator core's dict."""
    return {"cpu_percent": metrics.cpu_percent, "memory_percent": metrics.memory_percent,
            "disk_free_bytes": float(metrics.disk_free_bytes),
            "disk_total_bytes": float(metrics.disk_total_bytes),
            "memory_total_bytes": float(metrics.memory_total_bytes),
            "cpu_count": float(metrics.cpu_count)}


def replica_status(replica: ReportsStatus) -> agent_pb2.ReplicaStatus:
    """A replica's status() as the agent reports it (heartbeats, AssignRole, Status)."""
    s = replica.status()
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
