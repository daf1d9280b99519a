"""Guarded interventions, the trainer's part: watch the verdicts after a guarded control, and
go back to its savepoint when one breaks the guard.

The flow (``SteeringCallback`` and the recipe call these):
1. A control with ``--guard`` arrives: the callback asks for a checkpoint first (the
   savepoint) and applies the control in ``on_save``, once the savepoint is on disk.
2. ``watch_record`` is what the run remembers of it, in ``Steering.guard`` (saved in every
   checkpoint, so a restarted trainer keeps watching).
3. Each feedback on a later checkpoint is ``judge``d by rank 0 (the same judgement is
   broadcast to every rank); ``within`` held verdicts confirm it.
4. A broken guard stops the training loop without saving; the recipe calls ``roll_back``,
   which deletes the discarded checkpoints and returns the savepoint's steering; the recipe
   resumes from it: weights, optimizer, schedule, RNG and data position come back with it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuneloop.checkpoints import all_checkpoints, read_state, write_steering
from tuneloop.controls import GuardWatch
from tuneloop.events import Control, ControlRolledBack, Feedback, derived_id
from tuneloop.guard import metrics_of, parse
from tuneloop.storage import RunDir

from . import distributed

log = logging.getLogger(__name__)


@dataclass
class Judged:
    """Rank 0's judgement of one verdict against the guard under watch (broadcast to every rank)."""

    step: int
    verdict_id: str | None
    metrics: dict[str, float]
    held: bool


@dataclass
class Rollback:
    """A broken guard: what the recipe rolls back, and why."""

    watch: GuardWatch
    judged: Judged
    step: int


def watch_record(event: Control, savepoint: str, savepoint_step: int, ignore_data_skip: bool) -> GuardWatch:
    """What the run keeps of a guarded control while it is under watch (in ``Steering``)."""
    return GuardWatch(control_id=event.event_id, command=event.command, value=event.value, guard=event.guard,
                      within=event.within or 1, applied_step=savepoint_step, savepoint=savepoint,
                      savepoint_step=savepoint_step, ignore_data_skip=ignore_data_skip)


def loss_window(watch: GuardWatch) -> int:
    """The steps whose training loss can tell of the change: those after the returned one.
    The loss logged at step s is measured on the weights of step s - 1, so the first loss the
    change shows is two steps after the savepoint; after a verdict that held, the steps since it."""
    return max([watch.applied_step + 1, *watch.held])


def mean_loss(losses: dict[int, float], after: int, step: int) -> float | None:
    """The mean training loss logged in steps ``after < s <= step``; None when none was. A mean,
    not one batch's loss: a single batch is noise of the size of the changes a guard catches."""
    window = [v for s, v in losses.items() if after < s <= step]
    return sum(window) / len(window) if window else None


def judge(watch: GuardWatch, feedback: Feedback, losses: dict[int, float]) -> Judged | None:
    """The guard's judgement of ``feedback``'s verdict; None for a verdict it does not count: of
    a checkpoint from before the change, or lacking a metric the guard reads (as ``loss`` on a
    checkpoint saved before any logged step could show the change). The guard waits for the next."""
    if feedback.step <= watch.applied_step:
        return None
    guard = parse(watch.guard)
    after = loss_window(watch)
    metrics = metrics_of(feedback.scores, feedback.by_category, feedback.mean_new_tokens,
                         mean_loss(losses, after, feedback.step))
    if missing := guard.missing(metrics):
        log.warning("verdict of step %d lacks %s (the training loss counts from step %d on): guard %r waits for "
                    "the next verdict", feedback.step, sorted(missing), after + 1, watch.guard)
        return None
    return Judged(feedback.step, feedback.verdict_id, metrics, guard.holds(metrics, feedback.bounds))


def discard_after(run_dir: Path, step: int) -> list[int]:
    """Delete the checkpoints and evaluation snapshots saved after ``step`` (rank 0): training
    goes on from the savepoint and will save those steps again."""
    gone = []
    rd = RunDir(run_dir)
    for s, path in all_checkpoints(rd.checkpoints).items():
        if s > step:
            shutil.rmtree(path)
            gone.append(s)
    for s, path in rd.snapshot_folders().items():
        if s > step:
            shutil.rmtree(path, ignore_errors=True)
    return sorted(gone)


@dataclass
class RolledBack:
    """What a rollback leaves for the loop: the savepoint's steering (what was undone since
    recorded in it), the savepoint to resume from and the data set in force there."""

    state: object  # controls.Steering
    savepoint: Path
    step: int
    dataset: object
    ignore_data_skip: bool


def roll_back(plan: Rollback, before, run_dir: Path, datasets: dict, link, run_id: str) -> RolledBack:
    """Undo a broken guard's control (``plan``, from the steering state ``before``). Every rank
    calls it; rank 0 deletes, writes and publishes. The caller carries the result into its loop."""
    watch = plan.watch
    savepoint = run_dir / watch.savepoint
    if distributed.rank() == 0:
        gone = discard_after(run_dir, watch.savepoint_step)
        log.info("deleted the checkpoints after the savepoint: steps %s", gone)
    distributed.broadcast(None)  # barrier: nobody reads checkpoints while they go
    state = read_state(savepoint)  # the controls in force at the savepoint
    kept = state.applied_ids()
    undone = [a for a in before.applied if a.control_id not in kept]
    state.rolled_back = [*before.rolled_back, *(dataclasses.replace(a, rolled_back_at=plan.step) for a in undone)]
    state.discarded_requests = [*before.discarded_requests, *(derived_id("eval", s) for s in watch.saves)]
    state.proposals = before.proposals  # what waits for an operator still does
    state.guard = None
    if distributed.rank() == 0:
        write_steering(RunDir(run_dir).applied, state)
        link.publish(ControlRolledBack(
            run_id=run_id, event_id=derived_id("rolledback", watch.control_id),
            control_id=watch.control_id, command=watch.command, value=watch.value, guard=watch.guard,
            step=plan.step, savepoint_step=watch.savepoint_step,
            discarded_steps=[watch.savepoint_step + 1, plan.step] if plan.step > watch.savepoint_step else [],
            verdict_step=plan.judged.step, verdict_id=plan.judged.verdict_id, metrics=plan.judged.metrics,
            reverted=[a.control_id for a in undone if a.control_id != watch.control_id],
            discarded_saves=list(watch.saves),
        ), now=True)
    log.warning("rank %d rolls back %s (guard %r broken by the verdict of step %d: %s) from step %d to the savepoint, "
                "step %d", distributed.rank(), watch.command, watch.guard, plan.judged.step, plan.judged.metrics,
                plan.step, watch.savepoint_step)
    dataset = datasets.get(state.dataset_id)
    if dataset is None:
        raise RuntimeError(f"the savepoint trains on data set {state.dataset_id!r}, which this trainer never saw")
    return RolledBack(state, savepoint, watch.savepoint_step, dataset, watch.ignore_data_skip)
