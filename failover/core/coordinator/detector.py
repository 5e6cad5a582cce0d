"""Failure detection and fenced promotion (docs/design.md, Failure detection).

Events in: a tick with the monotonic time, the duplicas' answers to `AskHearsPrimary`
(`hears_primary`). Actions out: history rows, the question to the duplicas of a silent
primary, and a promotion: the new epoch persisted before the assignments, the step-down of
the old primary and the new routes (invariant 1). A host silent for a failure timeout is
suspected (it leaves the in-sync sets); one silent for `host_dead_ms` is dead (its replicas
stop counting). A primary is failed over only when none of its duplicas still hears it,
only to a promotable in-sync member (invariant 3), and only once the lease the coordinator
granted it has ended plus the drift margin (invariant 6).
"""

from __future__ import annotations

from failover import defaults
from failover.core.coordinator.actions import (
    Action,
    AskHearsPrimary,
    HearsAnswer,
    Persist,
    StepDown,
)
from failover.core.coordinator.model import (
    SERVICE_PREFIX,
    CoreState,
    Failover,
    HostLive,
    ServiceInfo,
    hand_over,
    pack,
    set_in_sync,
)
from failover.core.names import check_host_id
from failover.errors import InvalidRequest


class Detector(CoreState):
    """Part of `CoordinatorCore`: suspicion, death, failover and leases."""

    def _detect(self, now_ms: int) -> list[Action]:
        """Detects silent and dead hosts, starts failovers of silent (or broken) primaries,
        and promotes once a waited-out lease has ended."""
        actions: list[Action] = []
        timeout = self.timing.failure_timeout_ms
        for host_id, live in self.live.items():
            if live.alive and self.silent_ms(live, now_ms) > timeout:
                live.alive = False
                # None of its replicas is good now. Its duplicas leave the in-sync sets as
                # their primaries beat (`Membership._shrink_silent_members`).
                self._attend_host(host_id)
            if (not live.alive and not live.dead
                    and self.silent_ms(live, now_ms) > self.timing.host_dead_ms):
                live.dead = True
                self._attend_host(host_id)  # its replicas no longer count
                held = sorted(s.name for s in self._holding(host_id))
                actions.append(Persist({}, history=(("", "host", (
                    f"host {host_id} declared dead after {self.timing.host_dead_ms} ms of "
                    f"silence; rebuilding its replicas elsewhere: {', '.join(held) or 'none'}"),
                    {"host_id": host_id, "services": held}),)))
        # A service whose primary is silent or broken is not settled: it is among those the
        # tick looks at (`_attending`), in the order of `services`.
        for service in self._attending():
            # A primary whose host is silent: ask its duplicas, again every failure timeout
            # for as long as it stays silent (an answer "we still hear it" may go stale).
            live = self.live.get(service.primary)
            # A live primary that cannot read its own data serves nothing: fail it over too.
            if live is None:
                continue
            if live.alive:
                report = live.replicas.get(service.name)
                if report is None or not report.broken:
                    continue
            if service.name in self.failovers or service.name in self.switchovers:
                continue
            asked = self._asked_ms.get(service.name)
            if asked is not None and now_ms - asked < timeout:
                continue
            actions.append(self._start_failover(service, live, now_ms))
        for failover in list(self.failovers.values()):
            if failover.state == "waiting_lease" and now_ms >= failover.lease_expiry_ms:
                actions.extend(self._promote(failover, now_ms))
        return actions

    def hears_timeout_ms(self, host_id: str, now_ms: int) -> int:
        """How long the coordinator waits for `host_id`'s answer to an AskHearsPrimary: for
        a host it still hears (alive, heard within the failure timeout), as long as it would
        take to suspect it, `failure_timeout_ms`; for any other, `HEARS_PRIMARY_TIMEOUT_MS`.
        An answer that misses the wait counts as unreachable, and a service whose only
        candidate it was is asked again a failure timeout later: under the storm's load a
        live survivor answered in 200-300 ms, and those failovers took 480 ms longer."""
        live = self.live.get(host_id)
        if (live is not None and live.alive
                and self.silent_ms(live, now_ms) <= self.timing.failure_timeout_ms):
            return max(defaults.HEARS_PRIMARY_TIMEOUT_MS, self.timing.failure_timeout_ms)
        return defaults.HEARS_PRIMARY_TIMEOUT_MS

    def hears_primary(self, service_name: str, answers: list[HearsAnswer],
                      now_ms: int) -> list[Action]:
        """The duplicas answered whether they still hear the suspected primary (the core's
        `hears_primary` and `hears_primary_many` run it in a decision round)."""
        failover = self.failovers.get(service_name)
        service = self.services.get(service_name)
        if failover is None or service is None or failover.state != "asking":
            return []
        if (self.live.get(failover.old_primary, HostLive(0, alive=False)).alive
                and not self._broken(service, failover.old_primary)):
            del self.failovers[service_name]  # it heartbeated again meanwhile
            return []
        # On a failover an exit report started, "I hear it" is not asked: the process is
        # gone for certain (see `process_exited`), and what a duplica heard of it was its
        # last batches, which a busy duplica may still have been taking when asked.
        hearing = [] if failover.asked_after_exit else [
            a.host_id for a in answers if a.reachable and a.hears]
        if hearing:
            del self.failovers[service_name]
            return [Persist({}, history=((
                service_name, "suspicion",
                f"{failover.old_primary} missed heartbeats but {', '.join(hearing)} still "
                "hear it: the coordinator's link is at fault, no failover",
                {"old_primary": failover.old_primary, "hearing": hearing}),))]
        candidates = [a for a in answers if a.reachable and a.host_id in service.in_sync
                      and a.host_id in service.promotable and a.epoch <= service.epoch
                      and not self._broken(service, a.host_id)]
        if not candidates:
            del self.failovers[service_name]
            return [Persist({}, history=((
                service_name, "failover_blocked",
                f"{failover.old_primary} is unreachable and no in-sync duplica of "
                f"{service_name} answered; asking again after a failure timeout",
                {"old_primary": failover.old_primary, "in_sync": list(service.in_sync)}),))]
        chosen = self._choose(service, candidates)
        failover.chosen = chosen.host_id
        holder, expiry = self.leases.get(service_name, ("", 0))
        failover.lease_expiry_ms = (expiry + self.timing.lease_drift_margin_ms
                                    if holder == failover.old_primary
                                    and not self._lease_holder_exited(failover) else 0)
        failover.state = "waiting_lease"
        if now_ms >= failover.lease_expiry_ms:
            return self._promote(failover, now_ms)
        return []

    def _choose(self, service: ServiceInfo, candidates: list[HearsAnswer]) -> HearsAnswer:
        """The candidate to promote: the one with the most of the log. Every candidate holds
        every acknowledged write (in sync and promotable, invariant 3), so in sync mode one
        still replaying its log into its state (its process restarted moments ago, its
        applied index far behind its durable one as last reported) is passed over for one
        that can answer at once: the first write after the failover waits until the new
        primary has applied everything (benchmarks/failover.py: a crash whose new primary
        had itself restarted a second before was writable again after 277 ms, where 35 ms
        is usual). In async mode the most of the log keeps the most acknowledged writes."""
        if service.mode == "sync":
            ready = [a for a in candidates
                     if self._replay_lag(service.name, a.host_id)
                     <= defaults.PROMOTE_REPLAY_LAG_ENTRIES_MAX]
            candidates = ready or candidates
        return max(candidates, key=lambda a: (a.durable_index, a.host_id))

    def _replay_lag(self, service_name: str, host_id: str) -> int:
        """How many entries `host_id`'s replica of the service had logged and not applied,
        as its last heartbeat said (0 when it said nothing)."""
        live = self.live.get(host_id)
        report = live.replicas.get(service_name) if live is not None else None
        if report is None:
            return 0
        return max(0, report.durable_index - report.applied_index)

    def _promote(self, failover: Failover, now_ms: int) -> list[Action]:
        service = self.services[failover.service]
        del self.failovers[failover.service]
        self.leases.pop(service.name, None)
        old, new = failover.old_primary, failover.chosen
        hand_over(service, old, new)
        set_in_sync(service, sorted(h for h in service.in_sync if h not in (old, new)))
        service.promotable = [h for h in service.promotable if h in service.in_sync]
        self._forget_thresholds(service.name)
        self._deposed.add((service.name, old))
        self._promoted_ms[service.name] = now_ms  # its rebuild waits (`rebuild_calm_ms`)
        details = {
            "old_primary": old, "new_primary": new, "epoch": service.epoch,
            "detection_ms": failover.suspected_ms - failover.last_heartbeat_ms,
            "promotion_ms": now_ms - failover.suspected_ms,
        }
        actions: list[Action] = [
            Persist({SERVICE_PREFIX + service.name: pack(service)}, history=((
                service.name, "failover",
                f"{service.name}: {old} failed; {new} promoted at epoch {service.epoch}",
                details),)),
            *self._assignments(service, reason="failover"),
        ]
        old_host = self.hosts.get(old)
        if old_host is not None:
            actions.append(StepDown(old, old_host.address, service.name, service.epoch))
        actions.extend(self._bump_routes(service.name))
        return actions

    # --- the crash fast path (issue 16) -----------------------------------------------------

    def _start_failover(self, service: ServiceInfo, live: HostLive,
                        now_ms: int) -> AskHearsPrimary:
        """Starts the failover of `service`'s primary: its duplicas are asked whether they
        still hear it (`hears_primary` decides on their answers)."""
        self._asked_ms[service.name] = now_ms
        self.failovers[service.name] = Failover(
            service.name, service.primary, live.last_heartbeat_ms, now_ms)
        hosts = {h: self.hosts[h].address for h in service.duplicas() if h in self.hosts}
        return AskHearsPrimary(service.name, service.epoch, hosts)

    def process_exited(self, host_id: str, incarnation: int, exit_code: int,
                       now_ms: int) -> list[Action]:
        """Host `host_id`'s supervisor saw its agent process of `incarnation` exit with
        `exit_code` (negative: the signal that ended it). The caller has checked that the
        report comes from that host (its certificate).

        Every process of the host up to `incarnation` is gone (its supervisor starts the
        next only after the last one exited), so if the one the coordinator knows
        (`HostInfo.incarnation`) is among them: the host counts as silent now (its duplicas
        leave the in-sync sets, as after a failure timeout), its heartbeats and
        registrations up to that incarnation are refused from now on (`Membership`), and its
        primaries fail over without waiting out the lease it was granted, to the duplica the
        timeout path would choose (`hears_primary`: reachable, in sync, promotable, at or
        below the epoch, not broken, the highest matched index). Whether a duplica still
        hears the primary is not asked: that tells a silent host from a broken link to it,
        and the supervisor has seen the process end; the next process starts only once
        the report was answered, and serves nothing before the coordinator confirms it.

        A report of an older incarnation than the one registered (late: the process was
        restarted and registered since), or of one already reported, changes nothing; nor
        does one from a host whose agent registered without a supervisor (incarnation 0)."""
        check_host_id(host_id)
        info = self.hosts.get(host_id)
        if info is None:
            raise InvalidRequest(f"host {host_id!r} is not registered: an exit report is "
                                 "taken only from a registered host")
        if not 0 < incarnation <= defaults.AGENT_INCARNATION_MAX:
            raise InvalidRequest(f"host {host_id}: an exit report needs the process's "
                                 f"incarnation, 1..{defaults.AGENT_INCARNATION_MAX}, not "
                                 f"{incarnation}")
        if not defaults.EXIT_CODE_MIN <= exit_code <= defaults.EXIT_CODE_MAX:
            raise InvalidRequest(f"host {host_id}: exit code {exit_code} is not a process's "
                                 f"({defaults.EXIT_CODE_MIN}..{defaults.EXIT_CODE_MAX})")
        live = self.live.get(host_id)
        if live is None:
            live = self.live[host_id] = HostLive(last_heartbeat_ms=now_ms, alive=False,
                                                 stalled_mark_ms=self.stalled_ms)
        if info.incarnation == 0:
            self.notices.append(
                f"host {host_id}: exit of agent incarnation {incarnation} reported, but its "
                "agent registered without a supervisor (incarnation 0): ignored")
            return []
        if incarnation < info.incarnation:
            self.notices.append(
                f"host {host_id}: exit of agent incarnation {incarnation} reported, but "
                f"incarnation {info.incarnation} registered since: a late report, ignored")
            return []
        if incarnation <= live.exited:
            return []  # reported already (a retry, or a duplicate delivery)
        live.exited = incarnation
        actions: list[Action] = [Persist({}, history=(("", "host", (
            f"host {host_id}'s agent process (incarnation {incarnation}) exited with code "
            f"{exit_code}: failing over its primaries without waiting out their leases"),
            {"host_id": host_id, "incarnation": incarnation, "exit_code": exit_code}),))]
        if live.alive:
            live.alive = False
            self._attend_host(host_id)  # its duplicas leave as their primaries beat
        for service in self._holding(host_id):
            if service.primary != host_id:
                continue
            failover = self.failovers.get(service.name)
            if failover is not None:
                # A failover on the timeout path is under way: it need not wait for the
                # lease any longer (a promotion is never started twice for one failover).
                if failover.old_primary == host_id:
                    failover.exited = incarnation
                    if failover.state == "waiting_lease":
                        failover.lease_expiry_ms = 0
                continue
            if service.name in self.switchovers:
                continue  # the switchover ends (its prepare fails), then a tick starts one
            ask = self._start_failover(service, live, now_ms)
            failover = self.failovers[service.name]
            failover.exited = incarnation
            failover.asked_after_exit = True
            actions.append(ask)
        for failover in list(self.failovers.values()):
            if (failover.exited and failover.state == "waiting_lease"
                    and now_ms >= failover.lease_expiry_ms):
                actions.extend(self._promote(failover, now_ms))
        return actions

    def _lease_holder_exited(self, failover: Failover) -> bool:
        """Whether every process that can hold the old primary's lease has exited: its
        host's exit was reported for the incarnation registered (or a newer one), and no
        newer one registered since. Leases are granted only to heartbeats of the registered
        incarnation (`Membership.heartbeat`)."""
        if not failover.exited:
            return False
        info = self.hosts.get(failover.old_primary)
        return info is not None and 0 < info.incarnation <= failover.exited

