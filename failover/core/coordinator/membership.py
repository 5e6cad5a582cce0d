"""Hosts and the in-sync set (docs/design.md, Failure detection and In-sync set).

Events in: a host registers, a heartbeat with its replicas' reports, a planned restart (a
patch), each with the monotonic time as an argument. Actions out: the persisted host and
service records and history rows, re-sent assignments, drops of replicas a host should not
hold. `Membership` keeps the in-sync set of each service and changes it only here: a member
leaves (persisted before its primary is told, invariant 3) when its host goes silent, its
disk is full, it is broken, it lags, or its host restarts for a patch; it rejoins once it
holds its primary's commit index, and becomes promotable once its primary counts it at the
current generation and it holds what the primary had acknowledged then.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from failover import defaults
from failover.core.coordinator.actions import Action, DropReplica, Persist, StepDown
from failover.core.coordinator.model import (
    HOST_PREFIX,
    SERVICE_PREFIX,
    CoreState,
    HostInfo,
    HostLive,
    ReplicaReport,
    ServiceInfo,
    pack,
    set_in_sync,
)
from failover.core.names import check_host_id, check_service_name
from failover.core.roles import BUILDING, DUPLICA, PRIMARY
from failover.errors import InvalidRequest, Overloaded

# The metrics a host reports, and the largest value each may take (a larger, negative or
# non-finite one is not a real host's).
_METRIC_MAX = {
    "cpu_percent": 100.0,
    "memory_percent": 100.0,
    "disk_free_bytes": float(defaults.HOST_METRIC_BYTES_MAX),
    "disk_total_bytes": float(defaults.HOST_METRIC_BYTES_MAX),
    "memory_total_bytes": float(defaults.HOST_METRIC_BYTES_MAX),
    "cpu_count": float(defaults.HOST_METRIC_CPUS_MAX),
}


def check_metrics(host_id: str, metrics: dict[str, float] | None) -> None:
    """Raises InvalidRequest unless every metric is finite and within what a real host has
    (`HOST_METRIC_BYTES_MAX`, `HOST_METRIC_CPUS_MAX`, percentages 0-100), and the free disk
    is no more than the whole: a rogue claiming 2^60 free bytes must not win placement."""
    for name, value in (metrics or {}).items():
        bound = _METRIC_MAX.get(name)
        if bound is None:
            raise InvalidRequest(f"host {host_id}: unknown metric {name!r}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or \
                not 0 <= value <= bound:
            raise InvalidRequest(f"host {host_id}: metric {name} = {value!r} is not a real "
                                 f"host's (0..{bound:g}); the report was refused")
    free = (metrics or {}).get("disk_free_bytes", 0.0)
    total = (metrics or {}).get("disk_total_bytes", 0.0)
    if total and free > total:
        raise InvalidRequest(f"host {host_id}: {free:g} free disk bytes of {total:g}; the "
                             "report was refused")


@functools.lru_cache(maxsize=defaults.HEARTBEAT_REPLICAS_MAX)
def _check_name(name: str) -> bool:
    """`check_service_name`, remembering the names it passed: the same names come in every
    heartbeat (a refused one raises, and is checked again next time)."""
    check_service_name(name)
    return True


class Membership(CoreState):
    """Part of `CoordinatorCore`: registration, heartbeats, leases granted, the in-sync
    set and promotability."""

    def register(self, info: HostInfo, now_ms: int,
                 metrics: dict[str, float] | None = None) -> list[Action]:
        """A host's agent started (or re-registers).

        Refused (InvalidRequest, nothing changed): a host id outside the name rule, absurd
        metrics, and a new address for a host that is alive (it heartbeated within the
        failure timeout): a host moves only after it stopped, so that a forged registration
        cannot route its clients elsewhere while it serves."""
        if not info.host_id or not info.address:
            raise InvalidRequest("register needs a host_id and an address")
        check_host_id(info.host_id)
        check_metrics(info.host_id, metrics)
        known = self.hosts.get(info.host_id)
        if known is None and len(self.hosts) >= defaults.COORDINATOR_HOSTS_MAX:
            raise Overloaded(f"{len(self.hosts)} hosts are registered already "
                             f"(coordinator_hosts_max); {info.host_id} was not")
        actions: list[Action] = []
        if known is not None:
            live = self.live.get(info.host_id)
            if (known.address != info.address and live is not None and live.alive
                    and self.silent_ms(live, now_ms) < self.timing.failure_timeout_ms):
                raise InvalidRequest(
                    f"host {info.host_id} is alive at {known.address} (it heartbeated "
                    f"{now_ms - live.last_heartbeat_ms} ms ago): a host registers at a new "
                    f"address only after it stopped for failure_timeout_ms "
                    f"({self.timing.failure_timeout_ms}); stop the old agent first")
            info.draining = known.draining
            self._check_incarnation(known, info, live, now_ms)
        if known != info:
            self.hosts[info.host_id] = info
            actions.append(Persist({HOST_PREFIX + info.host_id: pack(info)},
                                   history=(("", "host", f"host {info.host_id} registered at "
                                             f"{info.address}", {"host_id": info.host_id}),)))
        before = self.live.get(info.host_id)
        self.live[info.host_id] = HostLive(last_heartbeat_ms=now_ms, metrics=dict(metrics or {}),
                                           stalled_mark_ms=self.stalled_ms,
                                           exited=before.exited if before is not None else 0)
        self._loads.pop(info.host_id, None)
        self._forget_deposed(info.host_id)
        self._attend_host(info.host_id)  # it reports nothing yet: its primaries are unsettled
        # Tell the host what it holds (it recovers from disk, but may have missed a change).
        for service in self._holding(info.host_id):
            actions.extend(self._assignments(service, only=info.host_id))
        if known is None or known.address != info.address:
            routed = [s.name for s in self._holding(info.host_id) if s.primary == info.host_id]
            if known is None:
                self._route_changed(*routed)  # (a record naming a host not yet registered)
            else:
                actions.extend(self._bump_routes(*routed))
        return actions

    def _check_incarnation(self, known: HostInfo, info: HostInfo, live: HostLive | None,
                           now_ms: int) -> None:
        """Refuses (InvalidRequest) the registration of an agent process that has exited:
        one its supervisor reported exited (or older), and, while the host is alive, one
        older than the process registered (a late registration of a process restarted
        since). Only the registered incarnation is granted leases, and an exit report of it
        lets a failover skip the lease wait (`Detector.process_exited`): an older process
        taking its place would let a late report of that one cut a live lease short."""
        if not info.incarnation:
            return
        if live is not None and info.incarnation <= live.exited:
            raise InvalidRequest(
                f"host {info.host_id}: agent process incarnation {info.incarnation} was "
                f"reported exited (up to {live.exited}); a restarted agent registers with "
                "a newer one")
        if (info.incarnation < known.incarnation and live is not None and live.alive
                and self.silent_ms(live, now_ms) < self.timing.failure_timeout_ms):
            raise InvalidRequest(
                f"host {info.host_id}: agent process incarnation {info.incarnation} is older "
                f"than incarnation {known.incarnation}, alive and registered: a late "
                "registration of a process restarted since, refused")

    def heartbeat(self, host_id: str, metrics: dict[str, float],
                  replicas: list[ReplicaReport], now_ms: int,
                  incarnation: int = 0) -> tuple[list[tuple[str, int, int]], list[Action]]:
        """A host is alive; returns the leases granted [(service, epoch, lease_ms)] and
        actions (re-assignments of replicas that disagree with the record, in-sync changes).

        `incarnation` is the agent process's (0: no supervisor). A heartbeat of another
        incarnation than the one registered is refused as not registered (the agent then
        registers): a lease goes only to the registered process, the one an exit report
        names (`Detector.process_exited`)."""
        check_host_id(host_id)
        info = self.hosts.get(host_id)
        if info is None:
            raise InvalidRequest(f"host {host_id!r} is not registered: register first")
        if incarnation != info.incarnation:
            raise InvalidRequest(
                f"host {host_id!r} is not registered as agent process incarnation "
                f"{incarnation} (incarnation {info.incarnation} is): register first")
        live_now = self.live.get(host_id)
        if live_now is not None and incarnation and incarnation <= live_now.exited:
            raise InvalidRequest(
                f"host {host_id!r} is not registered: its agent process incarnation "
                f"{incarnation} was reported exited; a late heartbeat, refused")
        if len(replicas) > defaults.HEARTBEAT_REPLICAS_MAX:
            raise InvalidRequest(f"host {host_id}: a heartbeat of {len(replicas)} replicas is "
                                 f"over heartbeat_replicas_max "
                                 f"({defaults.HEARTBEAT_REPLICAS_MAX}); refused")
        check_metrics(host_id, metrics)
        current = {r.service: r for r in replicas}
        held_names = self._held.get(host_id, set())
        unknown = not current.keys() <= held_names
        if unknown:
            # The names of this host's services are those of services: only the others
            # can be malformed.
            for report in replicas:
                _check_name(report.service)
        live = self.live.get(host_id)
        if live is None:
            live = self.live[host_id] = HostLive(last_heartbeat_ms=now_ms,
                                                 stalled_mark_ms=self.stalled_ms)
            self._attend_host(host_id)
        actions: list[Action] = []
        if live.dead:
            actions.append(Persist({}, history=(("", "host", f"host {host_id} is back after "
                                                 "being declared dead", {"host_id": host_id}),)))
        if live.dead or not live.alive:
            self._attend_host(host_id)  # its replicas count again
        live.last_heartbeat_ms = now_ms
        live.stalled_mark_ms = self.stalled_ms
        live.alive = True
        live.dead = False
        if metrics != live.metrics:
            # A copy, kept while they stay the same: placement keeps this host's view as
            # long as it holds the same metrics (`Redundancy._host_views`).
            live.metrics = dict(metrics)
        reported = live.replicas
        live.replicas = current
        if reported.keys() != current.keys():
            self._loads.pop(host_id, None)  # what it does not report yet changed
        self._forget_deposed(host_id)
        leases: list[tuple[str, int, int]] = []
        if unknown:
            actions.extend(self._drop_unknown(host_id, replicas, now_ms))
        # Only this host's services: a heartbeat costs O(replicas on the host). A replica
        # that has carried out its assignment and reports nothing to act on takes the short
        # way (what the full rules, `_beat`, would do for it: nothing but a lease); any
        # other goes through `_beat`.
        reassigned, seen = self._reassigned_ms, self._truncated_seen
        progress, counted = self._primary_progress, self._counted_generation
        failovers = self.failovers
        lease_ms = self.timing.lease_ms
        lag_max_ms = self.timing.insync_lag_ms
        expiry_ms = now_ms + lease_ms
        held = self._holding(host_id)
        for service in held:
            name = service.name
            report = current.get(name)
            if report is None:
                actions.extend(self._beat(service, host_id, None, now_ms, leases))
                continue
            if service.primary == host_id:
                if report.role != PRIMARY:
                    actions.extend(self._beat(service, host_id, report, now_ms, leases))
                    continue
                actions.extend(self._shrink_silent_members(service, report, now_ms))
                # Its durable index and how fast it grows: the bound of its duplicas'
                # matched indexes (`_matched`).
                rate = 0.0
                last = progress.get(name)
                if last is not None and last[0] == host_id and last[1] == report.epoch:
                    elapsed = now_ms - last[2]
                    grown = report.durable_index - last[3]
                    rate = grown / elapsed if grown > 0 and elapsed > 0 else (
                        0.0 if elapsed > 0 else last[4])
                    if rate < last[4] / 2:
                        rate = last[4] / 2
                progress[name] = (host_id, report.epoch, now_ms, report.durable_index, rate)
                lags = report.in_sync_lag_ms
                if not (report.epoch == service.epoch and not report.broken
                        and not report.disk_full and report.in_sync is not None
                        and report.in_sync_generation == service.in_sync_generation
                        and report.in_sync == tuple(service.in_sync)
                        and (report.duplicas is None
                             or self._ships_to_record(service, report.duplicas))
                        and (not lags or max(lags.values()) <= lag_max_ms)
                        and counted.get(name) == service.in_sync_generation
                        and not report.truncated_entries
                        and (not seen or (host_id, name) not in seen)):
                    actions.extend(self._beat(service, host_id, report, now_ms, leases))
                    continue
                if name not in failovers:
                    self.leases[name] = (host_id, expiry_ms)
                    leases.append((name, service.epoch, lease_ms))
            elif not (report.epoch == service.epoch
                      and report.role == service.replicas[host_id] != PRIMARY
                      and (report.primary_host_id is None
                           or report.primary_host_id == service.primary)
                      and not report.broken and not report.disk_full
                      and not report.truncated_entries
                      and (not seen or (host_id, name) not in seen)):
                actions.extend(self._beat(service, host_id, report, now_ms, leases))
                continue
            if reassigned:
                reassigned.pop((host_id, name), None)
            in_sync = service.in_sync
            if service.promotable != in_sync or (
                    len(in_sync) > 1 and not (len(in_sync) == 2 and in_sync[0] < in_sync[1])
                    and in_sync != sorted(in_sync)):
                actions.extend(self._update_promotable(service))
        actions.extend(self._grow_in_sync(now_ms, held))
        return leases, self._attend_written(actions)

    def _ships_to_record(self, service: ServiceInfo, duplicas: tuple[str, ...]) -> bool:
        """Whether a primary that reports shipping to `duplicas` ships to the record's."""
        return set(duplicas) == {h for h, r in service.replicas.items()
                                 if r != PRIMARY and h != service.primary and h in self.hosts}

    def _beat(self, service: ServiceInfo, host_id: str, report: ReplicaReport | None,
              now_ms: int, leases: list[tuple[str, int, int]]) -> list[Action]:
        """The rules of a heartbeat for one replica it reports (`report`, None if it does
        not): an assignment it missed is sent again, a broken replica serves nothing, a
        primary's report sets thresholds and may take lagging members out, a full disk
        takes a duplica out, promotability, the primary's lease (added to `leases`), and a
        rejoin that dropped entries is recorded. A primary's progress is noted before."""
        name = service.name
        role = service.replicas[host_id]
        is_primary = service.primary == host_id
        wanted = PRIMARY if is_primary else role
        if is_primary:
            if (report is None or report.epoch != service.epoch or report.role != PRIMARY
                    or report.broken or report.disk_full):
                self._attention.add(name)  # not a serving primary: the service is unsettled
        elif report is not None and report.broken:
            self._attention.add(name)
        key = (host_id, name)
        stale_members = (
            wanted == PRIMARY and report is not None and report.in_sync is not None
            and (report.in_sync_generation != service.in_sync_generation
                 or (report.in_sync != tuple(service.in_sync)
                     and set(report.in_sync) != set(service.in_sync)))
        )
        if report is None or report.epoch != service.epoch or report.role != wanted or (
                stale_members or self._stale_peers(service, host_id, report)):
            # It missed (or has not yet carried out) its assignment: send it again, at most
            # once per failure timeout.
            last = self._reassigned_ms.get(key)
            if name not in self.switchovers and (
                last is None or now_ms - last >= self.timing.failure_timeout_ms
            ):
                self._reassigned_ms[key] = now_ms
                return self._assignments(service, only=host_id)
            return []
        if self._reassigned_ms:
            self._reassigned_ms.pop(key, None)
        actions: list[Action] = []
        if report.broken:
            # No lease, no threshold, no promotion: a broken primary is failed over by
            # `tick`, a broken duplica leaves the in-sync set now and is rebuilt.
            if (wanted != PRIMARY and host_id in service.in_sync
                    and self._may_leave_in_sync(name, host_id)):
                actions.extend(self._shrink_in_sync(service, host_id, (
                    f"it cannot read its own snapshot or log: {report.broken}")))
            return actions
        lags = report.in_sync_lag_ms
        if wanted == PRIMARY and report.in_sync is not None and not (
                # Nothing to change (it reports the current set, every member has its
                # threshold, none lags past `insync_lag_ms`, every promotable member is
                # counted): the rules would keep everything as it is. A primary reports
                # every member's lag, 0 when it holds everything: taking any report of lags
                # as a change sent every primary's every heartbeat through these rules (and
                # `heartbeat`'s short way never held for a primary).
                (not lags or max(lags.values()) <= self.timing.insync_lag_ms)
                and self._counts_all(service)):
            actions.extend(self._count_members(service, report))
        if (wanted != PRIMARY and report.disk_full and host_id in service.in_sync
                and self._may_leave_in_sync(name, host_id)):
            # It cannot take the primary's entries: sync writes would wait on it.
            actions.extend(self._shrink_in_sync(service, host_id, "its disk is full"))
        actions.extend(self._update_promotable(service))
        if wanted == PRIMARY and name not in self.failovers:
            self.leases[name] = (host_id, now_ms + self.timing.lease_ms)
            leases.append((name, service.epoch, self.timing.lease_ms))
        if report.truncated_entries != self._truncated_seen.get(key, 0):
            if report.truncated_entries:
                self._truncated_seen[key] = report.truncated_entries
                actions.append(Persist({}, history=((
                    name, "rejoin",
                    f"{host_id} rejoined {name} as duplica, dropping "
                    f"{report.truncated_entries} divergent entries",
                    {"host_id": host_id, "truncated_entries": report.truncated_entries}),)))
            else:
                del self._truncated_seen[key]  # as good as 0: only counts not 0 are kept
        return actions

    def _stale_peers(self, service: ServiceInfo, host_id: str, report: ReplicaReport) -> bool:
        """Whether the replica holds other peers than its assignment names: a non-primary
        that knows another primary (or none: it then refuses the primary's stream, taking
        items only from its named primary), a primary that ships to another duplica set
        (a new copy would then never be fed). Role and epoch alone do not show an
        assignment that was lost, or refused for a full disk after a step-down."""
        if service.primary == host_id:
            return report.duplicas is not None and not self._ships_to_record(service,
                                                                            report.duplicas)
        return report.primary_host_id is not None and report.primary_host_id != service.primary

    def _counts_all(self, service: ServiceInfo) -> bool:
        """Whether the primary's report changes nothing of `service`'s thresholds and
        promotable members (`_count_members`), given it reports no lag: every member has
        its threshold, no other host has one, and every promotable member is in sync."""
        generation = service.in_sync_generation
        if self._counted_generation.get(service.name) == generation:
            return True
        thresholds = self._promotable_at.get(service.name)
        in_sync = service.in_sync
        if thresholds is None or len(thresholds) != len(in_sync):
            return False
        for member in in_sync:
            if member not in thresholds:
                return False
        if not all(member in in_sync for member in service.promotable):
            return False
        # It stays so until the in-sync set changes: thresholds and promotable members
        # change otherwise only within the set (`_count_members`, `_update_promotable`),
        # and every change of the set raises the generation.
        self._counted_generation[service.name] = generation
        return True

    def _may_leave_in_sync(self, name: str, host_id: str) -> bool:
        """Whether `host_id` may be dropped from `name`'s in-sync set now: any member but the
        target of a switchover in progress (it is about to be promoted, and must stay in
        sync for that; the switchover times out if it cannot). The others must be able to
        leave: the switchover holds writes until every logged write is committed, and the
        commit waits for every in-sync member, so one that cannot keep up (its disk full)
        held writes for the whole switchover timeout."""
        return self.switchovers.get(name) != host_id

    def _count_members(self, service: ServiceInfo, report: ReplicaReport) -> list[Action]:
        """A serving primary reported the in-sync set it applies (at the current
        generation): thresholds for the members it counts, the members it reports lagging
        leave the set, and promotable members it does not count stop being promotable."""
        assert report.in_sync is not None
        actions: list[Action] = []
        counted = set(service.in_sync) & set(report.in_sync)
        thresholds = self._promotable_at.setdefault(service.name, {})
        for member in counted:
            # The primary's durable index bounds every write it acknowledged, also
            # before a restart (its reported commit index starts again from zero).
            thresholds.setdefault(member, report.durable_index)
        for member in [m for m in thresholds if m not in counted]:
            del thresholds[member]
        lagging = sorted(h for h, lag in report.in_sync_lag_ms.items()
                         if lag > self.timing.insync_lag_ms and h in service.in_sync
                         and self._may_leave_in_sync(service.name, h)
                         ) if report.in_sync_lag_ms else []
        if lagging:
            for member in lagging:
                lag = (report.in_sync_lag_ms or {})[member]
                actions.extend(self._shrink_in_sync(service, member, (
                    f"its primary has waited {lag} ms for it to take entries "
                    f"(insync_lag_ms={self.timing.insync_lag_ms})")))
            counted -= set(lagging)
        uncounted = [h for h in service.promotable if h not in counted]
        if uncounted:
            # The primary (at the current generation) does not count them: it may
            # acknowledge writes they lack, so they must not be promoted.
            service.promotable = [h for h in service.promotable if h in counted]
            actions.append(Persist({SERVICE_PREFIX + service.name: pack(service)},
                                   history=((
                service.name, "in_sync", f"{', '.join(uncounted)} no longer "
                f"promotable for {service.name}: its primary does not count them",
                {"hosts": uncounted, "promotable": list(service.promotable)}),)))
        return actions

    def _forget_deposed(self, host_id: str) -> None:
        """A host heard from again: its deposed primaries count again."""
        if any(k[1] == host_id for k in self._deposed):
            self._deposed = {k for k in self._deposed if k[1] != host_id}

    def _drop_unknown(self, host_id: str, replicas: list[ReplicaReport],
                      now_ms: int) -> list[Action]:
        """A host reports a replica the records do not give it (retired while the host was
        away, or of a deleted service): tell it to drop it, at most once per failure
        timeout. It serves nothing meanwhile: it holds no role the coordinator confirms.
        At most `HEARTBEAT_DROPS_MAX` drops per heartbeat: the others wait for a later one
        (a forged report of thousands must not fill the host's queue)."""
        actions: list[Action] = []
        waiting = 0
        for report in replicas:
            service = self.services.get(report.service)
            if service is not None and host_id in service.replicas:
                continue
            moving = self.migrations.get(report.service)
            if moving is not None and moving[1] == host_id:
                continue  # a migration's copy, not yet a member: it is added when done
            key = (host_id, report.service)
            last = self._reassigned_ms.get(key)
            if last is not None and now_ms - last < self.timing.failure_timeout_ms:
                continue
            if len(actions) >= defaults.HEARTBEAT_DROPS_MAX:
                waiting += 1
                continue
            self._reassigned_ms[key] = now_ms
            epoch = max(report.epoch, service.epoch if service is not None else 0)
            address = self.hosts[host_id].address
            if report.role == PRIMARY and epoch > report.epoch:
                # A deposed primary that never heard of the newer epoch (cut off, not
                # restarted): an agent deletes a serving primary's data only at its own
                # epoch, so it is stepped down first, on the same ordered queue.
                actions.append(StepDown(host_id, address, report.service, epoch))
            actions.append(DropReplica(host_id, address, report.service, epoch))
        if waiting:
            self.notices.append(
                f"host {host_id} reports {waiting} more replicas the records do not give it "
                f"than heartbeat_drops_max ({defaults.HEARTBEAT_DROPS_MAX}) drops at once; "
                "they are dropped on later heartbeats")
        return actions

    def _update_promotable(self, service: ServiceInfo) -> list[Action]:
        """Promotable: in sync, counted by the primary, and holding everything the primary
        had acknowledged when it started counting (persisted when it changes)."""
        if service.promotable == service.in_sync and (
                len(service.in_sync) < 2 or service.in_sync == sorted(service.in_sync)):
            return []  # every member is promotable already: what follows would keep it so
        promotable = []
        for member in service.in_sync:
            threshold = self._promotable_at.get(service.name, {}).get(member)
            live = self.live.get(member)
            report = live.replicas.get(service.name) if live else None
            if (member in service.promotable
                    or (threshold is not None and report is not None
                        and report.epoch == service.epoch
                        and self._matched(service, member, report) >= threshold)):
                promotable.append(member)
        promotable.sort()
        if promotable == service.promotable:
            return []
        service.promotable = promotable
        return [Persist({SERVICE_PREFIX + service.name: pack(service)})]

    def _matched(self, service: ServiceInfo, host_id: str, report: ReplicaReport) -> int:
        """A duplica's matched index as far as its primary's own reports bear it out, or -1
        (not acted on) beyond that: beyond the durable index the primary last reported at
        this epoch plus what it can have logged between that report and the duplica's, at
        twice its recent rate and a batch more. An honest report racing ahead of its
        primary's heartbeat counts; a forged 10^9 never does, and is noted once."""
        if host_id == service.primary:
            return report.matched_index
        progress = self._primary_progress.get(service.name)
        if progress is None or progress[0] != service.primary or progress[1] != report.epoch:
            return -1
        _primary, _epoch, reported_ms, durable, rate = progress
        live = self.live.get(host_id)
        since_ms = max(0, (live.last_heartbeat_ms if live is not None else 0) - reported_ms)
        bound = durable + int(2 * rate * since_ms) + defaults.BATCH_ENTRIES_MAX
        if report.matched_index <= bound:
            return report.matched_index
        noted = (host_id, service.name, report.epoch)
        if noted not in self._unverified_noted:
            self._unverified_noted.add(noted)
            self.notices.append(
                f"{host_id} reports matched index {report.matched_index} of {service.name}, "
                f"beyond what its primary {service.primary} can have logged (about {bound}): "
                "ignored until the primary reports it")
        return -1

    def _forget_thresholds(self, service: str) -> None:
        """Thresholds were the old primary's durable index: a new primary sets its own."""
        self._promotable_at.pop(service, None)

    def _shrink_silent_members(self, service: ServiceInfo, report: ReplicaReport,
                               now_ms: int) -> list[Action]:
        """The in-sync members of `service` whose hosts are silent leave the set, if its
        primary (`report`, its beat now) waits on them; called as the primary beats.

        Silent: suspected, or reported exited. A suspected member leaves once the primary
        lacks it too: it lags by `HEARD_WITHIN_HEARTBEATS` heartbeat intervals or more (the
        window in which a duplica still hears its primary), or the primary reports no lag
        for it. One that takes the primary's entries stays: sync writes do not wait on it, and
        taking it out would only make it unpromotable although it holds every write that
        primary acknowledged. Under the storm's load the coordinator suspected live hosts by
        the handful and took hundreds of members out and back in within seconds (a commit
        and a primary's assignment each way); a primary killed in between left its service
        with nobody to promote until the killed host came back. A primary that lacks nothing
        (lag 0: idle, or the member holds everything) cannot tell: such a member leaves once
        silent for twice the failure timeout, no late heartbeat then, so an idle primary's
        next write does not wait on it. A member reported exited is dead for certain: it
        leaves at once.

        A member leaves only as its primary beats, not at the tick that finds it silent: a
        shrink takes effect once the primary is told (it then acknowledges writes without
        the member), and a dead primary cannot be. Taken out at the tick, a late duplica
        whose primary had just died left that service with nobody to promote (storm: 9 of
        30 services, and 1 when the tick waited for the primary's own silence too, as their
        silences crossed the timeout milliseconds apart). The primary's beat shows it alive
        a moment before the shrink is sent."""
        live = self.live
        silent = [h for h in service.in_sync if h in live and not live[h].alive]
        if not silent:
            return []  # the common case, on every primary's every beat: nothing to do
        lags = report.in_sync_lag_ms or {}
        waited_ms = defaults.HEARD_WITHIN_HEARTBEATS * self.timing.heartbeat_ms
        long_silent_ms = 2 * self.timing.failure_timeout_ms
        actions: list[Action] = []
        for host in silent:
            lag = lags.get(host)
            if live[host].exited:
                why = "its agent process exited"
            elif lag is None or lag >= waited_ms:
                why = "stopped heartbeating" + (
                    f", and its primary has waited {lag} ms for it" if lag else "")
            elif lag == 0 and (silent_ms := self.silent_ms(live[host], now_ms)) >= long_silent_ms:
                why = f"stopped heartbeating {silent_ms} ms ago"
            else:
                continue  # it takes its primary's entries (or nothing waits on it yet)
            actions.extend(self._shrink_in_sync(service, host, why))
        return actions

    # --- in-sync set ------------------------------------------------------------------------

    def _shrink_in_sync(self, service: ServiceInfo, host_id: str, why: str) -> list[Action]:
        """Removes a duplica from the in-sync set: persisted first, then the primary is told,
        so the primary never acknowledges without a member before that is durable."""
        set_in_sync(service, [h for h in service.in_sync if h != host_id])
        service.promotable = [h for h in service.promotable if h != host_id]
        self._promotable_at.get(service.name, {}).pop(host_id, None)
        persist = Persist({SERVICE_PREFIX + service.name: pack(service)}, history=((
            service.name, "in_sync", f"{host_id} left the in-sync set of {service.name}: {why}",
            {"host_id": host_id, "in_sync": list(service.in_sync)}),))
        return [persist, *self._assignments(service, only=service.primary)]

    def _grow_in_sync(self, now_ms: int,
                      services: list[ServiceInfo] | None = None) -> list[Action]:
        """Adds back a live duplica that has caught up with its primary's commit index: of
        `services` (a heartbeat passes its host's; what a join needs is the reports of the
        primary and of the duplica, so each is looked at when either beats), or of all."""
        actions: list[Action] = []
        for service in self.services.values() if services is None else services:
            if len(service.in_sync) + 1 >= len(service.replicas):
                continue  # every duplica is in sync (`set_in_sync`): nobody to add
            if service.name in self.failovers or service.name in self.switchovers:
                continue
            primary_live = self.live.get(service.primary)
            if primary_live is None or not primary_live.alive:
                continue
            primary_report = primary_live.replicas.get(service.name)
            if (primary_report is None or primary_report.epoch != service.epoch
                    or primary_report.in_sync_generation != service.in_sync_generation):
                # Its commit index must be that of the current set: one from before a
                # member left for lagging is still held back by it, and would let it back.
                continue
            for host in service.duplicas():
                if host in service.in_sync or host in self.patching:
                    continue  # a host being patched rejoins once it has restarted
                live = self.live.get(host)
                report = live.replicas.get(service.name) if live else None
                role = service.replicas[host]
                if (
                    live is not None and live.alive and report is not None
                    and report.epoch == service.epoch and report.role == role
                    and role in (DUPLICA, BUILDING) and not report.disk_full
                    and not report.broken
                    # Not the durable index: a tail the primary has not checked may diverge.
                    and self._matched(service, host, report) >= primary_report.commit_index
                ):
                    set_in_sync(service, sorted({*service.in_sync, host}))
                    if role == BUILDING:
                        # Built: it holds the whole committed log, and joins as a duplica.
                        service.replicas[host] = DUPLICA
                        since = self._building_since.pop((service.name, host), None)
                        event: tuple[str, str, str, dict[str, Any]] = (
                            service.name, "rebuilt",
                            f"{host} was built for {service.name} up to index "
                            f"{report.matched_index} and joined the in-sync set",
                            {"host_id": host, "in_sync": list(service.in_sync),
                             "matched_index": report.matched_index,
                             "build_ms": now_ms - since if since is not None else None})
                    else:
                        event = (service.name, "in_sync",
                                 f"{host} joined the in-sync set of {service.name}",
                                 {"host_id": host, "in_sync": list(service.in_sync)})
                    actions.append(Persist({SERVICE_PREFIX + service.name: pack(service)},
                                           history=(event,)))
                    if role == BUILDING:
                        actions.extend(self._assignments(service, only=host))
                    actions.extend(self._assignments(service, only=service.primary))
        return actions

    def restart_planned(self, host_id: str) -> list[Action]:
        """A host is about to restart (a patch): its duplicas leave the in-sync sets first,
        so that no sync write waits on them; they rejoin once caught up."""
        actions: list[Action] = []
        for service in self._holding(host_id):
            if host_id in service.in_sync and service.primary != host_id:
                actions.extend(self._shrink_in_sync(service, host_id, "its host restarts for "
                                                    "a patch"))
        return actions
