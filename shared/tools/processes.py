"""The services as processes of this machine: their environment, starting and stopping them.

Used by the embedded runner, the sweep's pools and the benches; compose and Kubernetes start
the same ``python -m tuneloop.<service>`` commands their own way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import cores
from ..topology import ROSTER

# On the path to the first training step; the others start when training runs, or after this long.
FIRST = tuple(s.name for s in ROSTER if s.first)
LATER_WITHIN_S = 120.0
# Priority (nice) of the checkpoint service: hashing and exports never hold up a step.
SERVICE_NICE = 5


def service_env(service: str) -> dict[str, str]:
    """Environment of a service that shares this machine with the trainer.

    The services beside the trainer run one torch thread each, put their idle OpenMP threads
    to sleep (``OMP_WAIT_POLICY=PASSIVE``; by default they spin on the trainer's cores), and
    evaluators borrow cores for their work through the machine's lease folder, which the
    trainer reads at each step boundary (``tuneloop.cores``). The checkpoint service (hashing,
    exports: never what a step waits for) runs at a lower priority (``TUNELOOP_NICE``); the
    others do not: data-pipeline and rl-reward are on the trainer's path (its data, GRPO's
    rewards), and a verdict that comes late is feedback that comes late (in a sweep, trials
    trained to the end before their verdicts could prune them). The
    trainer keeps spinning threads: for its own ops they are faster. An explicit setting in
    the environment wins.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.setdefault(cores.ENV_DIR, str(cores.machine_folder()))
    if service != "trainer":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("OMP_NUM_THREADS", "1")
    if service == "checkpoint":
        env.setdefault(cores.ENV_NICE, str(SERVICE_NICE))
    return env


def spawn(service: str, run_id: str, storage: Path, url: str, log_dir: Path, replica: int = 0,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``service`` for ``run_id`` (``*``: every run, a pool), its output in ``log_dir``."""
    module = "tuneloop." + service.replace("-", "_")
    log_path = log_dir / (f"{service}.log" if not replica else f"{service}-{replica}.log")
    cmd = [sys.executable, "-m", module, "--run-id", run_id, "--storage", str(storage), "--nats-url", url,
           "--parent-pid", str(os.getpid()), "--metrics-port", "0"]  # a free port, listed in <run>/prometheus/
    with open(log_path, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**service_env(service), **(env or {})},
                                start_new_session=True)


def stop_all(procs: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM to each (they finish what they hold), SIGKILL to any still there after ``timeout``."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs.values():
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def exited_badly(procs: dict[str, subprocess.Popen], log_dir: Path, may_exit: tuple[str, ...] = ("trainer",)) -> str | None:
    """Why the job cannot go on, if one of ``procs`` ended (an error, or a service that should
    still serve exiting at all), with the end of its log."""
    for name, p in procs.items():
        code = p.poll()
        if code not in (None, 0) or (code == 0 and name not in may_exit):
            return f"{name} exited with code {code}; see {log_dir / (name + '.log')}:\n" + tail(log_dir / f"{name}.log")
    return None


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
