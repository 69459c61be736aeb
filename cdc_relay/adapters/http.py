"""The HTTP endpoint of `cdc-relay run`: /metrics (Prometheus), /healthz and /readyz.

It runs in a daemon thread (ThreadingHTTPServer) and only reads RelayStats:
- /healthz: 200 while the relay's loop has shown a heartbeat within HEARTBEAT_STALE_SECONDS
  (it beats while streaming, waiting for the broker, backing off and as a hot standby);
- /readyz: 200 while a replication session streams and the producer reaches a broker. A hot
  standby is healthy but not ready.
"""

from __future__ import annotations

import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from cdc_relay.core.stats import RelayStats
from cdc_relay.errors import RelayError

log = logging.getLogger(__name__)

# The loop beats at least every second or so; the longest waits without a beat are a database
# connection attempt through the pool (30 s) and a broker metadata request (5 s).
HEARTBEAT_STALE_SECONDS = 60.0


def health(stats: RelayStats, *, now: float | None = None) -> tuple[bool, str]:
    silent = (time.monotonic() if now is None else now) - stats.heartbeat
    if silent > HEARTBEAT_STALE_SECONDS:
        return False, f"relay loop silent for {silent:.0f} s"
    return True, "ok"


def readiness(stats: RelayStats) -> tuple[bool, str]:
    if not stats.streaming:
        return False, "not streaming (starting, reconnecting, or a hot standby)"
    if not stats.broker_reachable:
        return False, "Kafka is unreachable"
    return True, "ok"


class MetricsServer:
    """Binds at construction (so a port in use fails at start); serves until stop()."""

    def __init__(
        self, host: str, port: int, stats: RelayStats, registry: CollectorRegistry
    ) -> None:
        handler = _handler_class(stats, registry)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise RelayError(
                f"cannot serve metrics on {host}:{port} ({reason}); set CDC_RELAY_HTTP_PORT to a "
                "free port, or 0 to disable"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cdc-relay-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on port %d", self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _handler_class(stats: RelayStats, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cdc-relay"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._probe(*health(stats))
            elif path == "/readyz":
                self._probe(*readiness(stats))
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"try /metrics, /healthz or /readyz\n")

        def _probe(self, ok: bool, reason: str) -> None:
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._reply(status, f"{reason}\n".encode())

        def _reply(
            self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Probes and scrapes every few seconds: not worth an INFO line each.
            log.debug("http: " + format, *args)

    return Handler
