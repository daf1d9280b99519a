"""``SteeringCallback``: the step boundary carried out. What arrived during the step (controls,
feedback, proposal decisions, rank 0's judgements of verdicts against a guard) is decided by
the ``Steerer`` (steering.py: pure, every rule there); here its effects are mapped onto the
optimizer, TRL's ``TrainerControl`` and the files, in one place, and its answers published.

With several processes every rank runs it; rank 0's events are broadcast at the step boundary
so every rank applies the same ones, and only rank 0 speaks on the bus."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from tuneloop import controls
from tuneloop.events import Control, Feedback, StepMetrics

from . import distributed
from .loop_state import LoopState, set_learning_rate, sync_args, weights_checksum
from .effects import Boundary, Effects

log = logging.getLogger(__name__)
PAUSE_POLL_S = 2.0


def _noop() -> None:
    pass


class SteeringCallback(TrainerCallback):
    def __init__(self, loop: LoopState):
        self.loop = loop
        self.deferred_ack = None  # a guarded control's acknowledgement, until its savepoint is saved
        # Controls answered after the checkpoint this run resumes from (see loop_state.durable_state).
        self.restored: list[controls.AppliedControl] | None = None
        self.stop_at_first_step = False
        self._last_pause_note = 0.0

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, model=None, **kwargs):
        loop = self.loop
        if loop.rolled_back_to is not None and model is not None:  # every rank says what it resumed with
            log.warning("rank %d resumed from the savepoint at step %d: weights checksum %s", distributed.rank(),
                        loop.rolled_back_to, weights_checksum(model))
            loop.rolled_back_to = None
        if self.restored is not None:  # controls answered after the checkpoint: they hold from this step on
            rs = loop.run_state
            current = optimizer.param_groups[0]["lr"] if optimizer is not None else None
            if current is not None and abs(current - rs.learning_rate) > 1e-12 * max(abs(current), 1.0):
                set_learning_rate(optimizer, lr_scheduler, rs.learning_rate)
            sync_args(args, rs)
            state.save_steps, state.logging_steps = rs.save_steps, rs.logging_steps
            self.stop_at_first_step = loop.steer.resumed(self.restored)
            log.info("holding %d control(s) answered after the last checkpoint: %s", len(self.restored),
                     [a.command for a in self.restored])
            self.restored = None

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.stop_at_first_step:
            self.stop_at_first_step = False
            control.should_training_stop = True
        items, stopping = self.exchange()
        self.handle(items, args, state, control, optimizer, lr_scheduler)
        stopping = self.hold(args, state, control, optimizer, lr_scheduler, stopping)
        if stopping and self.loop.stop_reason is None:
            log.info("termination requested: saving and stopping at step %d", state.global_step)
            self.carry_out(self.loop.steer.terminate(), args, state, control, optimizer, lr_scheduler)
        if self.loop.steer.rollback is not None:
            control.should_save = False  # these weights are discarded
        elif control.should_training_stop and not self.loop.pruned:
            control.should_save = True  # the last step is always a checkpoint (a pruned run's are released)
        return control

    def on_save(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """This checkpoint is a guarded control's savepoint (announced already): now the control."""
        if self.loop.steer.deferred is None:
            return
        ack, self.deferred_ack = self.deferred_ack, None
        fx = self.loop.steer.at_savepoint(self.loop.checkpoint(args, state.global_step), self.boundary(state, control),
                                          args.ignore_data_skip)
        self.carry_out(fx, args, state, control, optimizer, lr_scheduler)
        self.loop.link.publish(fx.answer, then=ack)

    def hold(self, args, state, control, optimizer, scheduler, stopping: bool = False) -> bool:
        """While paused: metrics keep saying so, controls are still answered (resume, stop,
        prune). Returns whether the service was asked to stop meanwhile."""
        while self.loop.run_state.paused and not control.should_training_stop and not stopping:
            self._publish_paused(state)
            items, stopping = self.exchange(PAUSE_POLL_S)
            self.handle(items, args, state, control, optimizer, scheduler)
        return stopping

    def exchange(self, wait_s: float = 0.0):
        """(events, stop requested) for this boundary, the same on every rank: rank 0's, broadcast."""
        link, steer = self.loop.link, self.loop.steer
        items = link.wait(wait_s) if wait_s else link.drain()
        stopping = link.stopping.is_set()
        if distributed.rank() == 0:  # judgements and deadlines: rank 0's clock and losses decide for all
            items = items + [(j, _noop) for j in steer.judgements([e for e, _ in items], self.loop.losses, time.time())]
        if distributed.world_size() == 1:
            return items, stopping
        events = [e for e, _ in items]
        wanted = {e.value for e in events if isinstance(e, Control) and e.command == "set-data"}
        for e in events:  # a proposal answered now may hold a set-data
            held = steer.state.proposals.get(getattr(e, "proposal_id", None) or "")
            if held and held.control and held.control["command"] == "set-data":
                wanted.add(held.control["value"])
        datasets = {k: v for k, v in link.datasets.items() if k in wanted}
        events, stopping, datasets = distributed.broadcast((events, stopping, datasets))
        link.datasets.update(datasets)
        return (items if distributed.rank() == 0 else [(e, _noop) for e in events]), stopping

    def boundary(self, state, control) -> Boundary:
        return Boundary(step=state.global_step, datasets=frozenset(self.loop.link.datasets), now=time.time(),
                        loop_stopping=bool(control.should_training_stop))

    def handle(self, items, args, state, control, optimizer, scheduler) -> None:
        """Decide each event (the steerer), carry out its effects, answer it."""
        loop = self.loop
        for event, done in items:
            fx = None
            try:
                if isinstance(event, Feedback) and not loop.steer.stale(event):
                    loop.awaiting.pop(event.step, None)
                fx = loop.steer.decide(event, self.boundary(state, control))
                self.carry_out(fx, args, state, control, optimizer, scheduler)
                if loop.trackers is not None:
                    loop.trackers.seen(event, fx.answer)
            finally:
                if fx is not None and fx.deferred:
                    self.deferred_ack = done  # acknowledged with its answer, after the savepoint
                elif fx is None or fx.answer is None:
                    done()
                else:  # the event is acknowledged once its answer is stored: a crash before redelivers it
                    loop.link.publish(fx.answer, then=done)

    def carry_out(self, fx: Effects, args, state, control, optimizer, scheduler) -> None:
        """Do what a decision asks: the optimizer, TRL's flags, the files; publish what it says."""
        loop = self.loop
        rs = loop.run_state
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
            loop.switch_to = loop.link.datasets[fx.switch_data]
        loop.evaluate_next_save |= fx.evaluate_next_save
        if fx.write_steering:  # durable before it is answered: a crash now does not undo it
            loop.write_applied()
        for event in fx.publish:
            loop.link.publish(event)
        if rs.guard is None and loop.steer.deferred is None:
            loop.losses.clear()  # no guard watches (confirmed, or none): no loss to judge it by

    def _publish_paused(self, state) -> None:
        now = time.monotonic()
        if now - self._last_pause_note >= PAUSE_POLL_S:
            self._last_pause_note = now
            self.loop.link.publish(StepMetrics(run_id=self.loop.run_id, step=state.global_step, max_steps=state.max_steps,
                                               learning_rate=self.loop.run_state.learning_rate, paused=True))


class BarrierCallback(TrainerCallback):
    """A PBT member waits after each barrier's checkpoint for its sweep to compare it with the
    others: paused as by a ``pause`` control (the Steerer decides), until ``resume`` (or
    ``prune``: copied over). Stopped while it waits, this checkpoint is its last."""

    def __init__(self, steering: SteeringCallback, every: int):
        self.steering, self.every = steering, every

    def on_save(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        loop = self.steering.loop
        if not loop.steer.at_barrier(state.global_step, state.max_steps, self.every, bool(control.should_training_stop)):
            return
        log.info("step %d: paused at the sweep's barrier until resumed", state.global_step)
        if self.steering.hold(args, state, control, optimizer, lr_scheduler):
            loop.steer.terminate()
            control.should_training_stop = True
        if control.should_training_stop:
            loop.final_checkpoint = loop.checkpoint(args, state.global_step)
