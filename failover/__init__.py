"""failover: keeps stateful services available through crashes and software patches."""

import os

from failover import defaults

__version__ = "0.1.0"

# Before anything here imports gRPC (its core reads this once, at start): see
# defaults.GRPC_EXPERIMENTS. A process that sets the variable itself, even empty, keeps its own.
os.environ.setdefault("GRPC_EXPERIMENTS", defaults.GRPC_EXPERIMENTS)
