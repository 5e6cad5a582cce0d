"""`python -m failover.coordinator` is `failover-coordinator`."""

from failover.coordinator.main import main

main()
