"""The agent daemon (`failover-agent`), one per host: hosts replicas, keeps their logs and
snapshots, ships logs to peer hosts and takes shipped logs, and heartbeats to the coordinator.

`host.Agent` holds the host's replicas and links; `replica.Replica` drives one replica's
protocol cores and does its I/O; `daemon` serves gRPC; `main` parses flags and TOML
(`config`). See docs/design.md and docs/operations.md.
"""

import failover.net.grpc_experiments  # noqa: F401  (sets GRPC_EXPERIMENTS before gRPC)
