"""Backtesting the feedback policy on recorded events: the arithmetic and the settings' errors.
(That it gives back a real run's live decisions is shown on the example run, tests/e2e.)"""

from datetime import datetime, timedelta, timezone

import pytest

from tuneloop.config import FeedbackSection
from tuneloop.events import EvalVerdict, StepMetrics, TrainingFinished
from tuneloop.policy import PolicyState, decide
from tuneloop.tools.backtest import backtest, grid, parse_settings, row

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def recorded_run(scores: list[float], live: FeedbackSection, correctness: list[float] | None = None) -> list:
    """A run evaluated every 10 steps with ``scores``, decided live by ``live``, its stop
    applied 3 steps after the verdict that asked for it; a step a second."""
    events, state = [], PolicyState()
    for i, score in enumerate(scores):
        step = 10 * (i + 1)
        events += [StepMetrics(run_id="r", step=s, max_steps=500, loss=1.0, time=T0 + timedelta(seconds=s))
                   for s in range(step - 9, step + 1)]
        v = EvalVerdict(run_id="r", request_id=f"q{i}", step=step, checkpoint=f"c{step}", split="val",
                        purpose="periodic", cases=4,
                        scores={"protocol": score, "correctness": correctness[i] if correctness else 0.0})
        feedback = decide(live, state, v)
        events += [v, feedback]
        if feedback.action == "stop":
            end = step + 3
            events += [StepMetrics(run_id="r", step=s, max_steps=500, loss=1.0, time=T0 + timedelta(seconds=s))
                       for s in range(step + 1, end + 1)]
            return events + [TrainingFinished(run_id="r", step=end, reason="feedback", detail=feedback.reason)]
    raise AssertionError("the live settings never stopped")


def test_other_settings_stop_elsewhere_and_the_saving_counts_the_live_lag():
    live = FeedbackSection(metric="protocol", target=0.9, patience=2)
    events = recorded_run([0.2, 0.5, 0.4, 0.45, 0.3], live)  # live: no improvement twice after 20 -> stop at 40
    same = backtest(events, live, live)
    assert (same.live.stop_at, same.end_step, same.live_lag, same.steps_saved) == (40, 43, 3, 0)
    eager = backtest(events, live, parse_settings("patience=1", live))
    assert (eager.replayed.stop_at, eager.would_end, eager.steps_saved, eager.seconds_saved) == (30, 33, 10, 10.0)
    assert eager.replayed.best_step == 20 and eager.replayed.best_score == 0.5
    early = backtest(events, live, parse_settings("target=0.2", live))
    assert early.replayed.stop_at == 10 and early.replayed.decisions[0].reason.startswith("target reached")
    patient = backtest(events, live, parse_settings("patience=5", live))
    assert patient.replayed.stop_at is None and patient.would_end is None and patient.seconds_saved is None


def test_settings_are_checked_and_a_grid_tries_every_combination():
    base = FeedbackSection()
    assert [(s.patience, s.target) for s in grid("patience=1|2,target=0.5|0.9", base)] == [
        (1, 0.5), (1, 0.9), (2, 0.5), (2, 0.9)]
    with pytest.raises(ValueError, match="expected KEY=VALUE with KEY one of metric, target, patience, min_step"):
        parse_settings("patiense=2", base)
    with pytest.raises(ValueError, match="patience"):
        parse_settings("patience=0", base)
    with pytest.raises(ValueError, match="one value per setting"):
        parse_settings("patience=1|2", base)
    task = ["answer_line", "correct", "exact", "eval_loss", "perplexity"]  # a run's task: any of its metrics
    assert [s.metric for s in grid("metric=correct|eval_loss,target=0.5", base, task)] == ["correct", "eval_loss"]
    with pytest.raises(ValueError, match="metric: unknown metric 'protocol'; the task's metrics: answer_line, correct"):
        grid("metric=protocol", base, task)


def test_a_table_row_weighs_steps_saved_against_score_lost():
    live = FeedbackSection(metric="protocol", target=0.9, patience=2)
    events = recorded_run([0.2, 0.5, 0.4, 0.45, 0.3], live)
    eager = row(backtest(events, live, parse_settings("target=0.2", live)))  # stops at 10: exports 0.2, not 0.5
    assert (eager["steps saved"], eager["score lost"], eager["same as live"]) == ("+30", "protocol +0.300", "no")
    same = row(backtest(events, live, live))
    assert (same["steps saved"], same["score lost"], same["same as live"]) == ("+0", "protocol +0.000", "yes")
    assert row(backtest(events, live, parse_settings("patience=5", live)))["score lost"] == "-"  # past the recording


def test_score_lost_sets_a_metric_only_against_the_same_metric():
    # Live: stopped on correctness, exporting step 30 (protocol 0.6, correctness 0.5). Replayed on
    # protocol, it exports step 20 (protocol 0.9, correctness 0.3): each metric against itself.
    live = FeedbackSection(metric="correctness", target=0.5, patience=3)
    events = recorded_run([0.2, 0.9, 0.6], live, correctness=[0.1, 0.3, 0.5])
    other = row(backtest(events, live, parse_settings("metric=protocol,target=0.95,patience=1", live)))
    assert other["exports"] == "step 20 (0.900)"
    assert other["score lost"] == "protocol -0.300; correctness +0.200"


def test_the_old_rule_and_the_new_one_backtested_on_a_run_with_bounds():
    """confidence=0 replays point estimates (the rule before bounds): on the same verdicts it
    stops at a noisy dip that the bounds do not take for a plateau; a confidence the verdicts
    were not bounded at is refused."""
    live = FeedbackSection(metric="protocol", target=0.9, patience=2, confidence=0.8)
    events, state = [], PolicyState()
    for i, (score, lo, hi) in enumerate([(0.5, 0.35, 0.65), (0.47, 0.33, 0.62), (0.49, 0.35, 0.63),
                                         (0.6, 0.46, 0.73), (0.3, 0.2, 0.42), (0.28, 0.18, 0.4)]):
        step = 10 * (i + 1)
        events += [StepMetrics(run_id="r", step=s, max_steps=500, loss=1.0, time=T0 + timedelta(seconds=s))
                   for s in range(step - 9, step + 1)]
        v = EvalVerdict(run_id="r", request_id=f"q{i}", step=step, checkpoint=f"c{step}", split="val",
                        purpose="periodic", cases=48, scores={"protocol": score}, bounds={"protocol": [lo, hi]},
                        confidence=0.8)
        events += [v, decide(live, state, v)]
    with_bounds = backtest(events, live, live)
    assert with_bounds.replayed.stop_at == 60  # two verdicts surely below the best (0.6 at step 40)
    old = backtest(events, live, parse_settings("confidence=0", live))
    assert old.replayed.stop_at == 30  # 0.47 and 0.49 under 0.5: a plateau by point estimates
    with pytest.raises(ValueError, match="bounded at 0.8; replay at that confidence, or at 0"):
        backtest(events, live, parse_settings("confidence=0.95", live))
