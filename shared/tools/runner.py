"""Embedded mode: one command runs a whole job on this machine.

Starts nats-server (unless a URL is given) and the five services as processes of their own
(``processes``), follows the run's events into its ``Progress`` while showing them live
(``WatchView``, as ``tuneloop watch``), and once the progress says the run is over, writes
and returns its summary (``summary``) and stops everything (Ctrl-C included), so no process is
left behind. A config with ``phases`` runs them one after the other (``run_phases``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.live import Live

from . import summary as summaries
from ..bus import Bus
from ..config import RUN_ID_STAMP, Config, ConfigError, dump_config, load_config
from .embedded import NatsServer
from ..events import (CheckpointRecorded, Control, ControlApplied, ControlConfirmed, ControlRejected, ControlRolledBack,
                     DatasetReady, DeadLetter, EvalVerdict, Event, ExportDone, Feedback, Proposal, ProposalResolved,
                     RunForked, RunQueued, StepMetrics, TrainingFinished, derived_id)
from ..topology import SERVICES
from .processes import FIRST, LATER_WITHIN_S, exited_badly, spawn, stop_all
from .progress import Progress
from .report import TIMELINE_FILE, timeline_line, write_report, write_timeline
from ..storage import CONFIG_FILE, RunDir, init_run, run_dir, write_run_info
from .. import trackers
from .summary import JobSummary, PhaseSummary, RunSummary
from .watch import WatchView, log_event

WATCHED = (DatasetReady, StepMetrics, CheckpointRecorded, EvalVerdict, Feedback, Control, ControlApplied,
           ControlRejected, ControlRolledBack, ControlConfirmed, Proposal, ProposalResolved, TrainingFinished,
           ExportDone, DeadLetter)
# After the last event, services keep serving /metrics this long before they are stopped: a
# Prometheus scraping every second or two still gets the run's final values.
FINAL_SCRAPE_S = 2.0


class RunFailed(RuntimeError):
    pass


def new_run_id(cfg: Config) -> str:
    return cfg.run.name + datetime.now().strftime(RUN_ID_STAMP)


def run_job(config_path: Path, *, nats_url: str | None = None, run_id: str | None = None, evaluators: int = 1,
            processes: int | None = None, console: Console | None = None, sets: dict | None = None) -> RunSummary | JobSummary:
    """The job of ``config_path``: one run, or one run per phase when the config has ``phases``;
    ``sets``: dotted keys to change (``--set``), ``processes`` the training processes."""
    console = console or Console()
    cfg = load_config(config_path, functions=True)
    changes = {**(sets or {}), **({"train.processes": processes} if processes else {})}
    if changes:
        try:
            cfg = cfg.with_overrides(changes)
        except ValueError as e:
            said = ", ".join(f"{k}={v}" for k, v in changes.items())
            raise ConfigError(f"{config_path} with {said}: {e}") from e
    job_id = run_id or new_run_id(cfg)
    storage = cfg.resolve(cfg.run.output_dir).resolve()
    server = None
    if not nats_url:
        server = NatsServer(run_dir(storage, job_id) / "nats")
        nats_url = server.start()
    try:
        store = server.store_dir if server else None  # where `tuneloop audit` reads once the server is gone
        if cfg.phases:
            return run_phases(cfg, job_id, storage, nats_url, evaluators, console, config_path, store)
        return run_one(cfg, job_id, storage, nats_url, evaluators, console, config_path, store)
    finally:
        if server:
            server.stop()


def run_fork(fork, storage: Path, *, nats_url: str | None = None, evaluators: int = 1,
             console: Console | None = None) -> RunSummary:
    """Run a fork (``tools/fork.py``, its folder made) on this machine like ``tuneloop run``,
    after saying so on the bus of both runs (their audit trails)."""
    console = console or Console()
    server = None
    if not nats_url:
        server = NatsServer(run_dir(storage, fork.child) / "nats")
        nats_url = server.start()
    try:
        asyncio.run(announce_fork(fork, storage, nats_url))
        if server:  # the child's own bus: the parent's audit trail is elsewhere
            tell_parent(fork, storage)
        store = server.store_dir if server else None
        return run_one(fork.config, fork.child, storage, nats_url, evaluators, console,
                       run_dir(storage, fork.child) / CONFIG_FILE, store)
    finally:
        if server:
            server.stop()


async def announce_fork(fork, storage: Path, nats_url: str, queue: bool = False, bus: Bus | None = None) -> None:
    """``RunForked`` on the parent's subject and the child's; with ``queue``, the child for the pools."""
    if bus is None:
        async with await Bus.connect(nats_url, "fork", patience=30) as own:
            return await announce_fork(fork, storage, nats_url, queue, own)
    for run_id in (fork.parent, fork.child):
        await bus.publish(forked_event(fork, storage, run_id))
    if queue:
        await bus.publish(RunQueued(run_id=fork.child, reason=f"fork of {fork.parent} at step {fork.step}"))


def tell_parent(fork, storage: Path) -> None:
    """The fork into the parent's audit trail: on its own bus while that answers (an embedded
    run still training, a sweep's server), else into its timeline file, which an embedded run
    leaves for when its server is gone (``tuneloop audit`` reads both). A stopped server's store
    is never opened again."""
    from ..storage import read_run_info
    from .embedded import answers

    try:
        info = read_run_info(storage, fork.parent)
    except FileNotFoundError:
        return
    if info.get("nats_url") and answers(info["nats_url"]):
        asyncio.run(announce_fork(fork, storage, info["nats_url"]))
        return
    timeline = run_dir(storage, fork.parent) / TIMELINE_FILE
    if timeline.is_file():
        with timeline.open("a") as f:
            f.write(timeline_line(forked_event(fork, storage, fork.parent)))


def forked_event(fork, storage: Path, run_id: str) -> RunForked:
    lineage = fork.lineage(storage)
    return RunForked(run_id=run_id, event_id=derived_id("forked", run_id, fork.child), parent=fork.parent,
                     child=fork.child, step=fork.step, checkpoint=lineage["checkpoint"], changed=fork.changed,
                     weights_only=fork.weights_only)


def run_phases(cfg: Config, job_id: str, storage: Path, nats_url: str, evaluators: int, console: Console,
               source: Path, store: Path | None = None) -> JobSummary:
    """Each phase is a run of its own (``<job>-<phase>``), started from the model the previous
    one exported, on the category weights its data ended with."""
    jdir = run_dir(storage, job_id)
    jdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, jdir / CONFIG_FILE)
    model = weights = None
    phases = []
    for i, phase in enumerate(cfg.phases):
        pcfg = cfg.phase_config(i, model=model, category_weights=weights)
        console.rule(f"phase {i + 1}/{len(cfg.phases)}: {phase.name} ({pcfg.train.method})")
        done = run_one(pcfg, f"{job_id}-{phase.name}", storage, nats_url, evaluators, console, source, store)
        phases.append(PhaseSummary(phase=phase.name, **done.model_dump()))
        if not done.merged or done.test is None:
            raise RunFailed(f"phase {phase.name} ended without a merged export and a test verdict "
                            f"({done.stop_reason}); see {done.run_dir}")
        model, weights = done.merged, done.data.category_weights
        summaries.print_summary(done, console)
    last = phases[-1]
    job = JobSummary(job_id=job_id, run_dir=str(jdir), phases=phases, test=last.test, adapter=last.adapter,
                     merged=last.merged)
    summaries.write(job, jdir)
    return job


def run_one(cfg: Config, run_id: str, storage: Path, nats_url: str, evaluators: int, console: Console,
            source: Path, store: Path | None = None) -> RunSummary:
    rdir = init_run(cfg, run_id, storage)
    info = {"run_id": run_id, "nats_url": nats_url, "pid": os.getpid(), "state": "running",
            "started": datetime.now(timezone.utc).isoformat(), "config": str(Path(source).resolve()),
            **({"nats_store": str(store)} if store else {})}  # a fork's lineage stays (write_run_info)
    write_run_info(storage, run_id, info)
    embedded = " (embedded: on 127.0.0.1 only, so without TLS)" if store else ""
    console.print(f"[bold]tuneloop[/] run [cyan]{run_id}[/]  nats {nats_url}{embedded}  dir {rdir}")
    procs: dict[str, subprocess.Popen] = {}
    progress = Progress(run_id, suites=len(cfg.eval.suites), wants_baseline=cfg.eval.baseline)
    events: list[Event] = []  # everything watched: the report's timeline
    try:
        asyncio.run(_drive(progress, events, storage, rdir, nats_url, procs, evaluators, console))
        time.sleep(FINAL_SCRAPE_S)  # the services' last values (export time, final scores) reach Prometheus
        done = summaries.run_summary(progress, rdir, cfg)
        summaries.write(done, rdir)
        if cfg.run.report_to:  # the export's own scores, beside what the trainer logged
            trackers.log_final(cfg.run.report_to, rdir, run_id, done)
        _report(rdir, events, console)
        info["state"] = "failed" if progress.outcome == "failed" else "finished"
        return done
    except KeyboardInterrupt:
        info["state"] = "interrupted"
        console.print("[yellow]interrupted: stopping services[/]")
        raise
    except RunFailed:
        info["state"] = "failed"
        raise
    finally:
        stop_all(procs)
        write_timeline(rdir / TIMELINE_FILE, events)
        info["ended"] = datetime.now(timezone.utc).isoformat()
        write_run_info(storage, run_id, info)


async def _drive(progress: Progress, events: list[Event], storage: Path, rdir: Path, url: str, procs: dict,
                 evaluators: int, console: Console) -> None:
    run_id = progress.run_id
    bus = await Bus.connect(url, "runner")
    view = WatchView(run_id)  # the same live view as `tuneloop watch`, under the log lines

    async def on_event(ev: Event) -> None:
        events.append(ev)
        view.update(ev)
        progress.update(ev)
        log_event(ev, console)

    for cls in WATCHED:  # subscribe before the services start, so nothing is missed
        await bus.subscribe(cls, run_id, on_event)
    # What the first step waits for starts now; the rest once training runs, so that their
    # start-up (torch imports) does not compete with the trainer's on the same cores. Nothing
    # is lost meanwhile: checkpoints and evaluation requests wait in JetStream.
    for svc in FIRST:
        procs[svc] = spawn(svc, run_id, storage, url, RunDir(rdir).logs)
    later = [(svc, 0) for svc in SERVICES if svc not in FIRST] + [("evaluator", i) for i in range(1, evaluators)]
    started = time.monotonic()
    try:
        with Live(view, console=console, refresh_per_second=4, transient=True):
            while progress.outcome is None:
                await asyncio.sleep(0.2)
                if later and (progress.last_step or progress.finished or time.monotonic() - started > LATER_WITHIN_S):
                    for svc, i in later:
                        procs[svc if not i else f"{svc}-{i}"] = spawn(svc, run_id, storage, url, RunDir(rdir).logs, replica=i)
                    later = []
                if why := exited_badly(procs, RunDir(rdir).logs):
                    raise RunFailed(why)
        if progress.fatal:  # a dead letter on the run's path: it cannot finish
            raise RunFailed(progress.fatal)
    finally:
        await bus.close()


def _report(rdir: Path, events: list[Event], console: Console) -> None:
    """The training-curve report; a run without matplotlib (a slim install) just goes without."""
    try:
        png, page = write_report(rdir, events)
    except ImportError:
        console.print("no report: matplotlib is not installed (pip install 'tuneloop[report]')")
        return
    except ValueError as e:
        console.print(f"no report: {e}")
        return
    console.print(f"report: {page} ({png.name})", soft_wrap=True)
