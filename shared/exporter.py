"""The Prometheus exporter of every service: the metrics all of them share, and the /metrics +
/healthz endpoint (metrics.py has each service's own, moved by the events it publishes)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

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

# A pool serves run after run for as long as it lives: each run's series would stay in its
# registry forever. The bus notes when each run last had an event here (``count_event``), and a
# pool forgets the series of a run idle for ``TUNELOOP_METRICS_IDLE_S`` (``forget_idle``); by then
# Prometheus has scraped its last values, which its own storage keeps.
LAST_EVENT: dict[str, float] = {}


def count_event(run_id: str, kind: str, direction: str) -> None:
    BUS_EVENTS.labels(run_id, kind, direction).inc()
    LAST_EVENT[run_id] = time.monotonic()


def run_series() -> list:
    """Every metric of this process labelled by run (the services' and the bus's)."""
    from . import metrics

    found = [*vars(metrics).values(), BUS_EVENTS, BUS_DEAD_LETTERS]
    return [m for m in found if isinstance(m, MetricWrapperBase) and "run_id" in m._labelnames]


def forget(run_id: str) -> None:
    """Remove every series of ``run_id`` from this process's registry."""
    for m in run_series():
        m.remove_by_labels({"run_id": run_id})
    LAST_EVENT.pop(run_id, None)


def forget_idle(idle_s: float, now: float | None = None) -> list[str]:
    """Forget the runs that had no event for ``idle_s`` seconds; returns them."""
    now = time.monotonic() if now is None else now
    idle = [run for run, t in LAST_EVENT.items() if now - t >= idle_s]
    for run in idle:
        forget(run)
    return idle


# What /healthz reports: set by the service once its bus is up (``Bus.health``); until then the
# service is starting, not ready.
HEALTH: list[Callable[[], tuple[bool, dict]]] = []


def health() -> tuple[bool, dict]:
    """Ready (connected, every consumer consuming) and what was seen; not ready while starting."""
    if not HEALTH:
        return False, {"bus": "starting", "consumers": {}}
    try:
        return HEALTH[-1]()
    except Exception as e:  # a report must come back whatever state the bus is in
        return False, {"error": repr(e)}


def start_http(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Serve /metrics, /livez (the process answers: liveness) and /healthz (ready: the bus is
    connected and every consumer consuming; 503 otherwise, readiness) on ``port`` (0 = a free
    one) in a daemon thread; None if port < 0."""
    if port < 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server naming)
            status = 200
            if self.path.startswith("/metrics"):
                body, ctype = generate_latest(), CONTENT_TYPE_LATEST
            elif self.path.startswith("/livez"):
                body, ctype = b"ok\n", "text/plain"
            elif self.path.startswith("/healthz"):
                ready, seen = health()
                status, body, ctype = 200 if ready else 503, (json.dumps({"ready": ready, **seen}) + "\n").encode(), \
                    "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(status)
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
