"""``Progress``: the one rule that says a run is over, as the runner, watch and a sweep ask it."""

from tuneloop.events import (CheckpointsReleased, DeadLetter, EvalVerdict, ExportDone, TrainingFinished)
from tuneloop.tools.progress import Progress


def done(reason: str) -> TrainingFinished:
    return TrainingFinished(run_id="r", step=40, reason=reason, detail="why")


def verdict(purpose: str, split: str = "test") -> EvalVerdict:
    return EvalVerdict(run_id="r", request_id="q", step=40, checkpoint="c", split=split, purpose=purpose, cases=3,
                       scores={"protocol": 1.0, "correctness": 0.5})


EXPORTED = ExportDone(run_id="r", step=40, score=1.0, adapter_path="export/adapter")


def test_a_run_is_complete_once_exported_with_every_verdict_it_waits_for():
    p = Progress("r", suites=1, wants_baseline=True)
    for ev in (done("completed"), EXPORTED, verdict("final")):
        p.update(ev)
        assert p.outcome is None
    p.update(verdict("final", "suite:format"))
    assert p.outcome is None  # the baseline is still to come
    p.update(verdict("baseline"))
    assert p.outcome == "complete" and p.suite_verdicts.keys() == {"format"}


def test_watch_stops_at_the_export_and_keeps_watching_an_interrupted_run():
    p = Progress("r", wants_verdict=False, interrupted_ends=False)
    p.update(done("interrupted"))
    assert p.outcome is None and p.finished is None  # its trainer resumes when started again
    p.update(done("feedback"))
    p.update(EXPORTED)
    assert p.outcome == "complete"


def test_the_runner_ends_on_an_interruption_and_a_sweep_waits_for_a_pruned_runs_release():
    runner = Progress("r")
    runner.update(done("interrupted"))
    assert runner.outcome == "interrupted"
    trial = Progress("r", wants_release=True, interrupted_ends=False)
    trial.update(done("pruned"))
    assert trial.outcome is None
    trial.update(CheckpointsReleased(run_id="r", steps=[20, 40], bytes=10, reason="pruned"))
    assert trial.outcome == "pruned"


def test_an_error_or_a_dead_letter_on_the_runs_path_fails_it_with_the_reason():
    p = Progress("r")
    p.update(DeadLetter(run_id="r", subject="tuneloop.r.train.step", reason="bad", payload="", service="x"))
    assert p.outcome is None  # a lost metric does not stop a run
    p.update(DeadLetter(run_id="r", subject="tuneloop.r.ckpt.saved", reason="no such folder", payload="", service="checkpoint"))
    assert p.outcome == "failed" and "checkpoint could not handle tuneloop.r.ckpt.saved: no such folder" == p.failure
    q = Progress("r")
    q.update(done("error"))
    assert q.outcome == "failed" and q.failure == "why"
