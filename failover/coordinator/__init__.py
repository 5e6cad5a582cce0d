"""The coordinator daemon (`failover-coordinator`): carries out the actions of the pure
`failover.core.coordinator.CoordinatorCore` (the store, calls to agents, route pushes, the
clock), including the calls of the long operations' plans (switchover, migrate, patch,
drain). See docs/design.md.
"""

import failover.net.grpc_experiments  # noqa: F401  (sets GRPC_EXPERIMENTS before gRPC)
