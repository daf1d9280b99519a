"""The step boundary, decided in one pure place.

Given what arrived during a step (a control, feedback, a proposal decision, rank 0's judgement
of a verdict against the guard under watch, a proposal past its deadline) and the step's
context (``Boundary``), ``Steerer`` updates the run's steering state and returns ``Effects``:
the answer to publish, anything else to publish, and what the training loop must do (set the
learning rate, save, stop with a reason, switch data, roll back). ``SteeringCallback`` carries
them out: the optimizer, TRL's control flags, the link to the bus, the files. Decide vs do: this
module touches no torch, no bus and no file, so every rule here is unit-tested without
training (tests/unit/test_steering.py).
"""

from __future__ import annotations

import copy
import logging

from tuneloop import controls
from tuneloop.config import FeedbackSection
from tuneloop.controls import AppliedControl
from tuneloop.events import (Control, ControlApplied, ControlConfirmed, ControlRejected, Feedback, Proposal,
                             ProposalDecision, derived_id)

from . import approvals, rollback
from .effects import Boundary, Effects

log = logging.getLogger(__name__)


class Steerer:
    """The run's steering: its state (``controls.Steering``, saved with every checkpoint) and
    the decisions at each step boundary."""

    def __init__(self, run_id: str, state: controls.Steering, gates: FeedbackSection | None = None,
                 categories: frozenset[str] = frozenset(), metrics: list[str] | None = None):
        self.run_id = run_id
        self.metrics = metrics  # the task's: what a guard may name (None: any)
        self.state = state
        self.gates = gates or FeedbackSection()  # feedback.approve: what waits for an operator
        self.categories = categories  # of the data set: what a guard may name
        self.stop_reason: tuple[str, str] | None = None  # (reason, detail) once the run is stopping
        self.deferred: Control | None = None  # a guarded control, until its savepoint is saved
        self.rollback: rollback.Rollback | None = None  # a broken guard, until the recipe rolled back

    # ---------------------------------------------------------------- dispatch
    def decide(self, event, at: Boundary) -> Effects:
        """The effects of one event that arrived during the step ending at ``at``."""
        if isinstance(event, Control):
            return self.control(event, at)
        if isinstance(event, Feedback):
            return self.feedback(event, at)
        if isinstance(event, rollback.Judged):
            return self.judged(event, at)
        if isinstance(event, ProposalDecision):
            approve = event.decision == "approve"
            return approvals.resolve(self, event.proposal_id, approve, "approved" if approve else "rejected",
                                     event.operator or event.source, event.reason, at, event.event_id)
        if isinstance(event, approvals.TimedOut):
            return approvals.resolve(self, event.proposal_id, self.gates.on_timeout == "apply", "timed-out", "timeout",
                                     f"nobody answered within {self.gates.approve_timeout_s:g}s: {self.gates.on_timeout}",
                                     at)
        return Effects()

    @property
    def stopping(self) -> str | None:
        return self.stop_reason[0] if self.stop_reason else None

    # ---------------------------------------------------------------- controls
    def control(self, event: Control, at: Boundary) -> Effects:
        """Apply ``event``, refuse it, hold it for its savepoint, or propose it."""
        rs = self.state
        done = next((a for a in rs.applied + rs.rolled_back if a.control_id == event.event_id), None)
        if done is not None:  # redelivered after a restart: answered again (the same event id), not applied twice
            log.info("control %s already applied at step %d (redelivered after a restart)", event.event_id, done.step)
            return Effects(answer=ControlApplied(run_id=self.run_id, event_id=derived_id("applied", event.event_id),
                                                 control_id=event.event_id, command=event.command, step=done.step,
                                                 new=done.value))
        if (held := rs.proposals.get(approvals.proposal_id(event.event_id))) is not None:
            return Effects(answer=Proposal.model_validate(held.proposal))  # redelivered: the same proposal, still open
        try:
            if event.policy and approvals.gated(self.gates, event.command):
                self._dry_run(event, at)  # a proposal that could never apply is refused now
                return approvals.propose(self, approvals.for_control(self.gates, event, at.step), event, at)
            watching = rs.guard or (rollback.watch_record(self.deferred, "", at.step, False) if self.deferred else None)
            if controls.check_guard(event.command, event.guard, event.within, self.categories, watching,
                                    self.metrics) is not None:
                self._dry_run(event, at)
                self.deferred = event
                log.info("guarded %s at step %d: saving the savepoint first", event.command, at.step)
                return Effects(deferred=True, save=True)  # the savepoint; the control is applied after it
            return self.apply(event, at)
        except controls.Rejected as e:
            return self._rejected(event, at, e)

    def apply(self, event: Control, at: Boundary) -> Effects:
        """Apply ``event`` now; ``controls.Rejected`` says why it cannot be."""
        rs = self.state
        outcome = controls.apply(rs, event.command, event.value, at.datasets, stopping=self.stopping,
                                 who=event.operator or event.source or "operator")
        fx = Effects(applied=True, set_lr=outcome.set_lr, save=outcome.save, evaluate_next_save=outcome.evaluate,
                     write_steering=True)
        if outcome.stop:
            fx.stop = True
            self.stop_reason = outcome.stop_reason
        if outcome.switch_data and not fx.stop and not at.loop_stopping:
            fx.switch_data = rs.dataset_id  # the recipe goes on with the new data from this checkpoint
            fx.stop = True
        rs.applied.append(AppliedControl(control_id=event.event_id, command=event.command, value=event.value,
                                         step=at.step))
        log.info("control %s applied at step %d: %r -> %r", event.command, at.step, outcome.old, outcome.new)
        fx.answer = ControlApplied(run_id=self.run_id, event_id=derived_id("applied", event.event_id),
                                   control_id=event.event_id, command=event.command, step=at.step, old=outcome.old,
                                   new=outcome.new)
        return fx

    def at_savepoint(self, savepoint: str, at: Boundary, ignore_data_skip: bool) -> Effects:
        """The deferred guarded control, now that its savepoint (``savepoint``, run-relative) is
        saved: applied and watched from here, or refused if the run changed since it was checked."""
        event, self.deferred = self.deferred, None
        try:
            fx = self.apply(event, at)
        except controls.Rejected as e:  # e.g. the run is stopping now
            return self._rejected(event, at, e)
        self.state.guard = rollback.watch_record(event, savepoint, at.step, ignore_data_skip)
        fx.answer = fx.answer.model_copy(update={"guard": event.guard, "within": event.within or 1,
                                                 "savepoint_step": at.step})
        return fx

    def _rejected(self, event: Control, at: Boundary, e: controls.Rejected) -> Effects:
        log.warning("control %s rejected at step %d: %s", event.command, at.step, e)
        return Effects(answer=ControlRejected(run_id=self.run_id, event_id=derived_id("rejected", event.event_id),
                                              control_id=event.event_id, command=event.command, step=at.step,
                                              reason=str(e)))

    def _dry_run(self, event: Control, at: Boundary) -> None:
        """Raise Rejected if ``event`` would be rejected now (its value, the run's state)."""
        controls.apply(copy.deepcopy(self.state), event.command, event.value, at.datasets, stopping=self.stopping)

    # ---------------------------------------------------------------- feedback
    def stale(self, fb: Feedback) -> bool:
        """Feedback on a checkpoint a rollback discarded (its evaluation was under way)."""
        return fb.request_id is not None and fb.request_id in self.state.discarded_requests

    def feedback(self, event: Feedback, at: Boundary) -> Effects:
        if self.stale(event):
            log.info("feedback on step %d ignored: its checkpoint was discarded by a rollback", event.step)
            return Effects()
        log.info("feedback at step %d (verdict of step %d): %s, %s", at.step, event.step, event.action, event.reason)
        if event.action != "stop" or self.stop_reason is not None:
            return Effects()
        if approvals.gated(self.gates, "stop"):
            if any(p.command == "stop" for p in self.state.proposals.values()):
                return Effects()  # one stop proposal at a time: the open one stands for this verdict too
            return approvals.propose(self, approvals.for_feedback(self.gates, event, at.step), None, at)
        self.stop_reason = ("feedback", event.reason)
        return Effects(stop=True)

    # ---------------------------------------------------------------- guards
    def judgements(self, events, losses: dict[int, float], now: float) -> list:
        """Rank 0: the guard's judgement of each new verdict, and each proposal past its deadline."""
        out: list = []
        watch = self.state.guard
        for e in events:
            if isinstance(e, Feedback) and watch is not None and not self.stale(e):
                if (j := rollback.judge(watch, e, losses)) is not None:
                    out.append(j)
        out += [approvals.TimedOut(pid) for pid in approvals.expired(self.state.proposals, now)]
        return out

    def judged(self, j: rollback.Judged, at: Boundary) -> Effects:
        watch = self.state.guard
        if watch is None or self.rollback is not None:
            return Effects()
        if not j.held:
            if self.stop_reason is not None:
                log.warning("guard %r broken at step %d, but the run is stopping (%s): no rollback", watch.guard,
                            j.step, self.stop_reason[0])
                return Effects()
            self.rollback = rollback.Rollback(watch, j, at.step)
            return Effects(rollback=self.rollback, stop=True)  # the recipe resumes from the savepoint
        watch.held.append(j.step)
        log.info("guard %r held on the verdict of step %d (%d of %d): %s", watch.guard, j.step, len(watch.held),
                 watch.within, j.metrics)
        fx = Effects(write_steering=True)
        if len(watch.held) >= watch.within:
            self.state.guard = None
            fx.publish.append(ControlConfirmed(
                run_id=self.run_id, event_id=derived_id("confirmed", watch.control_id),
                control_id=watch.control_id, command=watch.command, guard=watch.guard, step=at.step,
                savepoint_step=watch.savepoint_step, verdict_steps=list(watch.held)))
        return fx

    def forget_stop(self) -> None:
        """After a rollback: the stop that ended the discarded training is void."""
        self.stop_reason = None

    # ---------------------------------------------------------------- stops of the loop's own
    def terminate(self) -> Effects:
        """The service was asked to stop (SIGTERM): save this step and stop; it resumes here."""
        if self.stop_reason is None:
            self.stop_reason = ("interrupted", "service asked to stop (SIGTERM); resumes from this checkpoint")
        return Effects(stop=True)

    def resumed(self, restored: list[AppliedControl]) -> bool:
        """Controls answered after the checkpoint this run resumes from: a stop or prune among
        them still holds, so the run ends at its first step. Whether it does."""
        for a in restored:
            if a.command in ("stop", "prune") and self.stop_reason is None:
                self.stop_reason = ("pruned" if a.command == "prune" else "control",
                                    f"{a.command} applied at step {a.step} before a restart")
                return True
        return False

    def at_barrier(self, step: int, max_steps: int, every: int | None, loop_stopping: bool) -> bool:
        """A PBT member pauses after the checkpoint of each barrier (every ``every`` steps, not
        at its last) until its sweep resumes it, as by a ``pause`` control. Whether it does now."""
        if every is None or step % every or step >= max_steps or loop_stopping or self.state.paused:
            return False
        self.state.paused = True
        return True
