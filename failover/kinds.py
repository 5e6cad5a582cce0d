"""The registry of service kinds: the `failover.services` entry-point group.

A package registers a kind by naming it in its metadata::

    [project.entry-points."failover.services"]
    kv = "demo_services.kv:KvService"

Lookups are cached: entry points are read once per process and each kind is imported once.
Call `clear_cache()` after installing a package into a running process.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points

from failover.errors import KindLoadError, UnknownKindError
from failover.service import ServiceKind

__all__ = ["ENTRY_POINT_GROUP", "available_kinds", "clear_cache", "create", "load_kind"]

ENTRY_POINT_GROUP = "failover.services"

log = logging.getLogger(__name__)


@functools.cache
def _scan() -> tuple[dict[str, EntryPoint], dict[str, frozenset[str]]]:
    """Entry points by kind name, and names claimed by different targets; imports nothing."""
    found: dict[str, EntryPoint] = {}
    conflicts: dict[str, set[str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        seen = found.get(ep.name)
        if seen is None:
            found[ep.name] = ep
        elif seen.value != ep.value:
            # The same name twice with the same target is harmless (an editable install next
            # to a built one); with different targets, picking one would be a silent guess.
            conflicts.setdefault(ep.name, {seen.value}).add(ep.value)
    for name, values in conflicts.items():
        found.pop(name, None)
        log.warning(
            "service kind %r is registered by several packages with different targets (%s); "
            "it is unusable until one of them is uninstalled",
            name,
            ", ".join(sorted(values)),
        )
    return found, {name: frozenset(values) for name, values in conflicts.items()}


def _registered() -> dict[str, EntryPoint]:
    return _scan()[0]


def registered_names() -> list[str]:
    """The names of every registered kind, sorted, without importing any of them."""
    return sorted(_registered())


@functools.cache
def load_kind(name: str) -> type[ServiceKind]:
    """The ServiceKind class registered under `name`.

    Raises UnknownKindError (listing the registered names) when there is none, and
    KindLoadError when the registered target cannot be imported, is not a ServiceKind
    subclass, or declares another name or no valid version.
    """
    registered, conflicts = _scan()
    if name not in registered:
        if name in conflicts:
            raise KindLoadError(
                f"service kind {name!r} is registered by several packages with different "
                f"targets ({', '.join(sorted(conflicts[name]))}); uninstall all but one"
            )
        names = ", ".join(repr(n) for n in sorted(registered)) or "none"
        raise UnknownKindError(
            f"no service kind named {name!r}; registered kinds: {names}. A package registers "
            f"a kind under the {ENTRY_POINT_GROUP!r} entry-point group"
        )
    ep = registered[name]
    try:
        target = ep.load()
    except Exception as exc:  # an import of user code can fail in any way
        raise KindLoadError(
            f"service kind {name!r} is registered as {ep.value!r} but cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(target, type) and issubclass(target, ServiceKind)):
        raise KindLoadError(
            f"service kind {name!r} is registered as {ep.value!r}, which is not a "
            "failover.service.ServiceKind subclass"
        )
    declared = getattr(target, "name", None)
    if declared != name:
        raise KindLoadError(
            f"service kind registered as {name!r} ({ep.value}) declares name={declared!r}; "
            "the two must match, since snapshots and routes record the name"
        )
    version = getattr(target, "version", None)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KindLoadError(
            f"service kind {name!r} ({ep.value}) declares version={version!r}; it must be an "
            "int >= 1"
        )
    if getattr(target, "__abstractmethods__", None):
        missing = ", ".join(sorted(target.__abstractmethods__))
        raise KindLoadError(f"service kind {name!r} ({ep.value}) does not implement: {missing}")
    return target


def available_kinds() -> dict[str, type[ServiceKind]]:
    """Every registered kind that loads, by name (a new dict each call).

    A kind that fails to load is left out with a warning, so that one broken plug-in does not
    hide the others; `load_kind` on its name raises the reason.
    """
    kinds: dict[str, type[ServiceKind]] = {}
    for name in registered_names():
        try:
            kinds[name] = load_kind(name)
        except KindLoadError as exc:
            log.warning("%s", exc)
    return kinds


def create(name: str) -> ServiceKind:
    """A new, empty instance of the kind registered under `name` (see `load_kind`)."""
    return load_kind(name)()


def clear_cache() -> None:
    """Forget cached entry points and kinds (after installing a package at run time)."""
    _scan.cache_clear()
    load_kind.cache_clear()
