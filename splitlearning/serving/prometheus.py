"""The Prometheus endpoint: the server's own registry in the text format over HTTP, on a thread of its own."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def host_of(address: str) -> str:
    """'127.0.0.1:50051' -> '127.0.0.1', '[::]:50051' -> '::', 'localhost:0' -> 'localhost'."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]") or "0.0.0.0"


class MetricsEndpoint:
    """Serves `registry` at http://host:port/metrics; port 0 picks a free port (see `port`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer | None
        self._thread: threading.Thread | None
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._httpd.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None
