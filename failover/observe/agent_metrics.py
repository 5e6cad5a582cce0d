"""An agent's Prometheus metrics (issue 17): what the request path, the log and migrations
count as they happen (`AgentMetrics`, a few counter increments per call), and what is read
from the replicas only when scraped (`AgentCollector`: roles, epochs, indexes, lag).

Every series is named ``failover_...`` and labelled with the ``host`` (this agent's host id),
and where it is about one replica with its ``service`` and ``role``. The registry is this
process's own (`AgentMetrics.registry`), never prometheus_client's global one, so a test that
runs two agents in one process keeps them apart.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from failover import __version__, defaults
from failover.core.roles import PRIMARY, ROLES

log = logging.getLogger(__name__)

# The calls `measure_calls` measures: the Data servicer's method -> op_kind.
_MEASURED = {"Execute": "execute", "Query": "query"}
OTHER_SERVICE = ""  # the service label of a request naming no replica of this host
_REQUEST_BUCKETS = defaults.REQUEST_DURATION_BUCKETS_S


class _Agent(Protocol):
    host_id: str
    replicas: dict[str, Any]


class AgentMetrics:
    """The counters and histograms an agent feeds as things happen, in its own registry
    (with `AgentCollector` registered on it for what is read at scrape time)."""

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.host = agent.host_id
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.wal_fsync = Histogram(
            "failover_wal_fsync_duration_seconds", "One fsync of a write-ahead log append "
            "(one per group commit with fsync policy batch).", ["host"], registry=r,
            buckets=defaults.WAL_FSYNC_BUCKETS_S)
        self.shipped = Counter(
            "failover_shipped_entries", "Log entries this host shipped to duplicas.",
            ["service", "host"], registry=r)
        self.migration_bytes = Counter(
            "failover_migration_bytes", "Bytes of live migrations on the wire (out: this host "
            "was the source; in: the target).", ["service", "host", "direction"], registry=r)
        self.migration_downtime = Gauge(
            "failover_migration_downtime_seconds", "The last migration's pause on this host "
            "(the source applied nothing meanwhile).", ["service", "host"], registry=r)
        build = Gauge("failover_build_info", "1, labelled with the code this agent runs.",
                      ["host", "version", "python"], registry=r)
        build.labels(self.host, __version__, platform.python_version()).set(1)
        self._fsync = self.wal_fsync.labels(self.host)
        # (service, op_kind, outcome) -> [count, seconds in all, count per duration bucket]:
        # plain numbers, turned into series at scrape (`request_families`). A
        # prometheus_client counter and histogram update cost ~10 us a call (locks, label
        # lookups); this costs well under one. Only the event loop writes it.
        self._requests: dict[tuple[str, str, str], list[Any]] = {}
        self._shipped_children: dict[str, Any] = {}  # service -> its shipped entries counter
        r.register(AgentCollector(agent, self))

    # --- the hot path: a dict lookup, a bisect and three additions per call -------------

    def request_done(self, service: str, op_kind: str, outcome: str, seconds: float) -> None:
        """A client call ended (`measure_calls`; on the event loop)."""
        stats = self._requests.get((service, op_kind, outcome))
        if stats is None:
            if service not in self.agent.replicas:
                service = OTHER_SERVICE  # a name from the wire: no new series
            key = (service, op_kind, outcome)
            stats = self._requests.get(key)
            if stats is None:
                stats = self._requests[key] = [0, 0.0, [0] * (len(_REQUEST_BUCKETS) + 1)]
        stats[0] += 1
        stats[1] += seconds
        stats[2][bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1

    def request_families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        """`failover_requests_total` and `failover_request_duration_seconds` (over every
        outcome of a service and call kind) from what `request_done` counted."""
        total = CounterMetricFamily(
            "failover_requests", "Client calls answered, by kind (execute: a write or a read "
            "sent as one; query: a read) and outcome (ok, rejected by the service, or the "
            "gRPC status of a refusal, lower case).",
            labels=["service", "host", "op_kind", "outcome"])
        durations = HistogramMetricFamily(
            "failover_request_duration_seconds", "Time from a client call's arrival to its "
            "answer, on this agent.", labels=["service", "host", "op_kind"])
        merged: dict[tuple[str, str], tuple[float, list[int]]] = {}
        for (service, op_kind, outcome), (count, seconds, buckets) in sorted(
                self._requests.items()):
            total.add_metric([service, self.host, op_kind, outcome], count)
            before = merged.get((service, op_kind), (0.0, [0] * len(buckets)))
            merged[(service, op_kind)] = (before[0] + seconds,
                                          [a + b for a, b in zip(before[1], buckets,
                                                                 strict=True)])
        for (service, op_kind), (seconds, buckets) in merged.items():
            cumulative = list(itertools.accumulate(buckets))
            bounds = [*(repr(float(b)) for b in _REQUEST_BUCKETS), "+Inf"]
            durations.add_metric([service, self.host, op_kind],
                                 list(zip(bounds, cumulative, strict=True)), seconds)
        return total, durations

    def fsync_done(self, seconds: float) -> None:
        """A log append's fsync took `seconds` (`WriteAheadLog.fsync_observer`)."""
        self._fsync.observe(seconds)

    def shipped_entries(self, service: str, count: int) -> None:
        """`count` entries of `service` went out in a batch."""
        if count > 0:
            child = self._shipped_children.get(service)
            if child is None:
                child = self._shipped_children[service] = self.shipped.labels(service,
                                                                              self.host)
            child.inc(count)

    def migrated_bytes(self, service: str, direction: str, count: int) -> None:
        """`count` bytes of a migration of `service` went `direction` (in or out)."""
        if count > 0:
            self.migration_bytes.labels(service, self.host, direction).inc(count)

    def migration_paused(self, service: str, seconds: float) -> None:
        """A migration of `service` from this host cut over after a pause of `seconds`."""
        self.migration_downtime.labels(service, self.host).set(seconds)

    def forget(self, services: set[str]) -> None:
        """Drops the request and shipping series of services no longer on this host (called
        at scrape), so a host that saw many services come and go keeps a bounded set."""
        for service in [s for s in self._shipped_children if s not in services]:
            del self._shipped_children[service]
            with contextlib.suppress(KeyError):
                self.shipped.remove(service, self.host)
        for key in [k for k in self._requests if k[0] and k[0] not in services]:
            del self._requests[key]


class AgentCollector(Collector):
    """What the replicas hold right now, read at scrape time (runs on the agent's event loop:
    the HTTP endpoint calls it there). One replica that cannot report costs only its series."""

    def __init__(self, agent: _Agent, metrics: AgentMetrics | None = None) -> None:
        self.agent = agent
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        host = self.agent.host_id
        labels = ["service", "host", "role"]
        fam = {name: GaugeMetricFamily(f"failover_{name}", text, labels=labels) for name, text in (
            ("epoch", "The replica's epoch (fencing number)."),
            ("durable_index", "The last log entry on this replica's disk."),
            ("commit_index", "The last entry known on every in-sync replica."),
            ("applied_index", "The last entry applied to the state machine."),
            ("replication_lag_entries", "A duplica: entries committed on the primary and not "
             "yet on its disk. A primary: the most a duplica lacks of its durable log."),
            ("snapshot_bytes", "The size of the replica's newest snapshot file."),
            ("replica_broken", "1 when the replica cannot read its own data (it is rebuilt)."),
        )}
        role_family = GaugeMetricFamily(
            "failover_replica_role", "1 for the role the replica holds, 0 for the others.",
            labels=labels)
        in_sync = GaugeMetricFamily(
            "failover_in_sync_members", "A primary: the duplicas in its in-sync set.",
            labels=labels)
        lag_s = GaugeMetricFamily(
            "failover_replication_lag_seconds", "A primary, per in-sync duplica: how long a "
            "sync write may have waited on it (it took nothing while lacking entries).",
            labels=[*labels, "duplica"])
        replicas = list(self.agent.replicas.values())
        for replica in replicas:
            try:
                status = replica.status()
                service, role = replica.service, status["role"]
                values = [service, host, role]
                for name, key in (("epoch", "epoch"), ("durable_index", "durable_index"),
                                  ("commit_index", "commit_index"),
                                  ("applied_index", "applied_index")):
                    fam[name].add_metric(values, status[key])
                fam["replica_broken"].add_metric(values, 1 if status["broken"] else 0)
                fam["replication_lag_entries"].add_metric(values, _lag_entries(replica, status))
                fam["snapshot_bytes"].add_metric(values, _snapshot_bytes(replica))
                for each in ROLES:
                    role_family.add_metric([service, host, each], 1 if each == role else 0)
                if role == PRIMARY:
                    in_sync.add_metric(values, len(status["in_sync"]))
                    for duplica, ms in sorted(status["in_sync_lag_ms"].items()):
                        lag_s.add_metric([*values, duplica], ms / 1000)
            except Exception:  # a replica closing meanwhile: its series are left out
                log.debug("metrics: %s left out of this scrape", replica.service,
                          exc_info=True)
        yield from (role_family, *fam.values(), in_sync, lag_s)
        if self.metrics is not None:
            self.metrics.forget({r.service for r in replicas})
            yield from self.metrics.request_families()


def _lag_entries(replica: Any, status: dict[str, Any]) -> int:
    if status["role"] != PRIMARY:
        return int(status["lag_entries"])
    primary = replica.core.primary
    if primary is None:
        return 0
    durable = status["durable_index"]
    return max((max(0, durable - p.match_index) for p in primary.peers.values()), default=0)


def _snapshot_bytes(replica: Any) -> int:
    """The newest snapshot file's size, unchecked (a stat; checking is the replica's job)."""
    try:
        paths = replica.snapshots.paths()
        return paths[0].stat().st_size if paths else 0
    except OSError:
        return 0


def measure_calls(servicer: Any, metrics: AgentMetrics) -> None:
    """Makes `servicer` (the agent's Data servicer) count and time its Execute and Query
    (`AgentMetrics.request_done`), outcome included, before it is registered: its methods
    are replaced by measured ones. Wrapping the methods costs about half of what a server
    interceptor does per call (measured: ~14 against ~30 us on this machine); calls the
    role check refuses never reach them and are not counted here."""
    for name, op_kind in _MEASURED.items():
        setattr(servicer, name, _measured(getattr(servicer, name), op_kind,
                                          metrics.request_done))


_DATA_PREFIX = "/failover.v1.Data/"
_REFUSED_KINDS = {f"{_DATA_PREFIX}{name}": op_kind for name, op_kind in
                  (*_MEASURED.items(), ("ExecuteStream", "execute"))}


def count_refused(agent: Any) -> Callable[[str, Any], None]:
    """What the role check (`RoleCheck`'s `refused`) tells of each client call it refuses:
    counted in `requests_total` as `permission_denied` with the service the request names
    ("" for a stream, whose calls are not read), as a refused Execute or Query is counted by
    `measure_calls`. Reads `agent.metrics` at each call: None (no --metrics-listen) counts
    nothing."""

    def refused(method: str, request: Any) -> None:
        metrics = agent.metrics
        op_kind = _REFUSED_KINDS.get(method)
        if metrics is None or op_kind is None:
            return  # not a client call: control and replication calls are not requests
        service = getattr(request, "service", OTHER_SERVICE) if request is not None else ""
        metrics.request_done(service, op_kind, "permission_denied", 0.0)

    return refused


def _measured(behavior: Callable[[Any, Any], Awaitable[Any]], op_kind: str,
              done: Callable[[str, str, str, float], None],
              ) -> Callable[[Any, Any], Awaitable[Any]]:
    clock = time.perf_counter

    async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = clock()
        outcome = "unknown"
        try:
            reply = await behavior(request, context)
            outcome = "rejected" if reply.HasField("rejected") else "ok"
            return reply
        except BaseException:
            code = context.code()
            outcome = code.name.lower() if isinstance(code, grpc.StatusCode) else (
                "cancelled" if context.cancelled() else "unknown")
            raise
        finally:
            done(request.service, op_kind, outcome, clock() - started)

    return measured
