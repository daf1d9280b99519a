"""The sweep pruner's backtest on a hand-made recording: time order, judging again when a trial
ends, what cannot be known, and the settings parsed with clear errors."""

from datetime import datetime, timedelta

import pytest

from tuneloop.tools.sweep import backtest
from tuneloop.tools.sweep.search import TrialRecord
from tuneloop.tools.sweep.spec import Pruner, SweepSpec

T0 = datetime(2026, 1, 1)


def at(seconds):
    return T0 + timedelta(seconds=seconds)


def spec(**pruner):
    return SweepSpec.model_validate({"name": "s", "config": "c.yaml", "params": {"train.learning_rate": {"values": [1, 2, 3, 4]}},
                                     "pruner": {"kind": "median", "startup_trials": 2, **pruner}})


def trial(n, state, values, ended, value=None, steps=30, pruned_at=None):
    record = TrialRecord(number=n, run_id=f"s-t{n:02d}", params={"train.learning_rate": n + 1}, state=state,
                         values=dict(values), value=value, steps=steps, pruned_at=pruned_at)
    verdicts = [(at(t), step, score) for t, (step, score) in zip(range(n * 100, n * 100 + 10 * len(values), 10), values)]
    sent = verdicts[-1][0] + timedelta(seconds=1) if state == "pruned" else None  # the prune follows its verdict
    return backtest.Trace(record, verdicts, at(ended) if ended is not None else None, sent)


def recording():
    """Two good trials complete; a third falls behind at step 10 and was pruned live there."""
    return [
        trial(0, "complete", [(10, 0.8), (20, 0.9), (30, 0.95)], 30, value=0.95),
        trial(1, "complete", [(10, 0.7), (20, 0.85), (30, 0.9)], 130, value=0.9),
        trial(2, "pruned", [(10, 0.1)], 210, steps=12, pruned_at=12),
    ]


def test_the_sweeps_own_pruner_gives_back_the_live_prunes_and_none_prunes_nothing():
    traces = recording()
    records = [t.record for t in traces]
    assert backtest.live_prunes(traces) == {2: 10}
    own, none = backtest.compare(spec(), records, traces, [spec().pruner, Pruner(kind="none")])
    assert own.same_as_live and own.replay.pruned == [2] and own.steps_saved == 0 and own.winner_survives
    assert own.replay.winner() == 0
    assert none.replay.pruned == [] and none.unknown and none.steps_saved is None  # trial 2 past the recording
    assert not none.same_as_live and none.replay.fates[2].unknown


def test_the_live_decision_is_the_recorded_one_when_the_sweep_was_down_before_sending_it():
    """Killed after trial 2's verdict at 10, the sweep came back, judged it at 10 and sent the
    prune; a verdict at 20 was published meanwhile, before the prune: the record, not the clock,
    says where the sweep decided, and the replay with its own pruner agrees."""
    traces = recording()
    t = traces[2]
    t.verdicts.append((t.verdicts[0][0] + timedelta(seconds=0.5), 20, 0.1))
    assert backtest.live_prunes(traces) == {2: 20}  # what the clock alone would say
    t.record.judged_at = 10
    assert backtest.live_prunes(traces) == {2: 10}
    own, = backtest.compare(spec(), [x.record for x in traces], traces, [spec().pruner])
    assert own.same_as_live and own.replay.fates[2].pruned_at == 10


def test_a_trial_is_judged_again_when_another_ends_as_the_driver_does():
    """Trial 2 reports before the others complete: nothing to compare with then; when the second
    one ends, it is judged again at its last step and pruned."""
    traces = [trial(0, "complete", [(10, 0.8)], 15, value=0.8), trial(1, "complete", [(10, 0.9)], 500, value=0.9),
              backtest.Trace(TrialRecord(number=2, run_id="s-t02", params={"train.learning_rate": 3}, state="pruned",
                                         values={10: 0.1}, steps=14, pruned_at=14), [(at(20), 10, 0.1)], at(600))]
    out = backtest.run_pruner(spec(), spec().pruner, traces)
    assert out.pruned == [2] and out.fates[2].pruned_at == 10
    late = backtest.run_pruner(spec(), Pruner(kind="median", startup_trials=2, warmup_steps=20), traces)
    assert late.pruned == []  # warm-up past its only verdict


def test_pruner_settings_are_parsed_with_clear_errors():
    base = spec().pruner
    tries = backtest.parse_pruners("percentile:25|median|none", base, warmup_steps=50)
    assert [(p.kind, p.warmup_steps) for p in tries] == [("percentile", 50), ("median", 50), ("none", 50)]
    assert tries[0].percentile == 25 and backtest.describe(tries[0]) == "percentile:25 (warm-up 50, start-up 2)"
    assert backtest.parse_pruners("", base) == [base]
    with pytest.raises(ValueError, match="only percentile takes a value"):
        backtest.parse_pruners("median:3", base)
    with pytest.raises(ValueError, match="pruner 'best'"):
        backtest.parse_pruners("best", base)


def test_a_trial_is_pruned_only_when_even_its_upper_bound_is_behind():
    """A verdict of 0.1 whose bound reaches 0.95 may be as good as the completed trials (their
    median at step 10 is 0.75): the pruner keeps it. With the bound closed at 0.3 it is pruned."""
    def third(bound):
        record = TrialRecord(number=2, run_id="s-t02", params={"train.learning_rate": 3}, state="running",
                             values={10: 0.1}, bounds={10: bound}, steps=12)
        return backtest.Trace(record, [(at(210), 10, 0.1)], None)

    kept = backtest.run_pruner(spec(), spec().pruner, recording()[:2] + [third([0.02, 0.95])])
    assert kept.pruned == []
    pruned = backtest.run_pruner(spec(), spec().pruner, recording()[:2] + [third([0.02, 0.3])])
    assert pruned.pruned == [2] and pruned.fates[2].pruned_at == 10


def test_no_trial_is_pruned_at_its_final_report():
    """Trial 2 is ahead of the completed trials' median at steps 10 and 20 and falls behind
    (its best, 0.88, under their 0.925) only at step 30, its last (budget 30): there is nothing left to save,
    and its test score, not the pruner, says what it is worth. With a budget of 40 it is pruned."""
    def third(budget):
        record = TrialRecord(number=2, run_id="s-t02", params={"train.learning_rate": 3}, state="complete",
                             values={10: 0.76, 20: 0.88, 30: 0.1}, value=0.5, steps=30, budget=budget)
        return backtest.Trace(record, [(at(210), 10, 0.76), (at(220), 20, 0.88), (at(230), 30, 0.1)], at(240))

    assert backtest.run_pruner(spec(), spec().pruner, recording()[:2] + [third(30)]).pruned == []
    assert backtest.run_pruner(spec(), spec().pruner, recording()[:2] + [third(40)]).pruned == [2]
