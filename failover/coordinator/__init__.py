"""The coordinator daemon (`failover-coordinator`): carries out the actions of the pure
`failover.core.coordinator.CoordinatorCore` (the store, calls to agents, route pushes, the
clock) and runs the long operations (switchover, migrate, patch). See docs/design.md.
"""
