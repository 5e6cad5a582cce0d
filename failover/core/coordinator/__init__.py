"""The coordinator's policy, pure: events in, actions out, time as an argument
(docs/design.md, Layers). `CoordinatorCore` (core.py) ties the parts together; see its
docstring for which module holds what. Everything imported from here is re-exported."""

from failover.core.coordinator.actions import (
    Action,
    Answer,
    AskHearsPrimary,
    AssignRole,
    Copied,
    CopyRound,
    Done,
    DropReplica,
    Failed,
    HearsAnswer,
    Persist,
    Prepared,
    PrepareSwitchover,
    Progress,
    PushRoutes,
    ReleaseSwitchover,
    RestartAgent,
    Restarted,
    Route,
    StartMigration,
    StartSwitchover,
    StepDown,
)
from failover.core.coordinator.core import CoordinatorCore
from failover.core.coordinator.model import (
    HOST_PREFIX,
    ROUTES_VERSION_KEY,
    SERVICE_PREFIX,
    Failover,
    HookReport,
    HostInfo,
    HostLive,
    ReplicaReport,
    ServiceInfo,
    Timing,
)
from failover.core.coordinator.operations import (
    MIGRATION_METHODS,
    MigratePlan,
    PatchPlan,
    Plan,
    SwitchoverPlan,
)
from failover.core.roles import BUILDING, DUPLICA, PRIMARY

__all__ = [
    "BUILDING", "DUPLICA", "HOST_PREFIX", "MIGRATION_METHODS", "PRIMARY", "ROUTES_VERSION_KEY",
    "SERVICE_PREFIX", "Action", "Answer", "AskHearsPrimary", "AssignRole", "Copied",
    "CoordinatorCore", "CopyRound", "Done", "DropReplica", "Failed", "Failover", "HearsAnswer",
    "HookReport", "HostInfo", "HostLive", "MigratePlan", "PatchPlan", "Persist", "Plan",
    "PrepareSwitchover",
    "Prepared", "Progress", "PushRoutes", "ReleaseSwitchover", "RestartAgent", "Restarted",
    "ReplicaReport", "Route", "ServiceInfo", "StartMigration", "StartSwitchover", "StepDown",
    "SwitchoverPlan", "Timing",
]
