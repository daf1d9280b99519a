"""Guards of guarded controls: the grammar, its errors, what a verdict makes of them, and which
controls may carry one."""

import dataclasses
import math

import pytest

from tuneloop import controls
from tuneloop.events import Feedback
from tuneloop.guard import GuardError, metrics_of, parse

METRICS = ["protocol", "correctness", "exact", "eval_loss", "perplexity"]  # the example task's
VERDICT = metrics_of({"protocol": 0.92, "correctness": 0.5}, {"greet": {"protocol": 1.0, "correctness": 0.25}},
                     tokens=14.0, loss=2.5)


@pytest.mark.parametrize("text, holds", [
    ("protocol>=0.9", True),
    ("protocol >= 0.95", False),
    ("protocol>=0.9 and loss<3", True),
    ("protocol>=0.9 and loss<2", False),
    ("protocol>=0.95 or loss<3", True),
    ("(protocol>=0.95 or correctness>0.4) and greet.protocol==1", True),
    ("greet.correctness > 0.3", False),
    ("tokens<=14 and correctness!=0", True),
    ("loss < 1e1", True),
])
def test_a_guard_reads_the_verdict_and_the_loss(text, holds):
    assert parse(text).holds(VERDICT) is holds


def test_nan_breaks_every_comparison():
    diverged = metrics_of({"protocol": 1.0}, {}, None, math.nan)
    assert not parse("loss<100").holds(diverged)
    assert not parse("loss>=0").holds(diverged)


@pytest.mark.parametrize("text, says", [
    ("", "empty guard"),
    ("protocol>=", "at the end: expected a number after '>='"),
    ("protocol 0.9", "column 10, found '0.9': expected a comparison"),
    ("protocl>=0.9", "column 1: unknown metric 'protocl'"),
    ("greet.speed>1", "unknown metric 'greet.speed'"),
    ("protocol>=0.9 and", "at the end: expected a metric"),
    ("(protocol>=0.9", "at the end: expected ')'"),
    ("protocol>=0.9)", "column 14: unexpected ')'"),
    ("__import__('os')", "column 12: unexpected \"'\""),
    ("protocol>=0.9; rm", "column 14: unexpected ';'"),
])
def test_a_bad_guard_is_named_with_its_column(text, says):
    with pytest.raises(GuardError) as e:
        parse(text, METRICS)
    assert says in str(e.value)


def test_a_guard_reads_any_metric_the_task_declares():
    task = ["answer_line", "correct", "exact", "eval_loss", "perplexity"]
    guard = parse("answer_line>=0.9 and eval_loss<1.5 and default.correct>0", task)
    assert guard.holds(metrics_of({"answer_line": 1.0, "correct": 0.2, "eval_loss": 1.2},
                                  {"default": {"cases": 40, "correct": 0.2}}, None, None))
    with pytest.raises(GuardError, match=r"unknown metric 'protocol'; the run's: answer_line, correct, exact, eval_loss"):
        parse("protocol>=0.9", task)
    with pytest.raises(controls.Rejected, match="unknown metric 'protocol'"):
        controls.check_guard("set-lr", "protocol>=0.9", None, metrics=task)


def test_which_controls_may_be_guarded():
    assert controls.check_guard("set-lr", None, None) is None
    assert controls.check_guard("set-lr", "protocol>=0.9", 2).names == {"protocol"}
    with pytest.raises(controls.Rejected, match="pause cannot be guarded; guarded controls: set-lr, set-grad-clip, set-data"):
        controls.check_guard("pause", "protocol>=0.9", None)
    with pytest.raises(controls.Rejected, match="--within needs --guard"):
        controls.check_guard("set-lr", None, 2)
    with pytest.raises(controls.Rejected, match="categories the data set does not have: chat"):
        controls.check_guard("set-lr", "chat.protocol>0.5", None, frozenset({"greet", "tool"}))
    watching = controls.GuardWatch(control_id="c", command="set-lr", applied_step=7, guard="loss<3")
    with pytest.raises(controls.Rejected, match="set-lr applied at step 7 is still under its guard"):
        controls.check_guard("set-grad-clip", "loss<3", None, watching=watching)


def test_the_trainer_judges_later_verdicts_by_the_mean_loss_the_change_could_show():
    from importlib import import_module

    rollback = import_module("tuneloop.trainer.rollback")
    watch = controls.GuardWatch(control_id="c", command="set-lr", guard="protocol>=0.5 and loss<3", applied_step=10)

    def fb(step, protocol):
        return Feedback(run_id="r", step=step, action="continue", reason="", score=protocol, scores={"protocol": protocol})

    assert rollback.judge(watch, fb(10, 0.9), {10: 1.0}) is None  # the savepoint's own verdict does not count
    # Step 11's loss was measured on the savepoint's weights: the change shows from step 12 on.
    losses = {9: 9.0, 11: 1.0, 12: 2.0, 13: 4.0, 14: 2.5, 16: 5.0}
    assert rollback.judge(watch, fb(11, 0.9), losses) is None  # nothing yet to judge the loss by
    judged = rollback.judge(watch, fb(13, 0.9), losses)
    assert judged.held is False and judged.metrics["loss"] == 3.0  # the mean of steps 12-13
    judged = rollback.judge(watch, fb(15, 0.9), losses)  # step 15 was not logged
    assert judged.held is True and judged.metrics["loss"] == pytest.approx(8.5 / 3)
    assert rollback.judge(watch, fb(15, 0.4), losses).held is False
    # After a verdict held, the next one reads the steps since it: a late divergence is not diluted.
    assert rollback.judge(dataclasses.replace(watch, held=[15]), fb(16, 0.9), losses).metrics["loss"] == 5.0
    assert rollback.judge(dataclasses.replace(watch, held=[16]), fb(17, 0.9), losses) is None  # no step logged since
    cannot = controls.GuardWatch(control_id="c", command="set-lr", guard="greet.protocol>0", applied_step=0)
    assert rollback.judge(cannot, fb(5, 1.0), {}) is None  # cannot judge


def test_a_restart_keeps_the_open_proposals_and_the_guard_under_watch(tmp_path):
    """The run directory's record of what was answered (written at each control, proposal and
    judgement) wins over an older checkpoint's state; open proposals come from it too."""
    from importlib import import_module

    from tuneloop.checkpoints import write_steering
    from tuneloop.config import TrainSection
    from tuneloop.storage import APPLIED_FILE

    durable_state = import_module("tuneloop.trainer.loop_state").durable_state
    checkpoint = controls.Steering.from_config(TrainSection())
    checkpoint.applied = [controls.AppliedControl(control_id="a", command="pause", step=3)]
    record = controls.Steering.from_dict(checkpoint.to_dict())
    record.proposals = {"p-1": controls.OpenProposal(proposal={"command": "stop"}, deadline=0.0)}
    write_steering(tmp_path / APPLIED_FILE, record)
    kept = durable_state(tmp_path, controls.Steering.from_dict(checkpoint.to_dict()))
    assert kept.applied == checkpoint.applied and set(kept.proposals) == {"p-1"}
    record.applied.append(controls.AppliedControl(control_id="b", command="set-lr", value=5.0, step=9))
    record.learning_rate, record.guard = 5.0, controls.GuardWatch(control_id="b", command="set-lr", guard="loss<3")
    write_steering(tmp_path / APPLIED_FILE, record)
    newer = durable_state(tmp_path, controls.Steering.from_dict(checkpoint.to_dict()))
    assert newer.learning_rate == 5.0 and newer.guard.control_id == "b"
    older = controls.Steering.from_dict(record.to_dict())
    older.applied.append(controls.AppliedControl(control_id="c", command="resume", step=12))
    assert durable_state(tmp_path, older) is older  # the checkpoint is newer than the record


def test_the_steering_state_reads_the_plain_dicts_of_earlier_checkpoints_and_refuses_a_broken_one():
    """An earlier version saved the same JSON with plain dicts: it loads into the typed records,
    and what this version saves has the keys the earlier one read."""
    earlier = {"learning_rate": 1e-3, "max_grad_norm": 1.0, "save_steps": 50, "logging_steps": 5, "dataset_id": "d",
               "applied": [{"control_id": "a", "command": "set-lr", "value": 5e-4, "step": 3}],
               "rolled_back": [{"control_id": "z", "command": "set-lr", "value": 9.0, "step": 1, "rolled_back_at": 2}],
               "guard": {"control_id": "a", "command": "set-lr", "value": 5e-4, "guard": "loss<3", "within": 1,
                         "applied_step": 3, "savepoint": "checkpoints/checkpoint-3", "savepoint_step": 3, "held": [],
                         "saves": ["s1"], "ignore_data_skip": False},
               "proposals": {"p-1": {"proposal": {"command": "stop"}, "deadline": 5.0, "control": None}},
               "discarded_requests": [], "future_field": 1}
    state = controls.Steering.from_dict(earlier)
    assert state.applied[0].step == 3 and state.rolled_back[0].rolled_back_at == 2
    assert state.guard.saves == ["s1"] and state.proposals["p-1"].command == "stop"
    assert state.applied_ids() == {"a", "z"}
    again = state.to_dict()
    assert again["applied"][0]["control_id"] == "a" and again["guard"]["savepoint"] == "checkpoints/checkpoint-3"
    assert again["proposals"]["p-1"]["deadline"] == 5.0
    with pytest.raises(ValueError, match="steering state: applied is not a list of AppliedControl records"):
        controls.Steering.from_dict({**earlier, "applied": [{"command": "x"}]})
    with pytest.raises(ValueError, match="steering state: expected an object"):
        controls.Steering.from_dict([1, 2])


def test_with_bounds_a_guard_breaks_only_when_the_whole_bound_is_on_the_wrong_side():
    g = parse("correct>=0.8 and tokens<30", ["correct"])
    m = {"correct": 0.7, "tokens": 20.0}
    assert not g.holds(m)  # the point estimate alone
    assert g.holds(m, {"correct": [0.55, 0.85]})  # the noise of a few cases: the bound reaches 0.8
    assert not g.holds(m, {"correct": [0.55, 0.75]})  # surely below
    assert parse("eval_loss<=1.0", ["eval_loss"]).holds({"eval_loss": 1.2}, {"eval_loss": [0.9, 1.4]})
