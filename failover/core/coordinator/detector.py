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
    hand_over,
    pack,
    set_in_sync,
)


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
                self._attend_host(host_id)  # none of its replicas is good now
                actions.extend(self._host_suspected(host_id))
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
            self._asked_ms[service.name] = now_ms
            self.failovers[service.name] = Failover(
                service.name, service.primary, live.last_heartbeat_ms, now_ms)
            hosts = {h: self.hosts[h].address for h in service.duplicas() if h in self.hosts}
            actions.append(AskHearsPrimary(service.name, service.epoch, hosts))
        for failover in list(self.failovers.values()):
            if failover.state == "waiting_lease" and now_ms >= failover.lease_expiry_ms:
                actions.extend(self._promote(failover, now_ms))
        return actions

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
        hearing = [a.host_id for a in answers if a.reachable and a.hears]
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
        # The in-sync duplica with the most of the log: it holds every committed entry.
        chosen = max(candidates, key=lambda a: (a.durable_index, a.host_id))
        failover.chosen = chosen.host_id
        holder, expiry = self.leases.get(service_name, ("", 0))
        failover.lease_expiry_ms = (expiry + self.timing.lease_drift_margin_ms
                                    if holder == failover.old_primary else 0)
        failover.state = "waiting_lease"
        if now_ms >= failover.lease_expiry_ms:
            return self._promote(failover, now_ms)
        return []

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
