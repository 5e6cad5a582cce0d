"""`failoverctl`, the operator's command line: status, hosts, create, delete, switchover,
migrate, patch, drain, undrain, history, call, demo and chaos. See docs/operations.md.
"""

import failover.net.grpc_experiments  # noqa: F401  (sets GRPC_EXPERIMENTS before gRPC)
