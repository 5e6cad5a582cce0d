"""`python -m failover.agent` is `failover-agent`."""

from failover.agent.main import main

main()
