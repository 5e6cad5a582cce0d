"""The ``--metrics-listen`` port of a daemon (issue 17): Prometheus text format on
``/metrics``, and the health paths load balancers poll (``/healthz``; an agent's
``/primary/<service>`` and ``/replica/<service>``; a coordinator's ``/leader``).

HTTP/1.1, one request per connection, GET and HEAD only; over TLS (HTTPS) with the daemon's
own certificate when it has one. No client certificate is asked for: what the port tells is
what routes and `failoverctl status` tell, and it changes nothing (docs/operations.md,
Monitoring). It runs on the daemon's event loop, so the collectors read the daemon's state
where it changes, never from another thread; only the text formatting, which can take a few
milliseconds for thousands of series, runs in a worker thread. Bounded: connections at once
(`METRICS_CONNECTIONS_MAX`; more get 503), request head bytes
(`METRICS_REQUEST_HEADER_BYTES_MAX`; more get 431) and time (`METRICS_REQUEST_TIMEOUT_MS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from failover import defaults
from failover.errors import ConfigError, InvalidRequest
from failover.net.address import parse_address
from failover.net.channels import is_loopback
from failover.net.tls import TlsMaterial

log = logging.getLogger(__name__)

# A path handler: the path's rest (after its prefix) -> (status, body, content type).
Reply = tuple[int, bytes, str]
Route = Callable[[str], Reply]
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


def check_metrics_listen(address: str, *, tls: bool, insecure: bool) -> str:
    """``--metrics-listen HOST:PORT`` checked as the gRPC listen address is: a port to bind,
    and not in the clear beyond loopback unless `insecure` (``--insecure``) or TLS. Returns
    it; ConfigError saying what to do otherwise."""
    text = str(address).strip()
    parse_address(text, what="--metrics-listen", allow_port_zero=True)
    if not (tls or insecure or is_loopback(text)):
        raise ConfigError(
            f"--metrics-listen {text}: refusing to serve metrics and health in the clear "
            "beyond loopback: give --tls-ca, --tls-cert and --tls-key (HTTPS), --insecure, or "
            "a loopback address such as 127.0.0.1:9464")
    return text


def reply_json(status: int, body: dict[str, Any]) -> Reply:
    """A JSON reply (one line) with `status`."""
    return status, (json.dumps(body, separators=(",", ":")) + "\n").encode(), _JSON


class _Families:
    """What one scrape collected (on the loop), for `generate_latest` in a worker thread."""

    def __init__(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> Iterable[Any]:
        return self._families


def server_ssl_context(tls: TlsMaterial) -> ssl.SSLContext:
    """HTTPS with the daemon's certificate; a client certificate is verified against the
    cluster's CA if one is presented, never required (Prometheus and load balancers)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.files.cert), str(tls.files.key))
    context.load_verify_locations(cadata=tls.ca_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


class MetricsEndpoint:
    """Serves `registry` on ``/metrics`` and `routes` (path prefix -> handler of the rest) on
    one address. `start` binds it (returning the port), `stop` closes it."""

    def __init__(self, registry: CollectorRegistry, routes: dict[str, Route],
                 tls: TlsMaterial | None = None) -> None:
        self.registry = registry
        self.routes = routes
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, address: str) -> int:
        """Listens on `address` (HOST:PORT; port 0 picks one); returns the port. Raises
        ConfigError naming the address when it cannot be bound."""
        parsed = parse_address(address, what="--metrics-listen", allow_port_zero=True)
        context = server_ssl_context(self.tls) if self.tls is not None else None
        try:
            self._server = await asyncio.start_server(
                self._serve, parsed.host, parsed.port, ssl=context,
                limit=defaults.METRICS_REQUEST_HEADER_BYTES_MAX,
                ssl_handshake_timeout=defaults.METRICS_REQUEST_TIMEOUT_MS / 1000 if context
                else None)
        except OSError as exc:
            raise ConfigError(f"--metrics-listen {address}: cannot listen: "
                              f"{exc.strerror or exc}") from None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening; requests in flight end within their timeout."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(),
                                       defaults.METRICS_REQUEST_TIMEOUT_MS / 1000)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > defaults.METRICS_CONNECTIONS_MAX:
                await self._write(writer, "GET", (
                    503, f"more than {defaults.METRICS_CONNECTIONS_MAX} connections at once: "
                    "retry\n".encode(), _TEXT))
                return
            async with asyncio.timeout(defaults.METRICS_REQUEST_TIMEOUT_MS / 1000):
                method, reply = await self._answer(reader)
                await self._write(writer, method, reply)
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to tell it
        except Exception:
            log.exception("metrics endpoint: a request failed")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, Reply]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return "GET", (431, b"request head too large\n", _TEXT)
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "GET", (400, b"not an HTTP/1 request line\n", _TEXT)
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return method, (405, b"only GET and HEAD\n", _TEXT)
        path = target.split("?", 1)[0]
        if path == "/metrics":
            families = list(self.registry.collect())  # on the loop: the state is read here
            text = await asyncio.get_running_loop().run_in_executor(
                None, generate_latest, _Families(families))
            return method, (200, text, CONTENT_TYPE_LATEST)
        for prefix, route in self.routes.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                try:
                    return method, route(path[len(prefix):])
                except InvalidRequest as exc:
                    return method, (400, f"{exc}\n".encode(), _TEXT)
        known = ", ".join(["/metrics", *(p + ("<service>" if p.endswith("/") else "")
                                         for p in self.routes)])
        return method, (404, f"no such path; known: {known}\n".encode(), _TEXT)

    async def _write(self, writer: asyncio.StreamWriter, method: str, reply: Reply) -> None:
        status, body, content_type = reply
        phrase = HTTPStatus(status).phrase
        head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n").encode("latin-1")
        writer.write(head if method == "HEAD" else head + body)
        await writer.drain()
