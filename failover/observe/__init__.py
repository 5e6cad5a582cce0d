"""Observability of the daemons (issue 17): Prometheus metrics (`agent_metrics`,
`coordinator_metrics`) served with the health endpoints on ``--metrics-listen``
(`endpoint`), the standard gRPC health service (`health`), and the log format (`logs`)."""
