"""`python -m failover.cli` is `failoverctl`."""

from failover.cli.main import main

main()
