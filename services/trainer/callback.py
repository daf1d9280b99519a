"""``BusCallback``: the one place where the TRL/transformers training loop meets the bus.

- ``on_log``: publish ``StepMetrics``.
- ``on_step_end``: the events that arrived during the step, in order, each decided by the
  ``Steerer`` (steering.py: pure, every rule there) and carried out here (the optimizer,
  TRL's control flags, the steering file), its answer published.
- ``on_save``: announce the complete checkpoint with ``CheckpointSaved``; a guarded control
  waits for this checkpoint (its savepoint) and is applied here (see ``rollback``).

With several processes every rank runs this callback; rank 0's events are broadcast at the
step boundary so every rank applies the same ones, and only rank 0 speaks on the bus.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneloop import controls
from tuneloop.checkpoints import folder, read_steering, write_state, write_steering
from tuneloop.storage import RunDir, relative
from tuneloop.config import FeedbackSection
from tuneloop.events import (CheckpointSaved, Control, DatasetReady,
                             Feedback, StepMetrics)

from . import distributed, rollback
from .link import BusLink, FollowerLink
from .steering import Boundary, Effects, Steerer

log = logging.getLogger(__name__)
PAUSE_POLL_S = 2.0


def set_learning_rate(optimizer, scheduler, new: float) -> None:
    """Make ``new`` the lr from the next step on, rescaling the schedule so it continues from it."""
    current = optimizer.param_groups[0]["lr"]
    ratio = new / current if current > 0 else None
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * ratio if ratio else new for b in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * ratio if ratio else new
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * ratio if ratio else new
    if scheduler is not None and hasattr(scheduler, "_last_lr"):  # what the Trainer logs for the next step
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def sync_args(args, run_state: controls.Steering) -> None:
    """Mirror the steerable values into TrainingArguments, which the training loop reads."""
    args.max_grad_norm, args.save_steps, args.logging_steps = run_state.max_grad_norm, run_state.save_steps, run_state.logging_steps


def durable_state(run_dir: Path, fallback: controls.Steering) -> controls.Steering:
    """What operators were told was applied: the run directory's record when it holds controls
    that ``fallback`` (a checkpoint's state, or a fresh run's) lacks, i.e. applied after it.
    Open proposals are the record's too (written whenever one opens or ends)."""
    try:
        recorded = read_steering(RunDir(run_dir).applied)
    except (OSError, ValueError, TypeError):
        return fallback
    if not recorded.applied_ids() >= fallback.applied_ids():
        return fallback  # a record older than the checkpoint
    if recorded.applied_ids() - fallback.applied_ids():
        return recorded
    fallback.proposals = recorded.proposals
    return fallback


def _noop() -> None:
    pass


def weights_checksum(model) -> float:
    """Sum of the trainable weights: equal on every rank unless the ranks drifted apart."""
    import torch

    with torch.no_grad():
        return round(float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad)), 6)


class BusCallback(TrainerCallback):
    """The TRL hooks and the torch side of steering: what arrived is decided by ``Steerer``
    (steering.py, pure) and carried out here."""

    def __init__(self, link: BusLink | FollowerLink, run_id: str, run_dir: Path, base_model: str, adapter: bool,
                 state: controls.Steering, method: str = "sft", sharded: bool = False, eval_every: int | None = None,
                 gates: FeedbackSection | None = None, categories: frozenset[str] = frozenset(),
                 pause_every: int | None = None, metrics: list[str] | None = None):
        self.link = link
        self.steer = Steerer(run_id, state, gates, categories, metrics)
        self.deferred_ack = None  # a guarded control's acknowledgement, until its savepoint is saved
        self.losses: dict[int, float] = {}  # step -> loss, while a guard watches (what `loss` reads)
        self.rolled_back_to: int | None = None  # the savepoint step the loop resumes from after a rollback
        # eval.every: evaluate weights-only snapshots at this cadence; checkpoints then only serve
        # resume (the last one, and one an operator's `eval` asked for, are evaluated too).
        self.eval_every = eval_every
        self.pause_every = pause_every  # a PBT member's barrier: paused after these checkpoints, until resumed
        self.evaluate_next_save = False
        self.awaiting: dict[int, float] = {}  # step -> when announced for evaluation, until its feedback
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.base_model = base_model
        self.adapter = adapter
        self.method = method
        self.sharded = sharded  # FSDP: each rank holds other weights, so only the rest is compared
        self.switch_to: DatasetReady | None = None  # set-data: the recipe continues on this data set
        self.last_loss: float | None = None
        self.final_checkpoint: str | None = None
        # Throughput over the intervals between logs (TRL's num_tokens counts all ranks); the
        # first interval of each train() call is skipped: it holds set-up, and after a resume the
        # count starts from the checkpoint's total.
        self.measured_tokens, self.measured_seconds = 0.0, 0.0
        self._t_log, self._tokens_mark = time.perf_counter(), None
        self._last_pause_note = 0.0
        # Controls answered after the checkpoint this run resumes from (see durable_state).
        self.restored: list[controls.AppliedControl] | None = None
        self.stop_at_first_step = False
        self.trackers = None  # run.report_to: tuneloop's records into TRL's trackers (trackers.TrackerLog)

    # What the recipe and the rollback read and reset: the steerer's.
    @property
    def run_state(self) -> controls.Steering:
        return self.steer.state

    @run_state.setter
    def run_state(self, state: controls.Steering) -> None:
        self.steer.state = state

    @property
    def stop_reason(self) -> tuple[str, str] | None:
        return self.steer.stop_reason

    @stop_reason.setter
    def stop_reason(self, reason: tuple[str, str] | None) -> None:
        self.steer.stop_reason = reason

    @property
    def rollback(self) -> rollback.Rollback | None:
        return self.steer.rollback

    @rollback.setter
    def rollback(self, plan: rollback.Rollback | None) -> None:
        self.steer.rollback = plan

    # ---------------------------------------------------------------- metrics
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, model=None, **kwargs):
        self._t_log, self._tokens_mark = time.perf_counter(), None
        if self.rolled_back_to is not None and model is not None:  # every rank says what it resumed with
            log.warning("rank %d resumed from the savepoint at step %d: weights checksum %s", distributed.rank(),
                        self.rolled_back_to, weights_checksum(model))
            self.rolled_back_to = None
        if self.restored is not None:  # controls answered after the checkpoint: they hold from this step on
            rs = self.run_state
            current = optimizer.param_groups[0]["lr"] if optimizer is not None else None
            if current is not None and abs(current - rs.learning_rate) > 1e-12 * max(abs(current), 1.0):
                set_learning_rate(optimizer, lr_scheduler, rs.learning_rate)
            sync_args(args, rs)
            state.save_steps, state.logging_steps = rs.save_steps, rs.logging_steps
            for a in self.restored:
                if a.command in ("stop", "prune") and self.stop_reason is None:
                    self.stop_reason = ("pruned" if a.command == "prune" else "control",
                                        f"{a.command} applied at step {a.step} before a restart")
                    self.stop_at_first_step = True
            log.info("holding %d control(s) answered after the last checkpoint: %s", len(self.restored),
                     [a.command for a in self.restored])
            self.restored = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        if self.run_state.guard is not None or self.steer.deferred is not None:
            self.losses[state.global_step] = self.last_loss
        now = time.perf_counter()
        tokens = logs.get("num_tokens")
        tps = trained = None
        if tokens is not None and self._tokens_mark is not None and now > self._t_log:
            trained = max(int(tokens - self._tokens_mark), 0)
            tps = (tokens - self._tokens_mark) / (now - self._t_log)
            self.measured_tokens += tokens - self._tokens_mark
            self.measured_seconds += now - self._t_log
        self._t_log, self._tokens_mark = now, tokens
        self.link.publish(StepMetrics(
            run_id=self.run_id, step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
            loss=self.last_loss, learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_second=tps, tokens=trained, reward=logs.get("reward"), method=self.method,
        ))

    # ---------------------------------------------------------------- step boundary
    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.stop_at_first_step:
            self.stop_at_first_step = False
            control.should_training_stop = True
        items, stopping = self._exchange()
        self._handle(items, args, state, control, optimizer, lr_scheduler)
        stopping = self._hold(args, state, control, optimizer, lr_scheduler, stopping)
        if stopping and self.stop_reason is None:
            log.info("termination requested: saving and stopping at step %d", state.global_step)
            self.stop_reason = ("interrupted", "service asked to stop (SIGTERM); resumes from this checkpoint")
            control.should_training_stop = True
        if self.rollback is not None:
            control.should_save = False  # these weights are discarded
        elif control.should_training_stop and not self.pruned:
            control.should_save = True  # the last step is always a checkpoint (a pruned run's are released)
        if self._snapshot_due(state, control):
            self._snapshot(kwargs.get("model"), state)
        return control

    def _hold(self, args, state, control, optimizer, scheduler, stopping: bool = False) -> bool:
        """While paused: metrics keep saying so, controls are still answered (resume, stop, prune)."""
        while self.run_state.paused and not control.should_training_stop and not stopping:
            self._publish_paused(state)
            items, stopping = self._exchange(PAUSE_POLL_S)
            self._handle(items, args, state, control, optimizer, scheduler)
        return stopping

    # ---------------------------------------------------------------- evaluation snapshots
    def _snapshot_due(self, state, control) -> bool:
        """A snapshot step that no checkpoint covers (a checkpoint at that step is evaluated instead)."""
        return (self.eval_every is not None and state.global_step % self.eval_every == 0 and not control.should_save
                and not control.should_training_stop and state.is_world_process_zero)

    def _snapshot(self, model, state) -> None:
        """Weights (or the adapter) only, written aside and renamed into place, then announced."""
        step = state.global_step
        final = RunDir(self.run_dir).snapshot(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)  # a snapshot of this step from before a resume
        tmp.rename(final)
        saved = CheckpointSaved(run_id=self.run_id, step=step, path=relative(self.run_dir, final), base_model=self.base_model,
                                adapter=self.adapter, loss=self.last_loss, snapshot=True)
        self.link.publish(saved, now=True)  # not waited for: a snapshot lost to a crash costs one evaluation, nothing else
        if self.run_state.guard is not None:
            self.run_state.guard.saves.append(saved.event_id)
        self.awaiting[step] = time.monotonic()

    def expecting_verdicts(self, within_s: float = 60.0) -> bool:
        """Whether evaluations announced in the last ``within_s`` still lack their feedback."""
        now = time.monotonic()
        return any(now - t < within_s for t in self.awaiting.values())

    def _exchange(self, wait_s: float = 0.0):
        """(events, stop requested) for this boundary, the same on every rank: rank 0's, broadcast."""
        items = self.link.wait(wait_s) if wait_s else self.link.drain()
        stopping = self.link.stopping.is_set()
        if distributed.rank() == 0:  # judgements and deadlines: rank 0's clock and losses decide for all
            items = items + [(j, _noop) for j in self._judgements([e for e, _ in items])]
        if distributed.world_size() == 1:
            return items, stopping
        events = [e for e, _ in items]
        wanted = {e.value for e in events if isinstance(e, Control) and e.command == "set-data"}
        for e in events:  # a proposal answered now may hold a set-data
            held = self.run_state.proposals.get(getattr(e, "proposal_id", None) or "")
            if held and held.control and held.control["command"] == "set-data":
                wanted.add(held.control["value"])
        datasets = {k: v for k, v in self.link.datasets.items() if k in wanted}
        events, stopping, datasets = distributed.broadcast((events, stopping, datasets))
        self.link.datasets.update(datasets)
        return (items if distributed.rank() == 0 else [(e, _noop) for e in events]), stopping

    def _judgements(self, events) -> list:
        return self.steer.judgements(events, self.losses, time.time())

    def _boundary(self, state, control) -> Boundary:
        return Boundary(step=state.global_step, datasets=frozenset(self.link.datasets), now=time.time(),
                        loop_stopping=bool(control.should_training_stop))

    def _handle(self, items, args, state, control, optimizer, scheduler) -> None:
        """Decide each event (the steerer), carry out its effects, answer it."""
        for event, done in items:
            fx = None
            try:
                if isinstance(event, Feedback) and not self.steer.stale(event):
                    self.awaiting.pop(event.step, None)
                fx = self.steer.decide(event, self._boundary(state, control))
                self._carry_out(fx, args, state, control, optimizer, scheduler)
                if self.trackers is not None:
                    self.trackers.seen(event, fx.answer)
            finally:
                if fx is not None and fx.deferred:
                    self.deferred_ack = done  # acknowledged with its answer, after the savepoint
                elif fx is None or fx.answer is None:
                    done()
                else:  # the event is acknowledged once its answer is stored: a crash before redelivers it
                    self.link.publish(fx.answer, then=done)

    def _carry_out(self, fx: Effects, args, state, control, optimizer, scheduler) -> None:
        """Do what a decision asks: the optimizer, TRL's flags, the files; publish what it says."""
        rs = self.run_state
        if fx.set_lr:
            set_learning_rate(optimizer, scheduler, rs.learning_rate)
        if fx.applied:
            sync_args(args, rs)
            state.save_steps, state.logging_steps = rs.save_steps, rs.logging_steps  # what DefaultFlowCallback reads
        if fx.stop:
            control.should_training_stop = True
        if fx.save:
            control.should_save = True
        if fx.switch_data:
            self.switch_to = self.link.datasets[fx.switch_data]
        self.evaluate_next_save |= fx.evaluate_next_save
        if fx.write_steering:  # durable before it is answered: a crash now does not undo it
            self._write_applied()
        for event in fx.publish:
            self.link.publish(event)
        if rs.guard is None and self.steer.deferred is None:
            self.losses.clear()  # no guard watches (confirmed, or none): no loss to judge it by

    def _publish_paused(self, state) -> None:
        now = time.monotonic()
        if now - self._last_pause_note >= PAUSE_POLL_S:
            self._last_pause_note = now
            self.link.publish(StepMetrics(run_id=self.run_id, step=state.global_step, max_steps=state.max_steps,
                                          learning_rate=self.run_state.learning_rate, paused=True))

    def forget_after(self, step: int) -> None:
        """After a rollback to ``step``: what was observed later belongs to discarded training."""
        self.losses = {s: v for s, v in self.losses.items() if s <= step}
        self.awaiting = {s: t for s, t in self.awaiting.items() if s <= step}
        self.steer.forget_stop()
        self.switch_to, self.final_checkpoint = None, None
        self.rolled_back_to = step

    def _write_applied(self) -> None:
        if distributed.rank() == 0:
            write_steering(RunDir(self.run_dir).applied, self.run_state)

    @property
    def tokens_per_second(self) -> float | None:
        return self.measured_tokens / self.measured_seconds if self.measured_seconds else None

    @property
    def pruned(self) -> bool:
        return self.stop_reason is not None and self.stop_reason[0] == "pruned"

    # ---------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if distributed.world_size() > 1:
            rs = self.run_state
            distributed.check_agreement({
                "step": state.global_step, "lr": rs.learning_rate, "controls": len(rs.applied),
                "rolled_back": len(rs.rolled_back), "dataset": rs.dataset_id, "stop": bool(control.should_training_stop),
                "weights": None if self.sharded or model is None else weights_checksum(model),
            })
        if state.is_world_process_zero:
            self._announce(args, state, control, savepoint=self.steer.deferred is not None)
        if self.steer.deferred is not None:  # this checkpoint is the savepoint: now the guarded control
            self._apply_guarded(args, state, control, optimizer, lr_scheduler)
        if self._at_barrier(state, control):
            self._barrier(args, state, control, optimizer, lr_scheduler)

    def _at_barrier(self, state, control) -> bool:
        return (self.pause_every is not None and state.global_step % self.pause_every == 0
                and state.global_step < state.max_steps and not control.should_training_stop and not self.run_state.paused)

    def _barrier(self, args, state, control, optimizer, scheduler) -> None:
        """A PBT member waits after this checkpoint for its sweep to compare it with the others:
        paused as by a ``pause`` control, until ``resume`` (or ``prune``: copied over). Stopped
        while it waits, this checkpoint is its last."""
        log.info("step %d: paused at the sweep's barrier until resumed", state.global_step)
        self.run_state.paused = True
        stopping = self._hold(args, state, control, optimizer, scheduler)
        if stopping and self.stop_reason is None:
            self.stop_reason = ("interrupted", "service asked to stop (SIGTERM); resumes from this checkpoint")
        if stopping or control.should_training_stop:
            control.should_training_stop = True
            self.final_checkpoint = str(folder(args.output_dir, state.global_step).resolve().relative_to(self.run_dir.resolve()))

    def _apply_guarded(self, args, state, control, optimizer, scheduler) -> None:
        ack, self.deferred_ack = self.deferred_ack, None
        savepoint = folder(args.output_dir, state.global_step).resolve().relative_to(self.run_dir.resolve())
        fx = self.steer.at_savepoint(str(savepoint), self._boundary(state, control), args.ignore_data_skip)
        self._carry_out(fx, args, state, control, optimizer, scheduler)
        self.link.publish(fx.answer, then=ack)

    def _announce(self, args, state, control, savepoint: bool) -> None:
        """Rank 0: the checkpoint's steering file, then ``CheckpointSaved``."""
        path = folder(args.output_dir, state.global_step)
        write_state(path, self.run_state)
        rel = str(path.resolve().relative_to(self.run_dir.resolve()))
        ending = bool(control.should_training_stop) and (self.switch_to is None or self.stop_reason is not None)
        final = ending or state.global_step >= state.max_steps
        if final:
            self.final_checkpoint = rel
        evaluate = (self.eval_every is None or final or self.evaluate_next_save
                    or state.global_step % self.eval_every == 0)
        self.evaluate_next_save = False
        saved = CheckpointSaved(run_id=self.run_id, step=state.global_step, path=rel, base_model=self.base_model,
                                adapter=self.adapter, is_final=final, loss=self.last_loss, evaluate=evaluate,
                                savepoint=savepoint)
        self.link.publish(saved, now=True)  # the training thread goes on; the outbox keeps it (in order) while the broker is away
        if self.run_state.guard is not None:
            self.run_state.guard.saves.append(saved.event_id)
        if evaluate:
            self.awaiting[state.global_step] = time.monotonic()
