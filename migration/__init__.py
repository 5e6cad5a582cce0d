"""Pre-copy live migration of a paged state (docs/design.md, Live migration).

* `migration.planner`: the pure planner that decides, round after round from the caller's
  measurements, whether to copy again or cut over, and how hard to throttle writes.
* `migration.codec`: page batch encoders and decoders (zero elision, XOR deltas, lz4) and the
  page digests checked at cutover.
* `migration.stats`: per-migration statistics, as JSON-ready dicts.
* `migration.source`, `migration.target`: the two ends of a migration, run by the agent's
  servicer (failover/net/agent_servicers.py).
* `migration.interface`: what source and target use of the replica they copy and of the host
  that keeps the copy, as Protocols; the agent hands its `Replica` and `Agent` in, and this
  package never imports the agent (tests/unit/test_layers.py).

Import the submodules themselves: this package imports nothing, so that the planner stays free
of I/O modules.
"""
