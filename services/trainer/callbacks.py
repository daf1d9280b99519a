"""The run's other TRL callbacks, one concern each: metrics, checkpoints, snapshots. Steering
(and the PBT barrier) is steering_callback.py; ``Hooks`` puts them all in the order TRL must
call them."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneloop import controls
from tuneloop.checkpoints import folder, write_state
from tuneloop.config import FeedbackSection
from tuneloop.events import CheckpointSaved, StepMetrics
from tuneloop.storage import RunDir, relative

from . import distributed
from .link import BusLink, FollowerLink
from .loop_state import LoopState, weights_checksum
from .steering import Steerer
from .steering_callback import BarrierCallback, SteeringCallback

log = logging.getLogger(__name__)


class MetricsCallback(TrainerCallback):
    """Each log of TRL's as ``StepMetrics``; the losses a guard is judged by; throughput."""

    def __init__(self, loop: LoopState, method: str = "sft"):
        self.loop, self.method = loop, method
        # Throughput over the intervals between logs (TRL's num_tokens counts all ranks); the
        # first interval of each train() call is skipped: it holds set-up, and after a resume the
        # count starts from the checkpoint's total.
        self.measured_tokens, self.measured_seconds = 0.0, 0.0
        self._t_log, self._tokens_mark = time.perf_counter(), None

    @property
    def tokens_per_second(self) -> float | None:
        return self.measured_tokens / self.measured_seconds if self.measured_seconds else None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t_log, self._tokens_mark = time.perf_counter(), None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs, loop = logs or {}, self.loop
        if "loss" not in logs:
            return
        loop.last_loss = float(logs["loss"])
        if loop.run_state.guard is not None or loop.steer.deferred is not None:
            loop.losses[state.global_step] = loop.last_loss
        now = time.perf_counter()
        tokens = logs.get("num_tokens")
        tps = trained = None
        if tokens is not None and self._tokens_mark is not None and now > self._t_log:
            trained = max(int(tokens - self._tokens_mark), 0)
            tps = (tokens - self._tokens_mark) / (now - self._t_log)
            self.measured_tokens += tokens - self._tokens_mark
            self.measured_seconds += now - self._t_log
        self._t_log, self._tokens_mark = now, tokens
        loop.link.publish(StepMetrics(
            run_id=loop.run_id, step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
            loss=loop.last_loss, learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_second=tps, tokens=trained, reward=logs.get("reward"), method=self.method,
        ))


class CheckpointCallback(TrainerCallback):
    """Each checkpoint TRL saved, announced with ``CheckpointSaved`` (rank 0) after its steering
    file is written into it; evaluated when the cadence says (``eval.every``: checkpoints then
    only serve resume, the last one and one an operator's ``eval`` asked for evaluated too).
    With several ranks, first a check that they agree."""

    def __init__(self, loop: LoopState, base_model: str, adapter: bool, eval_every: int | None, sharded: bool):
        self.loop, self.base_model, self.adapter, self.eval_every = loop, base_model, adapter, eval_every
        self.sharded = sharded  # FSDP: each rank holds other weights, so only the rest is compared

    def on_save(self, args, state, control, model=None, **kwargs):
        loop = self.loop
        if distributed.world_size() > 1:
            rs = loop.run_state
            distributed.check_agreement({
                "step": state.global_step, "lr": rs.learning_rate, "controls": len(rs.applied),
                "rolled_back": len(rs.rolled_back), "dataset": rs.dataset_id, "stop": bool(control.should_training_stop),
                "weights": None if self.sharded or model is None else weights_checksum(model),
            })
        if state.is_world_process_zero:
            self.announce(args, state, control, savepoint=loop.steer.deferred is not None)

    def announce(self, args, state, control, savepoint: bool) -> None:
        loop = self.loop
        path = folder(args.output_dir, state.global_step)
        write_state(path, loop.run_state)
        rel = loop.checkpoint(args, state.global_step)
        ending = bool(control.should_training_stop) and (loop.switch_to is None or loop.stop_reason is not None)
        final = ending or state.global_step >= state.max_steps
        if final:
            loop.final_checkpoint = rel
        evaluate = (self.eval_every is None or final or loop.evaluate_next_save
                    or state.global_step % self.eval_every == 0)
        loop.evaluate_next_save = False
        saved = CheckpointSaved(run_id=loop.run_id, step=state.global_step, path=rel, base_model=self.base_model,
                                adapter=self.adapter, is_final=final, loss=loop.last_loss, evaluate=evaluate,
                                savepoint=savepoint)
        loop.link.publish(saved, now=True)  # the training thread goes on; the outbox keeps it (in order) while the broker is away
        if loop.run_state.guard is not None:
            loop.run_state.guard.saves.append(saved.event_id)
        if evaluate:
            loop.awaiting[state.global_step] = time.monotonic()


class SnapshotCallback(TrainerCallback):
    """``eval.every``: at its steps that no checkpoint covers, the weights (or the adapter) only,
    written aside and renamed into place, then announced for evaluation. After steering in the
    callback order: a step that steering ends or saves is a checkpoint, evaluated instead."""

    def __init__(self, loop: LoopState, base_model: str, adapter: bool, every: int):
        self.loop, self.base_model, self.adapter, self.every = loop, base_model, adapter, every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (state.global_step % self.every or control.should_save or control.should_training_stop
                or not state.is_world_process_zero):
            return
        loop, step = self.loop, state.global_step
        final = RunDir(loop.run_dir).snapshot(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)  # a snapshot of this step from before a resume
        tmp.rename(final)
        saved = CheckpointSaved(run_id=loop.run_id, step=step, path=relative(loop.run_dir, final), base_model=self.base_model,
                                adapter=self.adapter, loss=loop.last_loss, snapshot=True)
        loop.link.publish(saved, now=True)  # not waited for: a snapshot lost to a crash costs one evaluation, nothing else
        if loop.run_state.guard is not None:
            loop.run_state.guard.saves.append(saved.event_id)
        loop.awaiting[step] = time.monotonic()


class Hooks:
    """The run's callbacks in the order TRL calls them, and what the recipe reads of the run.

    The order matters twice: at ``on_save`` the checkpoint is announced (its steering file
    written as it was) before steering applies a guarded control whose savepoint it is, and
    before a PBT member pauses at its barrier; at ``on_step_end`` steering decides (a stop, a
    save) before a snapshot is due."""

    def __init__(self, link: BusLink | FollowerLink, run_id: str, run_dir: Path, base_model: str, adapter: bool,
                 state: controls.Steering, method: str = "sft", sharded: bool = False, eval_every: int | None = None,
                 gates: FeedbackSection | None = None, categories: frozenset[str] = frozenset(),
                 pause_every: int | None = None, metrics: list[str] | None = None):
        self.loop = LoopState(link, run_id, Path(run_dir), Steerer(run_id, state, gates, categories, metrics))
        self.metrics = MetricsCallback(self.loop, method)
        self.steering = SteeringCallback(self.loop)
        self.callbacks: list[TrainerCallback] = [
            self.metrics, CheckpointCallback(self.loop, base_model, adapter, eval_every, sharded), self.steering,
            *([SnapshotCallback(self.loop, base_model, adapter, eval_every)] if eval_every else []),
            *([BarrierCallback(self.steering, pause_every)] if pause_every else [])]
