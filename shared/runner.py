"""Embedded mode: one command runs a whole job on this machine.

Starts nats-server (unless a URL is given), the five services as separate processes, shows
the run live from the events (``WatchView``, as ``tuneloop watch``), waits for the export and
the final verdict, prints a summary, and stops everything (Ctrl-C included) so no process is
left behind. A config with ``phases`` runs them one after the other (``run_phases``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import cores
from .bus import Bus
from .config import RUN_ID_STAMP, Config, ConfigError, differences, dump_config, load_config
from .embedded import NatsServer
from .events import (CheckpointRecorded, Control, ControlApplied, ControlRejected, DatasetReady, DeadLetter,
                     EvalVerdict, Event, ExportDone, Feedback, StepMetrics, TrainingFinished, explain)
from .report import TIMELINE_FILE, write_report, write_timeline
from .storage import CONFIG_FILE, run_dir, write_run_info
from .watch import WatchView

SERVICES = ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward")
# On the path to the first training step (GRPO asks rl-reward for rewards at its first step;
# rl-reward imports no torch); the others start when training runs, or after this long.
FIRST = ("data-pipeline", "trainer", "rl-reward")
LATER_WITHIN_S = 120.0
WATCHED = (DatasetReady, StepMetrics, CheckpointRecorded, EvalVerdict, Feedback, Control, ControlApplied,
           ControlRejected, TrainingFinished, ExportDone, DeadLetter)
# A dead letter of one of these means the run cannot finish: fail fast instead of waiting.
CRITICAL_KINDS = ("run.queued", "data.ready", "ckpt.saved", "train.done", "eval.request", "eval.shard")
# After the last event, services keep serving /metrics this long before they are stopped: a
# Prometheus scraping every second or two still gets the run's final values.
FINAL_SCRAPE_S = 2.0
# Priority (nice) of the checkpoint service: hashing and exports never hold up a step.
SERVICE_NICE = 5


class RunFailed(RuntimeError):
    pass


@dataclass
class RunState:
    """What the runner learned from the events; the summary is made from it."""

    run_id: str
    dataset: DatasetReady | None = None
    fatal: str | None = None
    last_step: StepMetrics | None = None
    verdicts: list[EvalVerdict] = field(default_factory=list)
    baseline: EvalVerdict | None = None  # the starting model on the test split (eval.baseline)
    wants_baseline: bool = False
    final_verdict: EvalVerdict | None = None  # the exported model on the test split
    suite_verdicts: dict[str, EvalVerdict] = field(default_factory=dict)  # ... and on each test suite
    suites: int = 0  # how many test suites the config declares
    finished: TrainingFinished | None = None
    exported: ExportDone | None = None
    controls: list[Event] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # everything watched: the timeline of the report

    @property
    def complete(self) -> bool:
        if self.finished and self.finished.reason in ("error", "pruned", "interrupted"):
            return True  # nothing will be exported
        return (self.finished is not None and self.exported is not None and self.final_verdict is not None
                and len(self.suite_verdicts) >= self.suites and (self.baseline is not None or not self.wants_baseline))


def new_run_id(cfg: Config) -> str:
    return cfg.run.name + datetime.now().strftime(RUN_ID_STAMP)


def with_processes(cfg: Config, processes: int, source: Path) -> Config:
    """``cfg`` with train.processes overridden (validated like the file would be)."""
    raw = cfg.model_dump(mode="json")
    raw["train"]["processes"] = processes
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source} with --processes {processes}: {explain(e)}") from e


def init_run(cfg: Config, run_id: str, storage: Path) -> Path:
    """Create the run directory with its config: all services need to serve the run.

    Used by ``tuneloop run`` and, for compose and Kubernetes, by ``tuneloop init``.
    """
    rdir = run_dir(storage, run_id)
    existing = rdir / CONFIG_FILE
    if existing.is_file():  # the same run again (a restart) resumes; another config under its id would mix two runs
        changed = differences(load_config(existing), cfg)
        if changed:
            raise ConfigError(f"run {run_id} already exists ({rdir}) with another configuration "
                              f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''} differ); give this one "
                              "another run id (or run.name), or delete that folder to start over")
    (rdir / "logs").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, rdir / CONFIG_FILE)
    return rdir


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
    module = "tuneloop." + service.replace("-", "_")
    log_path = log_dir / (f"{service}.log" if not replica else f"{service}-{replica}.log")
    cmd = [sys.executable, "-m", module, "--run-id", run_id, "--storage", str(storage), "--nats-url", url,
           "--parent-pid", str(os.getpid()), "--metrics-port", "0"]  # a free port, listed in <run>/prometheus/
    with open(log_path, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**service_env(service), **(env or {})},
                                start_new_session=True)


def stop_all(procs: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
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


def run(config_path: Path, *, nats_url: str | None = None, run_id: str | None = None, evaluators: int = 1,
        processes: int | None = None, console: Console | None = None) -> dict:
    """The job of ``config_path``: one run, or one run per phase when the config has ``phases``."""
    console = console or Console()
    cfg = load_config(config_path)
    if processes:
        cfg = with_processes(cfg, processes, config_path)
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


def run_phases(cfg: Config, job_id: str, storage: Path, nats_url: str, evaluators: int, console: Console,
               source: Path, store: Path | None = None) -> dict:
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
        summary = run_one(pcfg, f"{job_id}-{phase.name}", storage, nats_url, evaluators, console, source, store)
        phases.append({"phase": phase.name, **summary})
        if not summary["merged"] or summary["test"] is None:
            raise RunFailed(f"phase {phase.name} ended without a merged export and a test verdict "
                            f"({summary['stop_reason']}); see {summary['run_dir']}")
        model, weights = summary["merged"], summary["data"]["category_weights"]
        print_summary(summary, console)
    job = {"job_id": job_id, "run_dir": str(jdir), "phases": phases,
           **{k: phases[-1][k] for k in ("test", "adapter", "merged")}}
    (jdir / "summary.json").write_text(json.dumps(job, indent=2))
    return job


def run_one(cfg: Config, run_id: str, storage: Path, nats_url: str, evaluators: int, console: Console,
            source: Path, store: Path | None = None) -> dict:
    rdir = init_run(cfg, run_id, storage)
    info = {"run_id": run_id, "nats_url": nats_url, "pid": os.getpid(), "state": "running",
            "started": datetime.now(timezone.utc).isoformat(), "config": str(Path(source).resolve()),
            **({"nats_store": str(store)} if store else {})}
    write_run_info(storage, run_id, info)
    console.print(f"[bold]tuneloop[/] run [cyan]{run_id}[/]  nats {nats_url}  dir {rdir}")
    procs: dict[str, subprocess.Popen] = {}
    state = RunState(run_id, suites=len(cfg.eval.suites), wants_baseline=cfg.eval.baseline)
    try:
        asyncio.run(_drive(state, storage, rdir, nats_url, procs, evaluators, console))
        time.sleep(FINAL_SCRAPE_S)  # the services' last values (export time, final scores) reach Prometheus
        summary = summarize(state, rdir, cfg)
        _report(rdir, state.events, console)
        info["state"] = "failed" if state.finished and state.finished.reason == "error" else "finished"
        return summary
    except KeyboardInterrupt:
        info["state"] = "interrupted"
        console.print("[yellow]interrupted: stopping services[/]")
        raise
    except RunFailed:
        info["state"] = "failed"
        raise
    finally:
        stop_all(procs)
        write_timeline(rdir / TIMELINE_FILE, state.events)
        info["ended"] = datetime.now(timezone.utc).isoformat()
        write_run_info(storage, run_id, info)


async def _drive(state: RunState, storage: Path, rdir: Path, url: str, procs: dict, evaluators: int,
                 console: Console) -> None:
    run_id = state.run_id
    bus = await Bus.connect(url, "runner")
    view = WatchView(run_id)  # the same live view as `tuneloop watch`, under the log lines

    async def on_event(ev: Event) -> None:
        view.update(ev)
        handle_event(state, ev, console)

    for cls in WATCHED:  # subscribe before the services start, so nothing is missed
        await bus.subscribe(cls, run_id, on_event)
    # What the first step waits for starts now; the rest once training runs, so that their
    # start-up (torch imports) does not compete with the trainer's on the same cores. Nothing
    # is lost meanwhile: checkpoints and evaluation requests wait in JetStream.
    for svc in FIRST:
        procs[svc] = spawn(svc, run_id, storage, url, rdir / "logs")
    later = [(svc, 0) for svc in SERVICES if svc not in FIRST] + [("evaluator", i) for i in range(1, evaluators)]
    started = time.monotonic()
    try:
        with Live(view, console=console, refresh_per_second=4, transient=True):
            while not state.complete:
                await asyncio.sleep(0.2)
                if state.fatal:
                    raise RunFailed(state.fatal)
                if later and (state.last_step or state.finished or time.monotonic() - started > LATER_WITHIN_S):
                    for svc, i in later:
                        procs[svc if not i else f"{svc}-{i}"] = spawn(svc, run_id, storage, url, rdir / "logs", replica=i)
                    later = []
                for name, p in procs.items():
                    code = p.poll()
                    if code not in (None, 0) or (code == 0 and name != "trainer"):
                        raise RunFailed(f"{name} exited with code {code}; see {rdir / 'logs' / (name + '.log')}:\n"
                                        + tail(rdir / "logs" / f"{name}.log"))
    finally:
        await bus.close()


def handle_event(state: RunState, ev: Event, console: Console) -> None:
    state.events.append(ev)
    if isinstance(ev, DatasetReady):
        state.dataset = ev
        console.log(f"data set {ev.dataset_id}: " + ", ".join(f"{k} {v.rows}" for k, v in ev.splits.items())
                    + (f" ({ev.rejected_rows} rows rejected)" if ev.rejected_rows else ""))
    elif isinstance(ev, StepMetrics):
        state.last_step = ev
    elif isinstance(ev, CheckpointRecorded):
        console.log(f"checkpoint step {ev.step} recorded ({ev.bytes / 1e6:.1f} MB, sha256 {ev.sha256[:12]})")
    elif isinstance(ev, EvalVerdict):
        if ev.purpose == "baseline":
            state.baseline = ev
        elif ev.purpose == "final" and ev.split.startswith("suite:"):
            state.suite_verdicts[ev.split[6:]] = ev
        elif ev.purpose == "final":
            state.final_verdict = ev
        else:
            state.verdicts.append(ev)
        console.log(f"verdict step {ev.step} ({ev.split}, {ev.cases} cases): protocol {ev.scores['protocol']:.3f}  "
                    f"correctness {ev.scores['correctness']:.3f}  tokens {ev.mean_new_tokens:.1f}")
    elif isinstance(ev, Feedback):
        console.log(f"feedback after step {ev.step}: [bold]{ev.action}[/] ({ev.reason})")
    elif isinstance(ev, (ControlApplied, ControlRejected)):
        state.controls.append(ev)
        what = "applied" if isinstance(ev, ControlApplied) else f"rejected: {ev.reason}"
        console.log(f"control {ev.command} {what} at step {ev.step}")
    elif isinstance(ev, TrainingFinished):
        state.finished = ev
        console.log(f"training finished at step {ev.step}: {ev.reason} ({ev.detail})")
    elif isinstance(ev, DeadLetter):
        console.log(f"[red]dead letter[/] from {ev.service} on {ev.subject}: {ev.reason}")
        if any(ev.subject.endswith("." + k) for k in CRITICAL_KINDS):
            state.fatal = f"{ev.service} could not handle {ev.subject}: {ev.reason}"
    elif isinstance(ev, ExportDone):
        state.exported = ev
        console.log(f"exported step {ev.step}: adapter {ev.adapter_path}, merged {ev.merged_path}")


def summarize(state: RunState, rdir: Path, cfg: Config) -> dict:
    f, x, fv = state.finished, state.exported, state.final_verdict
    summary = {
        "run_id": state.run_id,
        "run_dir": str(rdir),
        "method": cfg.train.method,
        "processes": f.processes if f else cfg.train.processes,
        "steps": f.step if f else None,
        "stop_reason": f"{f.reason}: {f.detail}" if f else None,
        "final_loss": f.final_loss if f else None,
        "train_seconds": round(f.train_seconds, 1) if f else None,
        "tokens_per_second": round(f.tokens_per_second, 1) if f and f.tokens_per_second else None,
        "peak_memory_mb": round(f.peak_memory_mb) if f and f.peak_memory_mb else None,
        "batch_size": f.batch_size if f else None,
        "data": {"dataset_id": state.dataset.dataset_id if state.dataset else None,
                 "category_weights": state.dataset.category_weights if state.dataset else {}},
        "baseline": _scores(state.baseline),
        "evaluations": [{"step": v.step, **v.scores} for v in state.verdicts],
        "exported_step": x.step if x else None,
        "adapter": str(rdir / x.adapter_path) if x and x.adapter_path else None,
        "merged": str(rdir / x.merged_path) if x and x.merged_path else None,
        "test": _scores(fv),
        "suites": {name: {"cases": v.cases, "pass": v.scores["protocol"], "mean_new_tokens": v.mean_new_tokens,
                          "by_category": {c: s["protocol"] for c, s in v.by_category.items()},
                          "failures": [f.reason for f in v.failures[:3]]}
                   for name, v in sorted(state.suite_verdicts.items())},
    }
    (rdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _scores(v: EvalVerdict | None) -> dict | None:
    return {"cases": v.cases, **v.scores, "mean_new_tokens": v.mean_new_tokens, "by_category": v.by_category} if v else None


def print_summary(summary: dict, console: Console) -> None:
    if "phases" in summary:
        return print_phases(summary, console)
    t = Table(title=f"tuneloop run {summary['run_id']}", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("steps", f"{summary['steps']} ({summary['method']}, {summary['processes']} process"
                       f"{'es' if summary['processes'] != 1 else ''})")
    t.add_row("stopped", str(summary["stop_reason"]))
    t.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    t.add_row("training time", f"{summary['train_seconds']} s")
    t.add_row("throughput", f"{summary['tokens_per_second'] or '-'} tokens/s  (batch {summary['batch_size']}, "
                            f"peak memory {summary['peak_memory_mb'] or '-'} MB)")
    if summary["baseline"]:
        b = summary["baseline"]
        t.add_row("before (test)", f"protocol {b['protocol']:.3f}  correctness {b['correctness']:.3f}  (the starting model)")
    for v in summary["evaluations"]:
        t.add_row(f"val @ step {v['step']}", f"protocol {v['protocol']:.3f}  correctness {v['correctness']:.3f}")
    if summary["test"]:
        s = summary["test"]
        t.add_row("held-out test", f"[bold green]protocol adherence {s['protocol']:.3f}[/]  correctness "
                  f"{s['correctness']:.3f}  ({s['cases']} prompts, {s['mean_new_tokens']:.1f} tokens/answer)")
    for name, r in summary["suites"].items():
        t.add_row(f"suite {name}", f"pass {r['pass']:.3f}  ({r['cases']} cases, {r['mean_new_tokens']:.1f} tokens/answer)")
    t.add_row("exported step", str(summary["exported_step"]))
    t.add_row("adapter", str(summary["adapter"]))
    t.add_row("merged model", str(summary["merged"]))
    console.print(t)
    console.print(f"summary: {summary['run_dir']}/summary.json", soft_wrap=True)


def print_phases(job: dict, console: Console) -> None:
    """The job at a glance: each phase's held-out scores before (its starting model) and after (its export)."""
    t = Table(title=f"tuneloop job {job['job_id']}: held-out test scores before -> after each phase")
    for col in ("phase", "method", "steps", "stopped", "protocol", "correctness", "category weights"):
        t.add_column(col, overflow="fold")

    def change(p: dict, metric: str) -> str:
        before = p["baseline"][metric] if p["baseline"] else None
        after = p["test"][metric]
        return f"{before:.3f} -> [bold]{after:.3f}[/]" if before is not None else f"[bold]{after:.3f}[/]"

    for p in job["phases"]:
        weights = ", ".join(f"{k} {v:g}" for k, v in sorted(p["data"]["category_weights"].items())) or "-"
        t.add_row(p["phase"], p["method"], str(p["steps"]), str(p["stop_reason"]).split(":")[0],
                  change(p, "protocol"), change(p, "correctness"), weights)
    console.print(t)
    console.print(f"merged model: {job['merged']}", soft_wrap=True)
    console.print(f"summary: {job['run_dir']}/summary.json", soft_wrap=True)


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


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
