"""The agent's coordinator term fence with real processes (issue 15): the agents learn the
coordinator's term from its replies; once a newer coordinator took over (here: the SQLite
coordinator restarted, which raises its term), a control call stamped with the old term is
refused with FAILED_PRECONDITION and changes nothing, also after the agent itself restarts."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from failover.agent.term import TERM_FILE
from failover.localcluster import AgentProcess, LocalCluster, wait_for
from failover.net.channels import COORDINATOR_TERM_METADATA_KEY
from failover.v1 import agent_pb2, common_pb2

pytestmark = pytest.mark.timeout(180)


def term_of(agent: AgentProcess) -> int:
    """The term in the agent's data dir (0 before it has seen any)."""
    path = agent.data_dir / TERM_FILE
    return int(path.read_text()) if path.exists() else 0


def deposed_promotion(agent: AgentProcess, primary: AgentProcess, term: int) -> grpc.RpcError:
    """What the deposed coordinator of `term` gets when it makes `agent` the primary."""
    with pytest.raises(grpc.RpcError) as refused:
        agent.control().AssignRole(agent_pb2.AssignRoleRequest(
            service="kv", kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=1000,
            mode=common_pb2.REPLICATION_MODE_SYNC,
            duplicas=[agent_pb2.ReplicaPeer(host_id=primary.host_id, address=primary.address)],
        ), metadata=((COORDINATOR_TERM_METADATA_KEY, str(term)),), timeout=5)
    return refused.value


def test_a_deposed_coordinators_calls_are_refused_across_agent_restarts(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path, hosts=2, coordinator=True) as cluster:
        cluster.start()
        cluster.create("kv", "kv", replicas=2)
        primary = cluster[wait_for(lambda: cluster.primary_of("kv"), 30, "a primary")]
        duplica = next(a for a in cluster if a is not primary)
        old = wait_for(lambda: term_of(duplica) or None, 30, "the duplica to learn the term")
        assert oct((duplica.data_dir / TERM_FILE).stat().st_mode & 0o777) == "0o600"
        # A new coordinator takes over: the SQLite store raises its term when it opens.
        assert cluster.coordinator is not None
        cluster.coordinator.kill()
        cluster.coordinator.start()
        new = wait_for(lambda: term_of(duplica) if term_of(duplica) > old else None, 30,
                       "the duplica to learn the new coordinator's term")
        epoch = cluster.coordinator.status().services[0].epoch
        refused = deposed_promotion(duplica, primary, old)
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.details() == (f"coordinator term {old} is older than term {new} this "
                                     "agent has seen: that coordinator was deposed")
        role = duplica.replica("kv")
        assert role is not None and role.role == common_pb2.ROLE_DUPLICA
        assert role.epoch == epoch
        # The agent restarts (kill -9): it still knows the term, and still refuses.
        duplica.kill()
        duplica.start()
        assert term_of(duplica) >= new
        assert deposed_promotion(duplica, primary, old).code() == (
            grpc.StatusCode.FAILED_PRECONDITION)
        role = duplica.replica("kv")
        assert role is not None and role.role != common_pb2.ROLE_PRIMARY
        assert cluster.primary_of("kv") == primary.host_id
