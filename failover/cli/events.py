"""`failoverctl events`: the coordinator's history as it happens (issue 17).

It calls WatchHistory on the leader (a follower redirects; `CoordinatorCaller` follows the
hint): the kept events after `--since SEQ` (or the newest `--last`) first, then with
`--follow` every event as the coordinator commits it, until interrupted. For people one line
per event; with `--format json` one JSON object per line (the `history --format json` item:
seq, at, service, kind, message, details), flushed as it comes, for `jq` and log shippers.
A watcher that falls too far behind is cut off by the coordinator (it never slows it), as
is every watch of a coordinator that stops leading: with `--follow` the command resumes
after the last event it printed (from the new leader) for up to `--resume-timeout-ms`, then
exits 1 saying which `--since` resumes it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from failover import defaults
from failover.cli import output
from failover.cli.admin import CommandFailed, CoordinatorCaller, settings, tls_material
from failover.core.names import check_service_name
from failover.errors import InvalidRequest
from failover.v1 import coordinator_pb2


@click.command("events")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing events as they are committed, until interrupted.")
@click.option("--service", default="", metavar="SERVICE",
              help="Only this service's events (default: every event).")
@click.option("--since", "since_seq", type=click.IntRange(min=0), default=None,
              metavar="SEQ", help="Start after history seq SEQ (every kept event after "
              "it); `--since 0` from the oldest kept. Default: the newest --last.")
@click.option("--last", type=click.IntRange(min=0, max=defaults.HISTORY_WATCH_LAST_MAX),
              default=defaults.EVENTS_LAST, show_default=True,
              help="Without --since: how many kept events come first (0: only new ones).")
@click.option("--timeout-ms", type=click.IntRange(min=1), default=defaults.CALL_DEADLINE_MS,
              show_default=True, help="Deadline without --follow (with it: none).")
@click.option("--resume-timeout-ms", type=click.IntRange(min=0),
              default=defaults.EVENTS_RESUME_TIMEOUT_MS, show_default=True,
              help="With --follow: when the stream ends (a new leader, a watcher cut off "
              "for falling behind), resume after the last event printed for up to this "
              "long before giving up (0: do not resume).")
@click.pass_context
def events_command(ctx: click.Context, follow: bool, service: str, since_seq: int | None,
                   last: int, timeout_ms: int, resume_timeout_ms: int) -> None:
    """Print history events (failovers, switchovers, hooks, ...) as they happen."""
    addresses, as_json = settings(ctx)
    if service:
        try:
            check_service_name(service)
        except InvalidRequest as exc:
            raise click.UsageError(f"--service: {exc}") from None
    request = coordinator_pb2.WatchHistoryRequest(service=service, follow=follow, last=last)
    if since_seq is not None:
        request.after_seq = since_seq
    newest = [since_seq or 0]  # the last seq printed (or --since)
    received = [False]  # a message arrived since the stream last ended

    def on_message(event: Any) -> None:
        received[0] = True
        if event.seq <= newest[0]:
            return  # a resumed stream never repeats what was printed
        newest[0] = event.seq
        document = output.history_event_json(event)
        click.echo(json.dumps(document) if as_json else output.event_line(document))

    caller = CoordinatorCaller(addresses, tls_material(ctx))
    failing_since: float | None = None
    while True:
        try:
            caller.stream("WatchHistory", request, on_message,
                          timeout_ms=None if follow else timeout_ms)
            return
        except CommandFailed as exc:
            now = time.monotonic()
            if failing_since is None or received[0]:
                failing_since = now
            received[0] = False
            if not follow or now - failing_since >= resume_timeout_ms / 1000:
                raise CommandFailed(f"{exc}; events up to seq {newest[0]} were printed: "
                                    f"resume with --since {newest[0]}") from None
            # Resume after the last event printed, from whoever leads now; a short pause
            # between tries, under the deadline above.
            if newest[0]:
                request.after_seq = newest[0]
            time.sleep(defaults.EVENTS_RESUME_PAUSE_MS / 1000)
