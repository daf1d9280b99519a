"""The Prometheus exporter of every service: the metrics all of them share, and the /metrics +
/healthz endpoint (metrics.py has each service's own, moved by the events it publishes)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

log = logging.getLogger(__name__)

BUS_EVENTS = Counter(
    "tuneloop_bus_events_total", "Events published or received on the bus.",
    ["run_id", "kind", "direction"],
)
BUS_DEAD_LETTERS = Counter(
    "tuneloop_bus_dead_letters_total", "Events that failed validation or handling and went to the dead-letter subject.",
    ["run_id", "kind", "reason"],
)
BUS_HANDLER_SECONDS = Histogram(
    "tuneloop_bus_handler_seconds", "Time spent handling one received event.", ["kind"],
)


def start_http(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Serve /metrics and /healthz on ``port`` (0 = a free one) in a daemon thread; None if port < 0."""
    if port < 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server naming)
            if self.path.startswith("/metrics"):
                body, ctype = generate_latest(), CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep scrapes out of the logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


def register_target(folder: Path, service: str, port: int, run_id: str) -> Path:
    """Write a Prometheus ``file_sd`` entry for this process's /metrics into ``folder``.

    An embedded run has no fixed ports (every service binds a free one); Prometheus finds them
    by watching ``<run>/prometheus/*.json``. Removed again when the process exits cleanly.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{service}-{os.getpid()}.json"
    entry = [{"targets": [f"127.0.0.1:{port}"], "labels": {"service": service, "run": run_id}}]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    tmp.replace(path)
    return path
