"""``BusCallback``: the one place where the TRL/transformers training loop meets the bus.

- ``on_log``: publish ``StepMetrics``.
- ``on_step_end``: apply the control and feedback events that arrived during the step, in
  order, and answer each control with ``ControlApplied`` / ``ControlRejected``.
- ``on_save``: announce the complete checkpoint with ``CheckpointSaved``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneloop.events import CheckpointSaved, Control, ControlApplied, ControlRejected, Feedback, StepMetrics

from . import controls
from .link import BusLink

log = logging.getLogger(__name__)


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


class BusCallback(TrainerCallback):
    def __init__(self, link: BusLink, run_id: str, run_dir: Path, base_model: str, adapter: bool, state: controls.RunState):
        self.link = link
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.base_model = base_model
        self.adapter = adapter
        self.run_state = state
        self.stop_reason: tuple[str, str] | None = None  # (reason, detail)
        self.last_loss: float | None = None
        self.last_saved_step = -1
        self.final_checkpoint: str | None = None
        self._t_log = time.perf_counter()
        self._tokens_log = 0.0

    # ---------------------------------------------------------------- metrics
    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        now = time.perf_counter()
        tokens = float(logs.get("num_tokens", 0.0))
        tps = (tokens - self._tokens_log) / (now - self._t_log) if tokens and now > self._t_log else None
        self._t_log, self._tokens_log = now, tokens
        self.link.publish(StepMetrics(
            run_id=self.run_id, step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
            loss=self.last_loss, learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_second=tps,
        ))

    # ---------------------------------------------------------------- step boundary
    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        for event, done in self.link.drain():
            try:
                if isinstance(event, Control):
                    self._apply_control(event, args, state, control, optimizer, lr_scheduler)
                elif isinstance(event, Feedback):
                    self._apply_feedback(event, state, control)
            finally:
                done()
        if self.link.stopping.is_set() and not control.should_training_stop:
            log.info("termination requested: saving and stopping at step %d", state.global_step)
            self.stop_reason = ("control", "service asked to stop (SIGTERM)")
            control.should_training_stop = True
        if control.should_training_stop:
            control.should_save = True  # the last step is always a checkpoint
        return control

    def _apply_control(self, event: Control, args, state, control, optimizer, scheduler) -> None:
        step = state.global_step
        try:
            outcome = controls.apply(self.run_state, event.command, event.value)
        except controls.Rejected as e:
            log.warning("control %s rejected at step %d: %s", event.command, step, e)
            self.link.publish(ControlRejected(run_id=self.run_id, control_id=event.event_id,
                                              command=event.command, step=step, reason=str(e)), wait=True)
            return
        if event.command == "set-lr":
            set_learning_rate(optimizer, scheduler, self.run_state.learning_rate)
        elif event.command == "set-grad-clip":
            args.max_grad_norm = self.run_state.max_grad_norm
        if outcome.stop:
            control.should_training_stop = True
            self.stop_reason = ("control", f"stop by {event.operator or event.source or 'operator'}")
        if outcome.save:
            control.should_save = True
        self.run_state.applied.append({"control_id": event.event_id, "command": event.command,
                                       "value": event.value, "step": step})
        log.info("control %s applied at step %d: %r -> %r", event.command, step, outcome.old, outcome.new)
        self.link.publish(ControlApplied(run_id=self.run_id, control_id=event.event_id, command=event.command,
                                         step=step, old=outcome.old, new=outcome.new), wait=True)

    def _apply_feedback(self, event: Feedback, state, control) -> None:
        log.info("feedback at step %d (verdict of step %d): %s, %s", state.global_step, event.step, event.action, event.reason)
        if event.action == "stop" and not control.should_training_stop:
            control.should_training_stop = True
            self.stop_reason = ("feedback", event.reason)

    # ---------------------------------------------------------------- checkpoints
    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        rel = str(path.resolve().relative_to(self.run_dir.resolve()))
        final = bool(control.should_training_stop) or state.global_step >= state.max_steps
        self.last_saved_step = state.global_step
        if final:
            self.final_checkpoint = rel
        self.link.publish(CheckpointSaved(
            run_id=self.run_id, step=state.global_step, path=rel, base_model=self.base_model,
            adapter=self.adapter, is_final=final, loss=self.last_loss,
        ), wait=True)
