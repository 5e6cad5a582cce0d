"""gRPC plumbing: channel and server options (`channels`), address parsing (`address`), and
the servicers that adapt the wire to the agent and the coordinator (`agent_servicers`,
`coordinator_servicer`). See docs/design.md, Layers.
"""
