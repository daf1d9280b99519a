"""What the run's TRL callbacks share beside TRL's own ``TrainerState``, and the small torch-side
helpers they use: one object, so that each callback keeps to its concern and the recipe reads
how the run ended in one place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop import controls
from tuneloop.checkpoints import folder, read_steering, write_steering
from tuneloop.events import DatasetReady
from tuneloop.storage import RunDir

from . import distributed
from .link import BusLink, FollowerLink
from .steering import Steerer


@dataclass
class LoopState:
    link: BusLink | FollowerLink
    run_id: str
    run_dir: Path
    steer: Steerer  # the steering state and every decision at the step boundary (pure)
    last_loss: float | None = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, while a guard watches (what `loss` reads)
    awaiting: dict[int, float] = field(default_factory=dict)  # step -> when announced for evaluation, until its feedback
    evaluate_next_save: bool = False  # an operator's `eval`: the next checkpoint is evaluated whatever the cadence
    final_checkpoint: str | None = None
    switch_to: DatasetReady | None = None  # set-data: the recipe continues on this data set
    rolled_back_to: int | None = None  # the savepoint step the loop resumes from after a rollback
    trackers: object = None  # run.report_to: tuneloop's records into TRL's trackers (trackers.TrackerLog)

    @property
    def run_state(self) -> controls.Steering:
        return self.steer.state

    @property
    def stop_reason(self) -> tuple[str, str] | None:
        return self.steer.stop_reason

    @property
    def pruned(self) -> bool:
        return self.stop_reason is not None and self.stop_reason[0] == "pruned"

    def expecting_verdicts(self, within_s: float = 60.0) -> bool:
        """Whether evaluations announced in the last ``within_s`` still lack their feedback."""
        now = time.monotonic()
        return any(now - t < within_s for t in self.awaiting.values())

    def checkpoint(self, args, step: int) -> str:
        """The run-relative folder of the checkpoint of ``step``."""
        return str(folder(args.output_dir, step).resolve().relative_to(self.run_dir.resolve()))

    def write_applied(self) -> None:
        """Rank 0: the applied-controls file, durable before a control is answered."""
        if distributed.rank() == 0:
            write_steering(RunDir(self.run_dir).applied, self.run_state)

    def rolled_back(self, state: controls.Steering, step: int) -> None:
        """Back to the savepoint of ``step`` with its ``state``: what was observed later belongs
        to discarded training."""
        self.steer.state, self.steer.rollback = state, None
        self.steer.forget_stop()
        self.losses = {s: v for s, v in self.losses.items() if s <= step}
        self.awaiting = {s: t for s, t in self.awaiting.items() if s <= step}
        self.switch_to, self.final_checkpoint = None, None
        self.rolled_back_to = step


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


def weights_checksum(model) -> float:
    """Sum of the trainable weights: equal on every rank unless the ranks drifted apart."""
    import torch

    with torch.no_grad():
        return round(float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad)), 6)
