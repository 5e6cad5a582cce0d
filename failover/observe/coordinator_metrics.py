"""A coordinator's Prometheus metrics and its structured history log (issue 17).

Counted as the coordinator carries out what its core decided (`CoordinatorMetrics.committed`,
`routes_pushed`): failovers by kind, their unavailability, false suspicions, store commit
times. Read at scrape time from the core (`CoordinatorCollector`): hosts by state, services,
rebuilds in progress, whether this coordinator leads. Every history row the store committed is
also one log record with its fields (`event` = the row's kind), so a log pipeline sees each
failover step, switchover, migration and patch step as the history does.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from failover import __version__, defaults
from failover.core.roles import BUILDING
from failover.observe.logs import event_fields, safe_fields

log = logging.getLogger("failover.coordinator.history")

FAILOVER_KINDS = ("crash", "switchover", "patch")
HOST_STATES = ("alive", "draining", "suspected", "dead")
# The history kinds whose rows are logged at WARNING: something failed or was refused.
_WARNING_KINDS = frozenset({"failover", "failover_blocked", "suspicion", "patch_failed",
                            "migration_aborted", "switchover_aborted", "placement_failed"})
HistoryRow = tuple[str, str, str, dict[str, Any]]  # service, kind, message, details


class _Coordinator(Protocol):
    core: Any
    leading: bool

    def acting(self) -> bool: ...


class CoordinatorMetrics:
    """The coordinator's counters and histograms, in its own registry, with
    `CoordinatorCollector` registered on it."""

    def __init__(self, coordinator: _Coordinator) -> None:
        self.coordinator = coordinator
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.failovers = Counter(
            "failover_failovers", "Primary changes: crash (a failover after a primary was "
            "lost), switchover (planned), patch (a switchover off a host being patched).",
            ["kind"], registry=r)
        for kind in FAILOVER_KINDS:
            self.failovers.labels(kind)  # every kind is a series from the start, at 0
        self.unavailability = Histogram(
            "failover_unavailability_seconds", "A crash failover, from the moment "
            "the coordinator suspected the primary to the new routes pushed to clients.",
            registry=r, buckets=defaults.UNAVAILABILITY_BUCKETS_S)
        self.false_suspicions = Counter(
            "failover_false_suspicions", "Primaries suspected (missed heartbeats) that their "
            "duplicas still heard: no failover.", registry=r)
        self.store_commit = Histogram(
            "failover_store_commit_duration_seconds", "One commit of the coordinator's "
            "store (state changes and their history rows).", registry=r,
            buckets=defaults.STORE_COMMIT_BUCKETS_S)
        build = Gauge("failover_build_info", "1, labelled with the code this coordinator "
                      "runs.", ["version", "python"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        # Service -> when (clock.monotonic_ms) its primary was suspected, for a failover
        # committed whose routes are not pushed yet; bounded by the services.
        self._unrouted: dict[str, float] = {}
        r.register(CoordinatorCollector(coordinator))

    def committed(self, history: Iterable[HistoryRow], seconds: float, now_ms: int) -> None:
        """A commit of the store took `seconds` and wrote `history` (`now_ms`: the
        coordinator's clock when the actions were carried out, about when they were
        decided): counts what the rows say happened, and logs each row."""
        self.store_commit.observe(seconds)
        for service, kind, message, details in history:
            if kind == "failover":
                self.failovers.labels("crash").inc()
                self._unrouted[service] = now_ms - float(details.get("promotion_ms", 0))
            elif kind == "switchover":
                patching = details.get("old_primary") in self.coordinator.core.patching
                self.failovers.labels("patch" if patching else "switchover").inc()
            elif kind == "suspicion":
                self.false_suspicions.inc()
            log_history(service, kind, message, details)

    def routes_pushed(self, now_ms: int) -> None:
        """New routes went to the clients: each failover committed before is over."""
        for suspected_ms in self._unrouted.values():
            self.unavailability.observe(max(0.0, now_ms - suspected_ms) / 1000)
        self._unrouted.clear()


def log_history(service: str, kind: str, message: str, details: dict[str, Any]) -> None:
    """One history row as one log record: the message, and its fields (``event`` its kind,
    ``service``, and the row's details, each prefixed ``detail_`` where it would clash)."""
    fields = {("detail_service" if k == "service" else k): v
              for k, v in safe_fields(details).items()}
    level = logging.WARNING if kind in _WARNING_KINDS else logging.INFO
    log.log(level, "%s", message, extra=event_fields(kind, service=service, **fields))


class CoordinatorCollector(Collector):
    """The cluster as the core holds it, read at scrape time on the coordinator's loop. A
    follower's core is empty: it reports only ``failover_is_leader 0``."""

    def __init__(self, coordinator: _Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.coordinator
        leading = c.acting()
        yield GaugeMetricFamily("failover_is_leader", "1 while this coordinator leads (acts, "
                                "commits, calls agents), else 0.", value=1 if leading else 0)
        if not leading:
            return
        core = c.core
        hosts = GaugeMetricFamily("failover_hosts", "Registered hosts by state: alive, "
                                  "draining (alive, being emptied), suspected (silent past the "
                                  "failure timeout), dead (silent past host_dead_ms).",
                                  labels=["state"])
        counts = dict.fromkeys(HOST_STATES, 0)
        for host_id, info in list(core.hosts.items()):
            live = core.live.get(host_id)
            if live is None or live.dead:
                counts["dead"] += 1
            elif not live.alive:
                counts["suspected"] += 1
            else:
                counts["draining" if info.draining else "alive"] += 1
        for state in HOST_STATES:
            hosts.add_metric([state], counts[state])
        yield hosts
        services = list(core.services.values())
        yield GaugeMetricFamily("failover_services", "Services (replica sets) in the cluster.",
                                value=len(services))
        building = sum(1 for s in services for role in s.replicas.values() if role == BUILDING)
        yield GaugeMetricFamily("failover_rebuilds_in_progress", "Replicas being built (filled "
                                "from their primary, not yet counted).", value=building)
