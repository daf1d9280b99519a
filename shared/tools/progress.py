"""``Progress``: what the events of one run say about it, and the one rule for "is it over?".

The embedded runner, ``tuneloop watch`` and the sweep's trials all fold a run's events into
a ``Progress`` and ask its ``outcome``. What differs between them is only what they wait for
(the arguments), never the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..events import (CheckpointsReleased, ControlApplied, ControlRejected, DatasetReady, DeadLetter, EvalVerdict, Event,
                     ExportDone, StepMetrics, TrainingFinished)

# A dead letter of one of these means the run cannot finish: fail fast instead of waiting.
CRITICAL_KINDS = ("run.queued", "data.ready", "ckpt.saved", "train.done", "eval.request", "eval.shard")


@dataclass
class Progress:
    """A run as its events tell it.

    - ``suites``, ``wants_baseline``, ``wants_verdict``: which verdicts a complete run has
      (each declared test suite's, the starting model's, the exported model's on test);
    - ``wants_release``: a pruned run is over once its checkpoints are released;
    - ``interrupted_ends``: whether ``interrupted`` (a trainer stopped by SIGTERM) ends the run
      for this follower; for the others, its trainer resumes when started again.
    """

    run_id: str
    suites: int = 0
    wants_baseline: bool = False
    wants_verdict: bool = True
    wants_release: bool = False
    interrupted_ends: bool = True

    dataset: DatasetReady | None = None
    last_step: StepMetrics | None = None
    verdicts: list[EvalVerdict] = field(default_factory=list)  # during training, in order
    baseline: EvalVerdict | None = None  # the starting model on the test split (eval.baseline)
    final_verdict: EvalVerdict | None = None  # the exported model on the test split
    suite_verdicts: dict[str, EvalVerdict] = field(default_factory=dict)  # ... and on each test suite
    controls: list[Event] = field(default_factory=list)  # answers: ControlApplied / ControlRejected
    finished: TrainingFinished | None = None
    exported: ExportDone | None = None
    released: CheckpointsReleased | None = None
    fatal: str | None = None

    def update(self, ev: Event) -> None:
        if isinstance(ev, DatasetReady):
            self.dataset = ev
        elif isinstance(ev, StepMetrics):
            self.last_step = ev
        elif isinstance(ev, EvalVerdict):
            if ev.purpose == "baseline":
                self.baseline = ev
            elif ev.purpose == "final" and ev.split.startswith("suite:"):
                self.suite_verdicts[ev.split[len("suite:"):]] = ev
            elif ev.purpose == "final":
                self.final_verdict = ev
            else:
                self.verdicts.append(ev)
        elif isinstance(ev, (ControlApplied, ControlRejected)):
            self.controls.append(ev)
        elif isinstance(ev, TrainingFinished):
            if ev.reason != "interrupted" or self.interrupted_ends:
                self.finished = ev
        elif isinstance(ev, ExportDone):
            self.exported = ev
        elif isinstance(ev, CheckpointsReleased):
            self.released = ev
        elif isinstance(ev, DeadLetter) and any(ev.subject.endswith("." + k) for k in CRITICAL_KINDS):
            self.fatal = f"{ev.service} could not handle {ev.subject}: {ev.reason}"

    @property
    def outcome(self) -> str | None:
        """None while the run goes on; else ``failed``, ``pruned``, ``interrupted`` or ``complete``."""
        f = self.finished
        if self.fatal or (f and f.reason == "error"):
            return "failed"
        if f is None:
            return None
        if f.reason == "pruned":  # nothing will be exported
            return "pruned" if self.released or not self.wants_release else None
        if f.reason == "interrupted":
            return "interrupted"
        verdicts = ((self.final_verdict is not None or not self.wants_verdict) and len(self.suite_verdicts) >= self.suites
                    and (self.baseline is not None or not self.wants_baseline))
        return "complete" if self.exported is not None and verdicts else None

    @property
    def failure(self) -> str | None:
        """Why the run failed, when it did."""
        if self.fatal:
            return self.fatal
        return self.finished.detail if self.finished and self.finished.reason == "error" else None
