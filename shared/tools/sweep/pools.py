"""The processes every trial of a sweep shares, serving every run (``--run-id '*'``):
``concurrency`` trainer workers, one data-pipeline, one checkpoint service, ``evaluators``
evaluators and one rl-reward. Torch and transformers are imported once per worker, not once
per trial, and a worker tokenizes a train set once for all the trials that share it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from rich.console import Console

from ... import subjects
from ...bus import Bus
from ...events import StepMetrics
from ...procfs import running
from ...topology import ROSTER
from ..processes import FIRST, LATER_WITHIN_S, spawn, stop_all
from .spec import SweepSpec

SWEEP_FILE = "sweep.json"  # in the sweep's folder: its NATS and its pools' pids, for a restarted sweep


class Pools:
    def __init__(self, spec: SweepSpec, storage: Path, url: str, folder: Path, console: Console):
        self.spec, self.storage, self.url, self.dir, self.console = spec, storage, url, folder, console
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}
        self.later: list[tuple[str, int]] = []  # not started yet (see start)
        self.later_by = 0.0
        self.first_step = None

    def sizes(self) -> dict[str, int]:
        """Replicas of each service of the roster: one, or the sweep setting its ``pool`` names."""
        return {s.name: 1 if s.pool == "one" else getattr(self.spec, s.pool) for s in ROSTER}

    async def start(self, bus: Bus, staged: bool = True) -> None:
        """The pools, after the ones a killed sweep left have stopped (they save the checkpoint
        of the trial they were training when they notice their parent is gone). ``staged``:
        those on the path to the first step start first; the rest once a trial trains (their
        start-up would only slow the trainers' own), or after ``LATER_WITHIN_S``. Trials to
        resume are mid-way, with checkpoints to evaluate now: all start at once."""
        await wait_gone(self.info().get("pool_pids", []), str(self.storage))
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        sizes = self.sizes()
        for service in FIRST:
            for i in range(sizes[service]):
                self.start_one(service, i)
        self.later = [(s, i) for s, n in sizes.items() if s not in FIRST for i in range(n)]
        self.later_by = time.monotonic() + (LATER_WITHIN_S if staged else 0.0)
        self.first_step = await bus.subscribe(StepMetrics, subjects.ALL_RUNS, self.on_first_step)
        await self.start_later()
        self.save_pids()

    async def on_first_step(self, ev: StepMetrics) -> None:
        self.later_by = 0.0

    async def start_later(self, now: bool = False) -> None:
        if now:
            self.later_by = 0.0
        if self.later and time.monotonic() >= self.later_by:
            for service, i in self.later:
                self.start_one(service, i)
            self.later = []
            await self.first_step.unsubscribe()
            self.save_pids()

    def ensure(self, service: str) -> None:
        """``service``'s first replica runs (a sweep continued after its last trial has no pools)."""
        if (service, 0) not in self.procs:
            (self.dir / "logs").mkdir(parents=True, exist_ok=True)
            self.start_one(service, 0)

    def info(self) -> dict:
        info_file = self.dir / SWEEP_FILE
        return json.loads(info_file.read_text()) if info_file.exists() else {}

    def save_pids(self) -> None:
        info = self.info()
        info["pool_pids"] = [p.pid for p in self.procs.values()]
        (self.dir / SWEEP_FILE).write_text(json.dumps(info, indent=1))

    def start_one(self, service: str, replica: int) -> None:
        env = None
        if "OMP_NUM_THREADS" not in os.environ:
            # Trials training at once share the cores; the services with models (evaluators,
            # checkpoint's merge) work beside them on one thread each: an OpenMP team on cores
            # the trainers hold spins and stalls (a 1 s merge took 26 s, a verdict 15 s).
            share = max(1, len(os.sched_getaffinity(0)) // self.spec.concurrency)
            env = {"OMP_NUM_THREADS": str(share if service == "trainer" else 1)}
        self.procs[(service, replica)] = spawn(service, subjects.ALL_RUNS, self.storage, self.url, self.dir / "logs",
                                               replica=replica, env=env)

    def watch(self) -> None:
        """A replica that died is started again: the queues keep its work meanwhile (a trainer
        worker's trial is handed to another worker, which resumes it)."""
        for (service, replica), p in list(self.procs.items()):
            if p.poll() is not None:
                self.console.log(f"[yellow]{service} #{replica} exited with {p.returncode}; starting it again[/] "
                                 f"(logs in {self.dir / 'logs'})")
                self.start_one(service, replica)

    def stop(self) -> None:
        stop_all(self.procs)


async def wait_gone(pids: list[int], marker: str, timeout: float = 30.0) -> None:
    """Wait for a dead sweep's pool processes to finish stopping (a trainer saves a checkpoint);
    SIGKILL what is left after ``timeout``. A pid is only theirs while its command names ``marker``."""
    def theirs() -> list[int]:
        return [pid for pid in pids if running(pid, marker)]

    deadline = time.monotonic() + timeout
    while theirs() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    for pid in theirs():
        os.kill(pid, signal.SIGKILL)
