"""Runs the agent: recover replicas, serve gRPC, stop cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import grpc.aio

from failover.agent.config import AgentConfig
from failover.agent.host import Agent
from failover.agent.restart import patch_argv, reexec
from failover.errors import ConfigError
from failover.net import agent_servicers, channels
from failover.net.authorization import RoleCheck, TermFence
from failover.net.grpc_logs import limit_decode_error_logs
from failover.net.tls import TlsMaterial
from failover.observe import health, logs
from failover.observe.agent_metrics import AgentMetrics, count_refused
from failover.observe.endpoint import MetricsEndpoint
from failover.observe.logs import event_fields
from failover.storage.modes import make_private_dir
from failover.v1 import agent_pb2

log = logging.getLogger("failover.agent")


async def serve(config: AgentConfig, tls: TlsMaterial | None = None,
                incarnation: int = 0) -> bool:
    """Serves until SIGTERM/SIGINT (returns False) or an answered Restart (returns True);
    replicas are recovered before the port opens. With `tls` (`AgentConfig.load_tls`) every
    call in and out is mutual TLS, and each call's role is checked (`RoleCheck`) before its
    handler; without it the port is in the clear (`check_listen` allowed it). Either way a
    control call from a deposed coordinator (an older term) is refused (`interceptors`)."""
    channels.check_listen(str(config.listen), tls=tls is not None, insecure=config.insecure)
    make_private_dir(config.data_dir)
    agent = Agent(config, tls, incarnation)
    if config.metrics_listen is not None:
        agent.metrics = AgentMetrics(agent)  # before `start`: recovered logs report fsyncs
    await agent.start()
    server = channels.server(interceptors=interceptors(agent, tls))
    agent_servicers.add_to_server(server, agent)
    health.add_to_server(server, health.agent_health(agent))
    try:
        port = channels.add_port(server, str(config.listen), tls)
    except RuntimeError as exc:
        raise SystemExit(f"failover-agent: cannot listen on {config.listen}: {exc}") from None
    if port == 0:
        raise SystemExit(f"failover-agent: cannot listen on {config.listen} (in use?)")
    await server.start()
    endpoint = None
    if agent.metrics is not None and config.metrics_listen is not None:
        endpoint = MetricsEndpoint(agent.metrics.registry,
                                   health.agent_routes(agent, config.host_id), tls)
        try:
            metrics_port = await endpoint.start(config.metrics_listen)
        except ConfigError as exc:
            raise SystemExit(f"failover-agent: {exc}") from None
        log.info("agent %s serves metrics and health on %s port %d", config.host_id,
                 "HTTPS" if tls is not None else "HTTP", metrics_port,
                 extra=event_fields("metrics_listening", port=metrics_port))
    log.info("agent %s serving on %s with %s (data dir %s, pid %d, incarnation %d)",
             config.host_id, config.listen, "mutual TLS" if tls is not None else "no TLS",
             config.data_dir, os.getpid(), incarnation)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [loop.create_task(stop.wait()), loop.create_task(agent.restart_requested.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    restarting = agent.restart_requested.is_set() and not stop.is_set()
    log.info("agent %s %s", config.host_id, "re-executing" if restarting else "stopping")
    if endpoint is not None:
        await endpoint.stop()
    await server.stop(grace=1.0)
    await agent.stop()
    return restarting


def interceptors(agent: Agent, tls: TlsMaterial | None) -> list[grpc.aio.ServerInterceptor]:
    """What runs before every handler of the agent's server: with TLS the role check, then
    (always) the coordinator term fence, which checks a Restart's command first so that a
    malformed one is INVALID_ARGUMENT whatever its term."""
    patch_commands = agent.config.patch_commands

    def restart_command(request: agent_pb2.RestartRequest) -> None:
        if request.command:
            patch_argv(request.command, patch_commands)

    fence = TermFence(agent.coordinator_term,
                      {"/failover.v1.AgentControl/Restart": restart_command})
    return [RoleCheck(refused=count_refused(agent)), fence] if tls is not None else [fence]


def run(config: AgentConfig, tls: TlsMaterial | None = None, incarnation: int = 0) -> None:
    """Blocking entry point used by `failover-agent`."""
    logs.configure(config.host_id, config.log_format, config.log_level, sys.stderr)
    limit_decode_error_logs()
    if asyncio.run(serve(config, tls, incarnation)):
        reexec()  # the event loop, its threads and the port are gone: a clean slate
