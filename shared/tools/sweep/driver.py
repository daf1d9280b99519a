"""``tuneloop sweep SWEEP.yaml``: a search over training configs, as runs on one bus.

Top to bottom:

1. NATS: the sweep's own embedded server (its store in ``<runs>/<sweep>/nats``), or the one
   a killed sweep left running (adopted), or ``--nats-url``.
2. State: the trial records in the JetStream KV bucket ``tuneloop-sweeps``; the Optuna study
   is rebuilt from them (``search.rebuild``). Finished trials are never run again.
3. Pools shared by every trial, serving every run (``--run-id '*'``): ``concurrency`` trainer
   workers, one data-pipeline, one checkpoint service, ``evaluators`` evaluators and one
   rl-reward. Torch and transformers are imported once per worker, not once per trial, and
   a worker tokenizes a train set once for all the trials that share it.
4. Trials: up to ``concurrency`` at once, each a run of its own (``<sweep>-tNN``), queued with
   ``RunQueued``: a trainer worker takes it from the work queue (workers on other machines
   on the same NATS take trials too), data-pipeline prepares its data. ``tuneloop ctl
   <sweep>-t03 ...`` steers one. A trial that was running when the sweep died is queued again
   and resumes from its last checkpoint.
5. Verdicts on val go to Optuna's pruner; a trial that falls behind gets a ``prune`` control
   at its next step boundary, and its checkpoint service releases its checkpoints.
6. A trial's value is its exported model's score on test; the best one is reported, its config
   written to ``<sweep>/best.yaml`` and its export linked as ``<sweep>/best``. LoRA trials
   export their adapter; only the winner's is merged, by the checkpoint pool
   (``export.request``): each trial that completes as the best so far, while others train.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from nats.js.errors import KeyNotFoundError, NotFoundError
from rich.console import Console

from ... import subjects
from ...bus import Bus
from ...config import Config, ConfigError, differences
from ..client import ExportRefused, request_merged_export, send_control
from ..embedded import NatsServer, _accepts
from ...events import (CheckpointsReleased, Control, ControlApplied, DeadLetter, EvalVerdict, ExportDone, Proposal, RunQueued,
                      StepMetrics, TrainingFinished, derived_id)
from ...procfs import running
from ...records import Records
from ..processes import FIRST, LATER_WITHIN_S, spawn, stop_all
from ..progress import Progress
from ...storage import CONFIG_FILE, init_run, load_run_config, run_dir, write_run_info
from ..summary import SweepBest, SweepSummary, write
from . import pbt, search
from .pbt import Check, PbtLog
from .search import TrialRecord
from .spec import SweepSpec, load_sweep, trial_config

log = logging.getLogger(__name__)
BUCKET = subjects.SWEEP_BUCKET
POOLS = ("trainer", "data-pipeline", "checkpoint", "evaluator", "rl-reward")  # every trial is served by these
SWEEP_FILE = "sweep.json"


class SweepMismatch(ConfigError):
    """A sweep of this name exists with other settings: continuing it would mix two searches."""


# ---------------------------------------------------------------- state in KV
class Store:
    """The sweep's state in JetStream KV: ``<sweep>.spec`` and one ``<sweep>.trial-NNNN`` per trial."""

    def __init__(self, kv, name: str):
        self.kv, self.name = kv, name
        self.trials: Records[TrialRecord] = Records(kv, TrialRecord)

    @classmethod
    async def open(cls, bus: Bus, spec: SweepSpec, base: Config) -> "Store":
        """The sweep's store; SweepMismatch when a sweep of this name exists with other settings
        or its base config (the file every trial starts from) changed since it started."""
        store = cls(await bus.key_value(BUCKET), spec.name)
        key, mine = f"{spec.name}.spec", spec.fingerprint()
        base_now = base.model_dump(mode="json")
        try:
            stored = json.loads((await store.kv.get(key)).value)
        except (KeyNotFoundError, NotFoundError):
            await store.kv.put(key, json.dumps({"fingerprint": mine, "spec": spec.model_dump(mode="json"),
                                                "base": base_now}).encode())
            return store
        if stored["fingerprint"] != mine:
            changed = sorted(k for k, v in spec.model_dump(mode="json").items()
                             if stored["spec"].get(k) != v and k not in ("concurrency", "evaluators", "base_dir"))
            raise SweepMismatch(f"sweep {spec.name!r} already exists with other settings (changed: "
                                f"{', '.join(changed) or 'the sweep file format'}); give this one another name")
        if "base" in stored and (changed := differences(Config.model_validate(stored["base"]), base)):
            raise SweepMismatch(f"sweep {spec.name!r}: its base config {spec.config} changed since the sweep started "
                                f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); its trials would not "
                                "compare: restore it, or give the sweep another name")
        return store

    async def records(self) -> list[TrialRecord]:
        return await self.trials.under(f"{self.name}.trial-")

    async def put(self, record: TrialRecord) -> None:
        await self.trials.put(f"{self.name}.trial-{record.number:04d}", record)

    async def pbt_log(self) -> PbtLog:
        return await Records(self.kv, PbtLog).get(f"{self.name}.pbt") or PbtLog()

    async def put_pbt_log(self, log_: PbtLog) -> None:
        await Records(self.kv, PbtLog).put(f"{self.name}.pbt", log_)


# ---------------------------------------------------------------- one trial in this process
@dataclass
class Trial:
    record: TrialRecord
    optuna: object  # None in a PBT sweep: no Optuna study, the members are compared by pbt.decide
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
    def __init__(self, spec: SweepSpec, base: Config, storage: Path, url: str, console: Console,
                 store: Path | None = None):
        self.spec, self.base, self.storage, self.url, self.console = spec, base, storage, url, console
        # An embedded server's store: where a trial's events are read once the sweep is over.
        self.where = {"nats_url": url, **({"nats_store": str(store)} if store else {})}
        self.metric = spec.metric or base.feedback.metric
        self.dir = run_dir(storage, spec.name)
        self.live: dict[int, Trial] = {}
        self.pools: dict[tuple[str, int], subprocess.Popen] = {}
        self.records: list[TrialRecord] = []
        self.later: list[tuple[str, int]] = []  # pools not started yet (see start_pools)
        self.merging: dict[int, asyncio.Task] = {}  # trial number -> its merged export, asked for
        self.news = asyncio.Event()  # a trial's event arrived: look again now, not at the next tick
        self.pbt = spec.pbt if spec.sampler == "pbt" else None
        self.budgets: dict[int, int] = {}  # trial number -> its max_steps (a PBT round stops below it)

    async def run(self) -> SweepSummary:
        self.bus = await Bus.connect(self.url, "sweep")
        try:
            self.store = await Store.open(self.bus, self.spec, self.base)
            self.records = await self.store.records()
            if self.pbt:
                self.study, self.log = None, await self.store.pbt_log()
                running = {r.number: None for r in self.records if r.state == "running"}
            else:
                self.study = search.make_study(self.spec, drawn=len(self.records))
                running = search.rebuild(self.study, self.spec, self.records)
            total = self.spec.total()
            done = sum(r.state != "running" for r in self.records)
            what = (f"population-based training of {total} members (a round every {self.pbt.interval} verdict(s), "
                    f"quantile {self.pbt.quantile:g}, {self.pbt.explore})" if self.pbt else f"{total} trials")
            self.console.print(f"[bold]tuneloop sweep[/] [cyan]{self.spec.name}[/]: {what}, {self.spec.concurrency} "
                               f"at a time, {self.spec.evaluators} shared evaluator(s); nats {self.url}"
                               + (f"; continuing: {done} finished, {len(running)} to resume" if self.records else ""))
            if len(self.records) < total or running:
                await self.start_pools(staged=not running)
            for record in self.records:
                if record.state == "running":
                    await self.resume(record, running[record.number])
            if self.pbt and self.log.checks:  # the last round, as far as the sweep had not carried it out
                last = self.log.checks[-1].step
                await self.carry_out([c for c in self.log.checks if c.step == last], restart=True)
            while True:
                while self.training() < self.spec.concurrency and len(self.records) < total:
                    await self.start_next()
                if not self.live:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.news.wait(), 0.5)
                self.news.clear()
                await self.start_later_pools()
                self.watch_pools()
                for trial in list(self.live.values()):
                    await self.check(trial)
                if self.pbt:
                    await self.pbt_rounds()
            await self.merge_best()
        finally:
            stop_all(self.pools)
            await self.bus.close()
        return summarize(self.spec, self.metric, self.records, self.storage)

    def training(self) -> int:
        """Trials holding a slot. A pruned trial frees its worker for the next trial as soon as
        its training ends (its checkpoints are released meanwhile). A completing one holds the
        slot until its export's test score is told to the search: the next trials are judged
        against it, and its test evaluation does not queue behind their evaluations."""
        return sum(t.finished is None or t.finished.reason != "pruned" for t in self.live.values())

    # ------------------------------------------------------------ pools
    def pool_sizes(self) -> dict[str, int]:
        return {"trainer": self.spec.concurrency, "data-pipeline": 1, "checkpoint": 1,
                "evaluator": self.spec.evaluators, "rl-reward": 1}

    async def start_pools(self, staged: bool = True) -> None:
        """The pools of this sweep, after the ones a killed sweep left have stopped (they save
        the checkpoint of the trial they were training when they notice their parent is gone).
        ``staged``: those on the path to the first step start first; the rest once a trial
        trains (their start-up would only slow the trainers' own), or after ``LATER_WITHIN_S``.
        Trials to resume are mid-way, with checkpoints to evaluate now: all start at once."""
        info = self.info()
        await wait_gone(info.get("pool_pids", []), str(self.storage))
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        sizes = self.pool_sizes()
        for service in FIRST:
            for i in range(sizes[service]):
                self.start_pool(service, i)
        self.later = [(s, i) for s, n in sizes.items() if s not in FIRST for i in range(n)]
        self.later_by = time.monotonic() + (LATER_WITHIN_S if staged else 0.0)
        self.first_step = await self.bus.subscribe(StepMetrics, subjects.ALL_RUNS, self.on_first_step)
        await self.start_later_pools()
        self.save_pids()

    async def on_first_step(self, ev: StepMetrics) -> None:
        self.later_by = 0.0

    async def start_later_pools(self) -> None:
        if self.later and time.monotonic() >= self.later_by:
            for service, i in self.later:
                self.start_pool(service, i)
            self.later = []
            await self.first_step.unsubscribe()
            self.save_pids()

    def info(self) -> dict:
        info_file = self.dir / SWEEP_FILE
        return json.loads(info_file.read_text()) if info_file.exists() else {}

    def save_pids(self) -> None:
        info = self.info()
        info["pool_pids"] = [p.pid for p in self.pools.values()]
        (self.dir / SWEEP_FILE).write_text(json.dumps(info, indent=1))

    def start_pool(self, service: str, replica: int) -> None:
        env = None
        if "OMP_NUM_THREADS" not in os.environ:
            # Trials training at once share the cores; the services with models (evaluators,
            # checkpoint's merge) work beside them on one thread each: an OpenMP team on cores
            # the trainers hold spins and stalls (a 1 s merge took 26 s, a verdict 15 s).
            share = max(1, len(os.sched_getaffinity(0)) // self.spec.concurrency)
            env = {"OMP_NUM_THREADS": str(share if service == "trainer" else 1)}
        self.pools[(service, replica)] = spawn(service, subjects.ALL_RUNS, self.storage, self.url, self.dir / "logs", replica=replica,
                                               env=env)

    def watch_pools(self) -> None:
        """A pool replica that died is started again: the queues keep its work meanwhile (a
        trainer worker's trial is handed to another worker, which resumes it)."""
        for (service, replica), p in list(self.pools.items()):
            if p.poll() is not None:
                self.console.log(f"[yellow]{service} #{replica} exited with {p.returncode}; starting it again[/] "
                                 f"(logs in {self.dir / 'logs'})")
                self.start_pool(service, replica)

    # ------------------------------------------------------------ trials
    async def start_next(self) -> None:
        if self.pbt:
            number = len(self.records)
            trial = _Member(number, pbt.initial(self.spec)[number])
        else:
            trial = search.ask(self.study, self.spec, search.next_params(self.spec, self.records))
        run_id = f"{self.spec.name}-t{trial.number:02d}"
        record = TrialRecord(number=trial.number, run_id=run_id, params=trial.params)
        self.records.append(record)
        try:
            cfg = trial_config(self.spec, self.base, trial.params, run_id)
            if self.pbt:  # a member pauses at each barrier until its round is done
                cfg = cfg.with_overrides({"train.pause_every": self.barrier})
        except ValueError as e:  # a combination no single value showed at load (e.g. batch vs generations)
            record.state, record.stop_reason = "failed", f"invalid config: {e}"
            await self.store.put(record)
            self.tell(trial, record)
            self.console.log(f"[red]{run_id}[/] {trial.params}: {record.stop_reason}")
            return
        init_run(cfg, run_id, self.storage)
        await self.store.put(record)
        self.console.log(f"[bold]{run_id}[/] starts: {trial.params}")
        await self.launch(Trial(record, None if self.pbt else trial), queue=True)

    def tell(self, optuna_trial, record: TrialRecord) -> None:
        if self.study is not None:
            search.tell(self.study, optuna_trial, record)

    async def resume(self, record: TrialRecord, optuna_trial) -> None:
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
        trial = Trial(record, optuna_trial)
        await self.launch(trial, queue=not ended)
        if (not ended and not self.pbt and record.values and self.may_prune(trial, max(record.values))
                and optuna_trial.should_prune()):  # it fell behind before the sweep died
            trail = await self.bus.audit_trail(record.run_id)
            trial.prune_sent = True
            if not any(isinstance(e, Control) and e.command == "prune" for e in trail):  # else it is on its way
                step = max(record.values)
                asyncio.create_task(self.prune(trial, step, record.values[step]))

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
            self.later_by = 0.0
            await self.start_later_pools()
            if ("checkpoint", 0) not in self.pools:  # a sweep continued after its last trial: no pools yet
                (self.dir / "logs").mkdir(parents=True, exist_ok=True)
                self.start_pool("checkpoint", 0)
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
        if v.purpose == "final":
            return
        if v.purpose != "periodic" or v.step in trial.record.values:
            return  # another kind, or seen before (a replay after a restart)
        score = v.scores.get(self.metric, 0.0)
        trial.record.values[v.step] = score
        if self.metric in v.bounds:
            trial.record.bounds[v.step] = list(v.bounds[self.metric])
        trial.record.budget = self.max_steps(trial.record)
        await self.store.put(trial.record)
        if self.pbt:
            return  # compared in rounds (pbt_rounds), once every member has reached the step
        behind = search.report(trial.optuna, v.step, score, search.upper_of(trial.record, v.step))
        if behind and self.may_prune(trial, v.step):
            trial.prune_sent = True
            asyncio.create_task(self.prune(trial, v.step, score))

    def judge_again(self) -> None:
        """A trial told to the search changes what the pruner compares with (the median of the
        completed trials, their rungs): each trial still training is judged again at the step
        it last reported, instead of waiting for its next verdict."""
        for t in self.live.values():
            if t.optuna is None:
                continue
            if t.record.values and self.may_prune(t, max(t.record.values)) and t.optuna.should_prune():
                step = max(t.record.values)
                t.prune_sent = True
                asyncio.create_task(self.prune(t, step, t.record.values[step]))

    # ------------------------------------------------------------ population-based training
    # Synchronous, as Ray Tune's PBT with synch=True: a member pauses after each barrier's
    # checkpoint (train.pause_every); once every live member's verdict at a step is in, one
    # round compares them all on the same view, and the copies are forked at that very step.
    # No member trains past a barrier meanwhile, so nothing is trained twice, and what the
    # rounds decide does not depend on which verdict came first.
    def training_members(self) -> set[int]:
        """Members still training towards the next round (not ended, not copied over)."""
        return {n for n, t in self.live.items()
                if t.finished is None and t.record.replaced_by is None and t.record.state == "running"}

    def next_round(self) -> int | None:
        budgets = {r.number: self.max_steps(r) for r in self.records}
        return pbt.next_round(self.records, self.training_members(), {c.step for c in self.log.checks},
                              self.cadence, budgets)

    async def pbt_rounds(self) -> None:
        while (step := self.next_round()) is not None:
            members = pbt.members_at(self.records, self.training_members(), step)
            view = {r.number: r.values[step] for r in members}
            checks = [Check(trial=r.number, step=step, nth=sum(s <= step and s % self.cadence == 0 for s in r.values), scores=view,
                            params={m.number: m.params for m in members}, steps={m.number: step for m in members})
                      for r in members]
            for c in checks:
                c.exploit = pbt.decide(self.pbt, self.spec, c)
            self.log.checks += checks
            await self.store.put_pbt_log(self.log)  # recorded first: a restart carries the round out, not decides it again
            await self.carry_out(checks)

    async def carry_out(self, checks: list[Check], restart: bool = False) -> None:
        """A round's decisions: each copied-over member's copy made and queued, the member pruned;
        the others resumed from the barrier. Idempotent: a restart does what is not done yet."""
        for c in checks:
            r = next(x for x in self.records if x.number == c.trial)
            e = c.exploit
            if e is None or c.refused:
                if c.step % self.barrier == 0 and r.replaced_by is None and r.state == "running":
                    asyncio.create_task(self.resume_member(r, c.step))
                continue
            made = next((x for x in self.records if x.replaces == r.number and x.start_step == e.step and x.state != "failed"), None)
            if made is not None and r.replaced_by is None:  # the sweep died between recording the copy and the member
                r.replaced_by = made.number
                await self.store.put(r)
            if r.replaced_by is None:
                donor = next(x for x in self.records if x.number == e.donor)
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
                    await self.store.put_pbt_log(self.log)
                    self.console.log(f"[yellow]{r.run_id}: no copy of {donor.run_id}: {err}[/]")
                    asyncio.create_task(self.resume_member(r, c.step))
                    continue
                r.replaced_by = copy.number
                await self.store.put(r)
                await self.launch(Trial(copy, None), queue=True)
                change = ", ".join(f"{k}={_fmt(v)}" for k, v in e.changed.items()) or "no change"
                self.console.log(f"[bold]{r.run_id}[/] ({self.metric} {c.scores[r.number]:.3f} at step {c.step}) is copied "
                                 f"over: [bold]{copy.run_id}[/] forks {donor.run_id} at step {e.step} ({change})")
            trial = self.live.get(r.number)
            if trial is not None and not trial.prune_sent and trial.finished is None:
                trial.prune_sent = True
                if restart and any(isinstance(ev, Control) and ev.command == "prune" for ev in await self.bus.audit_trail(r.run_id)):
                    continue  # sent before the sweep died: on its way, or applied
                asyncio.create_task(self.prune(trial, c.step, c.scores[r.number], self.copied_why(r)))

    @functools.cached_property
    def cadence(self) -> int:
        """The trials' checkpoint (and so verdict) cadence: ``save_steps``, which PBT may not search."""
        return trial_config(self.spec, self.base, {}, self.spec.name).train.save_steps

    @property
    def barrier(self) -> int:
        """Steps between rounds that may copy: ``interval`` verdicts of the cadence."""
        return self.pbt.interval * self.cadence

    async def resume_member(self, record: TrialRecord, step: int) -> None:
        try:
            answer = await send_control(self.url, record.run_id, "resume", None, bus=self.bus, timeout=300,
                                        operator=f"sweep {self.spec.name}", policy="pbt barrier")
        except TimeoutError as e:
            self.console.log(f"[yellow]{record.run_id}: resume at the barrier of step {step} not answered: {e}[/]")
            return
        if not isinstance(answer, ControlApplied):  # resumed after a restart, it was not paused: nothing to do
            log.info("%s: resume at step %d: %s", record.run_id, step, getattr(answer, "reason", answer))

    def may_prune(self, trial: Trial, step: int) -> bool:
        """A prune can still save steps: the trial trains on, and its verdict at ``step`` is not
        its final report (at its last step there is nothing left to save, and a fair pruner
        leaves the result to the trial's test score)."""
        return not trial.prune_sent and trial.finished is None and step < self.max_steps(trial.record)

    def max_steps(self, record: TrialRecord) -> int:
        if record.number not in self.budgets:
            self.budgets[record.number] = load_run_config(self.storage, record.run_id).train.max_steps
        return self.budgets[record.number]

    def copied_why(self, record: TrialRecord) -> str:
        copy = next((c for c in self.records if c.number == record.replaced_by), None)
        src = copy.forked_from if copy else {}
        return (f"pbt: {self.metric} in the bottom {self.pbt.quantile:g} of the population; "
                f"{copy.run_id if copy else '?'} takes its place (a fork of {src.get('run_id', '?')} at step {src.get('step', '?')})")

    async def make_copy(self, record: TrialRecord) -> None:
        """The copy's run: a full-state fork of its donor (``tuneloop fork``), announced on both;
        it pauses at the sweep's barriers as the members do."""
        from ..fork import make, plan
        from ..runner import announce_fork

        src = record.forked_from
        fork = plan(self.storage, src["run_id"], at=str(src["step"]), changes=src["changed"], name=record.run_id)
        fork.config = fork.config.with_overrides({"train.pause_every": self.barrier})
        await asyncio.to_thread(make, fork, self.storage)
        await announce_fork(fork, self.storage, self.url, bus=self.bus)

    async def prune(self, trial: Trial, step: int, score: float, why: str | None = None) -> None:
        why = why or f"{self.metric} {score:.3f} on val at step {step} fell behind ({self.spec.pruner.kind} pruner)"
        policy = "pbt exploit" if self.pbt else f"{self.spec.pruner.kind} pruner"
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

    async def on_event(self, trial: Trial, ev) -> None:
        trial.progress.update(ev)

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
        self.tell(trial.optuna, r)
        del self.live[r.number]
        self.judge_again()
        write_run_info(self.storage, r.run_id, {"run_id": r.run_id, **self.where, "state": state,
                                                "sweep": self.spec.name, "ended": _now()})
        if state == "complete" and r.export and Path(r.export).name == "adapter" and search.best(self.records) is r:
            # The best so far is merged now, while others train, not after the last trial: at
            # the end it usually is the winner, ready (a later, better trial is merged in turn).
            self.merging[r.number] = asyncio.create_task(self.merge(r))
        value = f"test {self.metric} {r.value:.3f}" if r.value is not None else ""
        color = {"complete": "green", "pruned": "yellow"}.get(state, "red")
        self.console.log(f"[bold]{r.run_id}[/] [{color}]{state}[/] {value} ({detail.splitlines()[0] if detail else ''})")


@dataclass
class _Member:
    """A PBT member's first settings, in the shape of an Optuna trial (number, params)."""

    number: int
    params: dict


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _for(trial: Trial, handler, news: asyncio.Event):
    async def on(ev) -> None:
        await handler(trial, ev)
        news.set()
    return on


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


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
