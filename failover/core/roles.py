"""The role names a replica can hold, and the replication modes: one vocabulary for the core,
the daemons, the wire conversions (failover/net/convert.py) and the command line."""

from __future__ import annotations

PRIMARY, DUPLICA, BUILDING, RETIRED = "primary", "duplica", "building", "retired"
ROLES = (PRIMARY, DUPLICA, BUILDING, RETIRED)

SYNC, ASYNC = "sync", "async"
MODES = (SYNC, ASYNC)
