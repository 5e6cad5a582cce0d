"""Pure protocol and policy: no grpc, asyncio, sockets, files or clocks (docs/design.md, Layers).

Each core object takes events and returns actions; time comes in as an argument.
"""
