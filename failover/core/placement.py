"""Where a new replica goes: placement policies over several resources (pure).

The coordinator asks `place` for hosts for one service's new replicas. A host is a candidate
only if it is alive, not draining, holds no replica of the service yet (hard anti-affinity),
has reported its metrics, and has room for the kind's declared needs on every resource. Room
is the smaller of two views, so neither a busy host nor an overbooked one takes more:

* measured: what the host's last heartbeat says is free, less the needs of replicas placed
  on it that it does not report yet (they use nothing so far, but will); memory and disk
  only, since CPU use swings from one heartbeat to the next and a busy second would make
  placement flap;
* reserved: the host's capacity less the needs of every replica placed on it.

Among the hosts that fit, zones come first: when hosts declare zones, only those in the zones
holding the fewest of the service's replicas stay (spread). The policy then picks:

* `first-fit`: the first by host id;
* `best-fit`: the least room left after placing (packs hosts, keeps big hosts free);
* `worst-fit`: the most room left after placing (spreads load; the default).

The host chosen for a new service's primary is first one with the fewest primaries among
those that fit (`primaries`), so primaries spread evenly whatever the policy.

Room left is the sum over resources of what stays free as a fraction of capacity, so one
resource in short supply weighs as much as another. Ties go to the smaller host id, so a
decision replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from failover.errors import InvalidRequest

FIRST_FIT, BEST_FIT, WORST_FIT = "first-fit", "best-fit", "worst-fit"
POLICIES = (FIRST_FIT, BEST_FIT, WORST_FIT)
RESOURCES = ("cpu", "memory_bytes", "disk_bytes")
MEASURED = RESOURCES[1:]  # resources whose measured free amount also bounds placement


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each resource: CPU in cores, memory and disk in bytes."""

    cpu: float = 0.0
    memory_bytes: float = 0.0
    disk_bytes: float = 0.0

    def get(self, name: str) -> float:
        return float(getattr(self, name))

    def plus(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory_bytes + other.memory_bytes,
                         self.disk_bytes + other.disk_bytes)

    def to_dict(self) -> dict[str, float]:
        return {name: self.get(name) for name in RESOURCES}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> Resources:
        return cls(**{name: float(values.get(name, 0.0)) for name in RESOURCES})


def check_policy(policy: str) -> str:
    """Returns the policy, or raises InvalidRequest naming the choices."""
    if policy not in POLICIES:
        raise InvalidRequest(f"placement policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def capacity_and_free(metrics: Mapping[str, float]) -> tuple[Resources, Resources] | None:
    """A host's capacity and measured free resources from its heartbeat metrics, or None when
    it has not reported them yet."""
    cpus = metrics.get("cpu_count", 0.0)
    memory = metrics.get("memory_total_bytes", 0.0)
    if cpus <= 0 or memory <= 0 or "disk_free_bytes" not in metrics:
        return None
    disk_free = max(0.0, metrics["disk_free_bytes"])
    disk_total = max(metrics.get("disk_total_bytes", 0.0), disk_free)
    capacity = Resources(cpus, memory, disk_total)
    free = Resources(
        cpus * max(0.0, 1.0 - metrics.get("cpu_percent", 0.0) / 100.0),
        memory * max(0.0, 1.0 - metrics.get("memory_percent", 0.0) / 100.0),
        disk_free,
    )
    return capacity, free


@dataclass(frozen=True, slots=True)
class HostView:
    """What placement needs to know of one host."""

    host_id: str
    zone: str
    alive: bool
    draining: bool
    capacity: Resources | None  # None: no metrics reported yet
    free: Resources | None
    placed: Resources = Resources()  # needs of every replica placed on it
    pending: Resources = Resources()  # needs of those it does not report yet
    # `room()`, worked out once: placement asks it of every host for every replica
    _room: Resources | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_room", self._free_room())

    def room(self) -> Resources | None:
        """Free room for more replicas: the smaller of the measured and the reserved view."""
        return self._room

    def _free_room(self) -> Resources | None:
        if self.capacity is None or self.free is None:
            return None
        reserved = [self.capacity.get(r) - self.placed.get(r) for r in RESOURCES]
        measured = [self.free.get(r) - self.pending.get(r) for r in MEASURED]
        return Resources(reserved[0], *(min(a, b) for a, b in zip(reserved[1:], measured,
                                                                    strict=True)))


@dataclass(frozen=True, slots=True)
class Placement:
    """The hosts chosen, in order; `reason` says why fewer than asked were found."""

    hosts: tuple[str, ...]
    reason: str = ""


def place(policy: str, needs: Resources, count: int, hosts: Iterable[HostView],
          holding: Mapping[str, str], primaries: Mapping[str, int] | None = None) -> Placement:
    """Chooses up to `count` hosts for new replicas of one service.

    `holding` maps the hosts that already hold a replica of the service to their zone. The
    choice of each next host counts the ones chosen before it (zones and room). With
    `primaries` (host -> how many primaries it holds), the first host chosen is to hold the
    new service's primary: it is one with the fewest primaries among those that fit (spread
    primaries: a host that holds most of them is the worst one to lose), then by policy."""
    check_policy(policy)
    assert count >= 0, count
    views = {h.host_id: h for h in hosts}
    order = sorted(views)
    rooms = {h: views[h].room() for h in order}  # once: a view does not change in here
    taken = dict(holding)
    chosen: list[str] = []
    extra: dict[str, Resources] = {}
    refusals: dict[str, str] = {}
    none = Resources()
    while len(chosen) < count:
        fits: list[tuple[str, Resources]] = []
        for host_id in order:
            view = views[host_id]
            room = rooms[host_id]
            why = _refusal(view, needs, taken, extra.get(host_id, none), room)
            if why:
                refusals[host_id] = why
                continue
            assert room is not None
            left = Resources(room.cpu - needs.cpu, room.memory_bytes - needs.memory_bytes,
                             room.disk_bytes - needs.disk_bytes)
            fits.append((host_id, left))
        if not fits:
            break
        zoned = any(views[h].zone for h, _ in fits)
        if zoned:
            per_zone: dict[str, int] = {}
            for zone in taken.values():
                per_zone[zone] = per_zone.get(zone, 0) + 1
            fewest = min(per_zone.get(views[h].zone, 0) for h, _ in fits)
            fits = [(h, left) for h, left in fits if per_zone.get(views[h].zone, 0) == fewest]
        if primaries is not None and not chosen:
            least = min(primaries.get(h, 0) for h, _ in fits)
            fits = [(h, left) for h, left in fits if primaries.get(h, 0) == least]
        best = _pick(policy, fits, views)
        chosen.append(best)
        taken[best] = views[best].zone
        extra[best] = extra.get(best, Resources()).plus(needs)
    if len(chosen) == count:
        return Placement(tuple(chosen))
    detail = "; ".join(f"{h}: {why}" for h, why in sorted(refusals.items())) or "no hosts"
    return Placement(tuple(chosen), f"{count - len(chosen)} of {count} replicas found no host "
                                    f"(needs {describe(needs)}): {detail}")


def _refusal(view: HostView, needs: Resources, taken: Mapping[str, str],
             extra: Resources, room: Resources | None) -> str:
    """Why `view` (whose `room()` is `room`) cannot take one more replica, or ""."""
    if view.host_id in taken:
        return "holds a replica of it already"
    if not view.alive:
        return "not alive"
    if view.draining:
        return "draining"
    if room is None:
        return "no metrics reported yet"
    if (room.cpu - extra.cpu >= needs.cpu
            and room.memory_bytes - extra.memory_bytes >= needs.memory_bytes
            and room.disk_bytes - extra.disk_bytes >= needs.disk_bytes):
        return ""
    short = [f"{r} {_amount(r, room.get(r) - extra.get(r))} free"
             for r in RESOURCES if room.get(r) - extra.get(r) < needs.get(r)]
    return ", ".join(short)


def _pick(policy: str, fits: list[tuple[str, Resources]], views: Mapping[str, HostView]) -> str:
    if policy == FIRST_FIT:
        return fits[0][0]

    def left_fraction(item: tuple[str, Resources]) -> float:
        host_id, left = item
        capacity = views[host_id].capacity
        assert capacity is not None
        return sum(part / whole for part, whole in ((left.cpu, capacity.cpu),
                                                    (left.memory_bytes, capacity.memory_bytes),
                                                    (left.disk_bytes, capacity.disk_bytes))
                   if whole > 0)

    if policy == BEST_FIT:
        return min(fits, key=lambda item: (left_fraction(item), item[0]))[0]
    return min(fits, key=lambda item: (-left_fraction(item), item[0]))[0]


def describe(needs: Resources) -> str:
    return ", ".join(f"{r} {_amount(r, needs.get(r))}" for r in RESOURCES)


def _amount(resource: str, value: float) -> str:
    if resource == "cpu":
        return f"{value:.2f}"
    return f"{value / (1 << 20):.0f} MiB"
