"""The role names a replica can hold, and the replication modes: one vocabulary for the core,
the daemons, the wire conversions (failover/net/convert.py) and the command line."""

from __future__ import annotations

PRIMARY, DUPLICA, BUILDING, RETIRED = "primary", "duplica", "building", "retired"
ROLES = (PRIMARY, DUPLICA, BUILDING, RETIRED)

SYNC, ASYNC = "sync", "async"
MODES = (SYNC, ASYNC)

# The events an agent runs hooks on (issue 17; `[hooks]` in its TOML): after a replica's role
# changed, after a failover's assignment reached it, after a migrated copy landed on it.
ON_ROLE_CHANGE, ON_FAILOVER, ON_MIGRATED = "on_role_change", "on_failover", "on_migrated"
HOOK_EVENTS = (ON_ROLE_CHANGE, ON_FAILOVER, ON_MIGRATED)
