"""``tuneloop sweep SWEEP.yaml``: a search over training configs, as runs on one bus.

Top to bottom:

1. NATS: the sweep's own embedded server (its store in ``<runs>/<sweep>/nats``), or the one
   a killed sweep left running (adopted), or ``--nats-url``.
2. State: the trial records in the JetStream KV bucket ``tuneloop-sweeps`` (store.py); the
   scheduler is rebuilt from them. Finished trials are never run again.
3. Pools shared by every trial, serving every run (pools.py).
4. Trials: up to ``concurrency`` at once, each a run of its own (``<sweep>-tNN``), queued with
   ``RunQueued``: a trainer worker takes it from the work queue (workers on other machines
   on the same NATS take trials too), data-pipeline prepares its data. ``tuneloop ctl
   <sweep>-t03 ...`` steers one. A trial that was running when the sweep died is queued again
   and resumes from its last checkpoint.
5. Verdicts on val and trial ends go to the scheduler (schedulers.py: Optuna's sampler and
   pruner, successive halving, or population-based training), which decides; this file
   carries its decisions out: a ``prune`` control lands at the trial's next step boundary
   (its checkpoint service then releases its checkpoints), a PBT copy is a fork of its donor.
6. A trial's value is its exported model's score on test; the best one is reported, its config
   written to ``<sweep>/best.yaml`` and its export linked as ``<sweep>/best``. LoRA trials
   export their adapter; only the winner's is merged, by the checkpoint pool
   (``export.request``): each trial that completes as the best so far, while others train.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from ...bus import Bus
from ...config import Config
from ..client import ExportRefused, request_merged_export, send_control
from ..embedded import NatsServer, _accepts
from ...events import (CheckpointsReleased, Control, ControlApplied, DeadLetter, EvalVerdict, ExportDone, Proposal, RunQueued,
                      TrainingFinished, derived_id)
from ...procfs import running
from ..progress import Progress
from ...storage import CONFIG_FILE, init_run, load_run_config, run_dir, write_run_info
from ..summary import SweepBest, SweepSummary, write
from . import schedulers, search
from .pbt import Check
from .pools import SWEEP_FILE, Pools
from .search import TrialRecord
from .spec import SweepSpec, load_sweep, trial_config
from .store import Store, SweepMismatch

__all__ = ["Store", "Sweep", "SweepMismatch", "sweep"]  # SweepMismatch: what a continued sweep with other settings raises

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one trial in this process
@dataclass
class Trial:
    record: TrialRecord
    subs: list = field(default_factory=list)
    prune_sent: bool = False
    # Over when its export has its test verdict, or when pruned once its checkpoints are
    # released; an interrupted trainer resumes (a pool worker takes the run again).
    progress: Progress = field(init=False)

    def __post_init__(self):
        self.progress = Progress(self.record.run_id, wants_release=True, interrupted_ends=False)

    @property
    def finished(self) -> TrainingFinished | None:
        return self.progress.finished


class Sweep:
    """The sweep's processes, store and trials: it launches what its scheduler asks for and
    carries out what the scheduler decides (schedulers.py), nothing else."""

    def __init__(self, spec: SweepSpec, base: Config, storage: Path, url: str, console: Console,
                 store: Path | None = None):
        self.spec, self.base, self.storage, self.url, self.console = spec, base, storage, url, console
        # An embedded server's store: where a trial's events are read once the sweep is over.
        self.where = {"nats_url": url, **({"nats_store": str(store)} if store else {})}
        self.metric = spec.metric or base.feedback.metric
        self.dir = run_dir(storage, spec.name)
        self.live: dict[int, Trial] = {}
        self.pools = Pools(spec, storage, url, self.dir, console)
        self.records: list[TrialRecord] = []
        self.merging: dict[int, asyncio.Task] = {}  # trial number -> its merged export, asked for
        self.news = asyncio.Event()  # a trial's event arrived: look again now, not at the next tick
        self.budgets: dict[int, int] = {}  # trial number -> its max_steps (its final report is there)
        cadence = trial_config(spec, base, {}, spec.name).train.save_steps  # the verdicts' steps
        self.scheduler = schedulers.make(spec, self.metric, cadence)
        self.saved_state: dict | None = None

    async def run(self) -> SweepSummary:
        self.bus = await Bus.connect(self.url, "sweep")
        try:
            self.store = await Store.open(self.bus, self.spec, self.base)
            self.records = await self.store.records()
            key = self.scheduler.state_key
            self.saved_state = await self.store.state(key) if key else None
            restored = self.scheduler.restore(self.records, self.saved_state)
            running = [r for r in self.records if r.state == "running"]
            total = self.spec.total()
            self.console.print(f"[bold]tuneloop sweep[/] [cyan]{self.spec.name}[/]: {self.scheduler.describe()}, "
                               f"{self.spec.concurrency} at a time, {self.spec.evaluators} shared evaluator(s); nats {self.url}"
                               + (f"; continuing: {len(self.records) - len(running)} finished, {len(running)} to resume"
                                  if self.records else ""))
            if len(self.records) < total or running:
                await self.pools.start(self.bus, staged=not running)
            for record in running:
                await self.resume(record)
            await self.carry_out(restored, restart=True)  # as far as the sweep had not carried it out
            while True:
                while self.training() < self.spec.concurrency and len(self.records) < total and await self.start_next():
                    pass
                if not self.live:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.news.wait(), 0.5)
                self.news.clear()
                await self.pools.start_later()
                self.pools.watch()
                for trial in list(self.live.values()):
                    await self.check(trial)
                await self.decide(self.scheduler.poll(self.view()))
            await self.merge_best()
        finally:
            self.pools.stop()
            await self.bus.close()
        return summarize(self.spec, self.metric, self.records, self.storage)

    def training(self) -> int:
        """Trials holding a slot. A pruned trial frees its worker for the next trial as soon as
        its training ends (its checkpoints are released meanwhile). A completing one holds the
        slot until its export's test score is told to the search: the next trials are judged
        against it, and its test evaluation does not queue behind their evaluations."""
        return sum(t.finished is None or t.finished.reason != "pruned" for t in self.live.values())

    def record(self, number: int) -> TrialRecord:
        return next(r for r in self.records if r.number == number)

    def view(self) -> schedulers.View:
        """The records, and which trials still train (not ended, not copied over)."""
        return schedulers.View(self.records, {n for n, t in self.live.items() if t.finished is None
                                              and t.record.replaced_by is None and t.record.state == "running"})

    # ------------------------------------------------------------ trials
    async def start_next(self) -> bool:
        """The scheduler's next trial, queued; False when it has none."""
        params = self.scheduler.next_trial(self.records)
        if params is None:
            return False
        number = len(self.records)
        run_id = f"{self.spec.name}-t{number:02d}"
        record = TrialRecord(number=number, run_id=run_id, params=params)
        self.records.append(record)
        try:
            cfg = trial_config(self.spec, self.base, params, run_id).with_overrides(self.scheduler.trial_overrides())
        except ValueError as e:  # a combination no single value showed at load (e.g. batch vs generations)
            record.state, record.stop_reason = "failed", f"invalid config: {e}"
            await self.store.put(record)
            await self.decide(self.scheduler.on_end(record, self.view()))
            self.console.log(f"[red]{run_id}[/] {params}: {record.stop_reason}")
            return True
        init_run(cfg, run_id, self.storage)
        await self.store.put(record)
        self.console.log(f"[bold]{run_id}[/] starts: {params}")
        await self.launch(Trial(record), queue=True)
        return True

    async def resume(self, record: TrialRecord) -> None:
        """A trial that was running when the sweep process died: queued again, the trainer
        resumes from its last checkpoint, unless training had already ended (then only the
        export and final verdict are awaited, from the checkpoint pool)."""
        done = await self.bus.latest(TrainingFinished, record.run_id)
        ended = done is not None and done.reason != "interrupted"
        self.console.log(f"[bold]{record.run_id}[/] resumes" + (" (training had ended)" if ended else ""))
        if record.forked_from and not (run_dir(self.storage, record.run_id) / CONFIG_FILE).is_file():
            try:  # the sweep died between recording a PBT copy and making its run
                await self.make_copy(record)
            except ValueError as err:  # ForkRefused: its round makes another (carry_out)
                record.state, record.stop_reason = "failed", f"not made: {err}"
                await self.store.put(record)
                return
        await self.launch(Trial(record), queue=not ended)

    async def launch(self, trial: Trial, queue: bool) -> None:
        record = trial.record
        rid = record.run_id
        for cls, handler in ((EvalVerdict, self.on_verdict), (TrainingFinished, self.on_event),
                             (ExportDone, self.on_event), (CheckpointsReleased, self.on_event),
                             (DeadLetter, self.on_event)):
            trial.subs.append(await self.bus.follow(cls, rid, _for(trial, handler, self.news)))  # history first, then live
        write_run_info(self.storage, rid, {"run_id": rid, **self.where, "pid": os.getpid(), "state": "running",
                                           "sweep": self.spec.name, "started": _now()})
        if queue:
            last = await self.bus.latest(RunQueued, rid)
            attempt = last.attempt + 1 if last else 0
            await self.bus.publish(RunQueued(run_id=rid, event_id=derived_id("queued", rid, attempt), attempt=attempt,
                                             reason=f"sweep {self.spec.name}" + (" (resumed)" if attempt else "")))
        self.live[record.number] = trial

    async def merge_best(self) -> None:
        """The winner's merged model: the one trial that needs it (LoRA trials export adapters).
        Usually made already, when it completed as the best so far (see ``end``)."""
        top = search.best(self.records)
        if top is None:
            return
        if top.number in self.merging:
            await self.merging[top.number]
        if top.export and Path(top.export).name == "adapter":
            await self.pools.start_later(now=True)
            self.pools.ensure("checkpoint")
            await self.merge(top)

    async def merge(self, record: TrialRecord) -> None:
        """Ask the checkpoint pool (torch is loaded there) to merge ``record``'s adapter."""
        try:
            done = await request_merged_export(self.url, record.run_id, f"best of sweep {self.spec.name}", bus=self.bus)
        except (ExportRefused, TimeoutError) as e:
            self.console.log(f"[yellow]{record.run_id}: no merged model: {e}[/] (its adapter is exported)")
            return
        record.export = done.merged_path
        await self.store.put(record)
        self.console.log(f"[bold]{record.run_id}[/] (best so far) merged: "
                         f"{run_dir(self.storage, record.run_id) / done.merged_path}")

    # ------------------------------------------------------------ events of a trial
    async def on_verdict(self, trial: Trial, v: EvalVerdict) -> None:
        trial.progress.update(v)
        if v.purpose != "periodic" or v.step in trial.record.values:
            return  # another kind, or seen before (a replay after a restart)
        score = v.scores.get(self.metric, 0.0)
        trial.record.values[v.step] = score
        if self.metric in v.bounds:
            trial.record.bounds[v.step] = list(v.bounds[self.metric])
        trial.record.budget = self.max_steps(trial.record)
        await self.store.put(trial.record)
        await self.decide(self.scheduler.on_verdict(trial.record, v.step, score, self.view()))

    async def on_event(self, trial: Trial, ev) -> None:
        trial.progress.update(ev)

    # ------------------------------------------------------------ the scheduler's decisions
    async def decide(self, decisions: list[schedulers.Decision], restart: bool = False) -> None:
        """The scheduler's state saved first (a restart carries its decisions out, not makes
        them again), then its decisions carried out."""
        state = self.scheduler.state()
        if state is not None and state != self.saved_state:
            await self.store.put_state(self.scheduler.state_key, state)
            self.saved_state = state
        await self.carry_out(decisions, restart)

    async def carry_out(self, decisions: list[schedulers.Decision], restart: bool = False) -> None:
        """Each decision, once: idempotent, so that a restart does what is not done yet."""
        for d in decisions:
            if isinstance(d, schedulers.Prune):
                trial = self.live.get(d.trial)
                if trial is not None:
                    await self.send_prune(trial, d.step, d.why, d.policy, restart)
            elif isinstance(d, schedulers.Resume):
                r = self.record(d.trial)
                if r.replaced_by is None and r.state == "running":
                    asyncio.create_task(self.resume_member(r, d.step))
            else:
                await self.copy(d.check, restart)

    async def send_prune(self, trial: Trial, step: int, why: str, policy: str, restart: bool) -> None:
        """A prune control for ``trial``, unless one was sent or its training ended (after a
        restart: unless the audit trail has one, or train.done came meanwhile)."""
        if trial.prune_sent or trial.finished is not None:
            return
        trial.prune_sent = True
        if restart:
            done = await self.bus.latest(TrainingFinished, trial.record.run_id)
            trail = await self.bus.audit_trail(trial.record.run_id)
            if (done is not None and done.reason != "interrupted") or any(
                    isinstance(e, Control) and e.command == "prune" for e in trail):
                return  # sent before the sweep died (on its way, or applied), or nothing left to save
        asyncio.create_task(self.prune(trial, step, why, policy))

    async def copy(self, c: Check, restart: bool) -> None:
        """A PBT round's copy: its record, then its run (a fork of the donor), queued; the member
        it replaces pruned. A member whose copy cannot be made (the fork refused) resumes."""
        r, e = self.record(c.trial), c.exploit
        made = next((x for x in self.records if x.replaces == r.number and x.start_step == e.step and x.state != "failed"), None)
        if made is not None and r.replaced_by is None:  # the sweep died between recording the copy and the member
            r.replaced_by = made.number
            await self.store.put(r)
        if r.replaced_by is None:
            donor = self.record(e.donor)
            copy = TrialRecord(number=len(self.records), run_id=f"{self.spec.name}-t{len(self.records):02d}",
                               params=e.params, start_step=e.step, replaces=r.number,
                               forked_from={"trial": donor.number, "run_id": donor.run_id, "step": e.step,
                                            "changed": e.changed})
            self.records.append(copy)
            await self.store.put(copy)  # first: a restart finds it (by `replaces`) and makes its run if it is not there
            try:
                await self.make_copy(copy)
            except ValueError as err:  # ForkRefused: the donor's checkpoint at that step is not there
                copy.state, copy.stop_reason = "failed", f"not made: {err}"
                await self.store.put(copy)
                c.refused = str(err)
                await self.decide([])  # the refusal, saved
                self.console.log(f"[yellow]{r.run_id}: no copy of {donor.run_id}: {err}[/]")
                asyncio.create_task(self.resume_member(r, c.step))
                return
            r.replaced_by = copy.number
            await self.store.put(r)
            await self.launch(Trial(copy), queue=True)
            change = ", ".join(f"{k}={_fmt(v)}" for k, v in e.changed.items()) or "no change"
            self.console.log(f"[bold]{r.run_id}[/] ({self.metric} {c.scores[r.number]:.3f} at step {c.step}) is copied "
                             f"over: [bold]{copy.run_id}[/] forks {donor.run_id} at step {e.step} ({change})")
        trial = self.live.get(r.number)
        if trial is not None:
            why = self.scheduler.why_copied(self.record(r.replaced_by))
            await self.send_prune(trial, c.step, why, "pbt exploit", restart)

    async def resume_member(self, record: TrialRecord, step: int) -> None:
        try:
            answer = await send_control(self.url, record.run_id, "resume", None, bus=self.bus, timeout=300,
                                        operator=f"sweep {self.spec.name}", policy="pbt barrier")
        except TimeoutError as e:
            self.console.log(f"[yellow]{record.run_id}: resume at the barrier of step {step} not answered: {e}[/]")
            return
        if not isinstance(answer, ControlApplied):  # resumed after a restart, it was not paused: nothing to do
            log.info("%s: resume at step %d: %s", record.run_id, step, getattr(answer, "reason", answer))

    def max_steps(self, record: TrialRecord) -> int:
        if record.number not in self.budgets:
            self.budgets[record.number] = load_run_config(self.storage, record.run_id).train.max_steps
        return self.budgets[record.number]

    async def make_copy(self, record: TrialRecord) -> None:
        """The copy's run: a full-state fork of its donor (``tuneloop fork``), announced on both;
        it pauses at the sweep's barriers as the members do."""
        from ..fork import make, plan
        from ..runner import announce_fork

        src = record.forked_from
        fork = plan(self.storage, src["run_id"], at=str(src["step"]), changes=src["changed"], name=record.run_id)
        fork.config = fork.config.with_overrides(self.scheduler.trial_overrides())
        await asyncio.to_thread(make, fork, self.storage)
        await announce_fork(fork, self.storage, self.url, bus=self.bus)

    async def prune(self, trial: Trial, step: int, why: str, policy: str) -> None:
        trial.record.judged_at = step  # recorded before it is sent: replay compares with this decision
        await self.store.put(trial.record)
        try:
            answer = await send_control(self.url, trial.record.run_id, "prune", why, bus=self.bus, timeout=300,
                                        operator=f"sweep {self.spec.name}", policy=policy)
        except TimeoutError as e:
            self.console.log(f"[yellow]{trial.record.run_id}: prune not answered: {e}[/]")
            return
        if isinstance(answer, ControlApplied):  # the record's pruned_at comes from train.done (see end)
            self.console.log(f"[bold]{trial.record.run_id}[/] pruned at step {answer.step}: {why}")
        elif isinstance(answer, Proposal):  # feedback.approve names prune: an operator decides, training goes on
            self.console.log(f"{trial.record.run_id}: prune proposed ({answer.event_id}), waiting for approval: {why}")
        else:  # e.g. training had just finished: the trial completes instead
            self.console.log(f"{trial.record.run_id}: prune rejected: {answer.reason}")

    # ------------------------------------------------------------ ends
    async def check(self, trial: Trial) -> None:
        p, f = trial.progress, trial.progress.finished
        if p.outcome == "failed":
            return await self.end(trial, "failed", p.failure)
        if p.outcome == "pruned":
            return await self.end(trial, "pruned", f.detail)
        if p.outcome == "complete":
            return await self.end(trial, "complete", f"{f.reason}: {f.detail}")

    async def end(self, trial: Trial, state: str, detail: str) -> None:
        r, f = trial.record, trial.finished
        for sub in trial.subs:
            await sub.unsubscribe()
        r.state, r.stop_reason = state, detail
        if f:
            r.steps, r.train_seconds = f.step, round(f.train_seconds, 1)
            if state == "pruned":  # from the trainer's own event: a sweep killed mid-prune never saw the answer
                r.pruned_at = f.step
            r.tokens_per_second, r.peak_memory_mb = f.tokens_per_second, f.peak_memory_mb
        p = trial.progress
        if p.final_verdict:
            r.test, r.value = dict(p.final_verdict.scores), p.final_verdict.scores.get(self.metric)
        if p.exported:
            r.export = p.exported.merged_path or p.exported.adapter_path
        if p.released:
            r.released_bytes = p.released.bytes
        await self.store.put(r)
        del self.live[r.number]
        await self.decide(self.scheduler.on_end(r, self.view()))  # the others, judged again against this end
        write_run_info(self.storage, r.run_id, {"run_id": r.run_id, **self.where, "state": state,
                                                "sweep": self.spec.name, "ended": _now()})
        if state == "complete" and r.export and Path(r.export).name == "adapter" and search.best(self.records) is r:
            # The best so far is merged now, while others train, not after the last trial: at
            # the end it usually is the winner, ready (a later, better trial is merged in turn).
            self.merging[r.number] = asyncio.create_task(self.merge(r))
        value = f"test {self.metric} {r.value:.3f}" if r.value is not None else ""
        color = {"complete": "green", "pruned": "yellow"}.get(state, "red")
        self.console.log(f"[bold]{r.run_id}[/] [{color}]{state}[/] {value} ({detail.splitlines()[0] if detail else ''})")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _for(trial: Trial, handler, news: asyncio.Event):
    async def on(ev) -> None:
        await handler(trial, ev)
        news.set()
    return on


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---------------------------------------------------------------- NATS of an embedded sweep
def attach_nats(sdir: Path) -> tuple[str, NatsServer | int]:
    """The sweep's NATS: the server a killed sweep left running (its store holds the state),
    else a new one on the same store. Returns the URL and what to stop at the end."""
    info_file = sdir / SWEEP_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    pid, url = info.get("nats_pid"), info.get("nats_url", "")
    host, _, port = url.removeprefix("nats://").rpartition(":")
    if pid and running(pid, "nats-server") and port.isdigit() and _accepts(host, int(port)):
        return url, pid
    server = NatsServer(sdir / "nats")
    url = server.start()
    sdir.mkdir(parents=True, exist_ok=True)
    info.update(nats_url=url, nats_pid=server.proc.pid, pid=os.getpid())  # the old pool pids stay: they are waited for
    info_file.write_text(json.dumps(info, indent=1))
    return url, server


def sweep(path: Path, *, nats_url: str | None = None, console: Console | None = None) -> SweepSummary:
    """Run (or continue) the sweep of ``path``; returns its summary."""
    console = console or Console()
    spec, base = load_sweep(path)
    storage = base.resolve(base.run.output_dir).resolve()
    sdir = run_dir(storage, spec.name)
    sdir.mkdir(parents=True, exist_ok=True)
    server = None
    if not nats_url:
        nats_url, server = attach_nats(sdir)
    try:
        store = None if server is None else sdir / "nats"
        return asyncio.run(Sweep(spec, base, storage, nats_url, console, store).run())
    finally:
        if isinstance(server, NatsServer):
            server.stop()
        elif server:  # adopted from a killed sweep
            os.kill(server, signal.SIGTERM)


# ---------------------------------------------------------------- the result
def summarize(spec: SweepSpec, metric: str, records: list[TrialRecord], storage: Path) -> SweepSummary:
    sdir = run_dir(storage, spec.name)
    top = search.best(records)
    summary = SweepSummary(sweep=spec.name, metric=metric, sampler=spec.sampler, pruner=spec.pruner.kind,
                           trials=sorted(records, key=lambda r: r.number))
    if top:
        trial_dir = run_dir(storage, top.run_id)
        (sdir / "best.yaml").write_text((trial_dir / CONFIG_FILE).read_text())
        link = sdir / "best"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / top.run_id / Path(top.export).parent if top.export else Path("..") / top.run_id)
        summary.best = SweepBest(trial=top.number, run_id=top.run_id, params=top.params, value=top.value,
                                 config=str(sdir / "best.yaml"),
                                 export=str(trial_dir / top.export) if top.export else None)
    write(summary, sdir)
    return summary
