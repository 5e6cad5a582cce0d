"""Sets GRPC_EXPERIMENTS for this process to `defaults.GRPC_EXPERIMENTS` (unless the process
set it itself, even empty: then its own value stands), on import.

gRPC reads the variable once, when `grpc` is first imported, so this is imported before it by
what starts a process of this package (`failover.agent`, `failover.coordinator`,
`failover.cli`) and by `failover.client`, whose application may not have imported gRPC yet
(if it has, gRPC keeps its own defaults there, and this only changes what its children get).
Not in `failover/__init__`: the protocol core imports that, and it does no I/O nor touches
the process.
"""

from __future__ import annotations

import os

from failover import defaults

os.environ.setdefault("GRPC_EXPERIMENTS", defaults.GRPC_EXPERIMENTS)
