"""Chaos runs: a local cluster of real processes under a seeded nemesis (`nemesis`, `faults`),
a workload whose every operation is recorded (`runner`, `history`), and the checkers that judge
the history (`checkers`, `register`). `failoverctl chaos` runs one; see docs/operations.md.
"""
