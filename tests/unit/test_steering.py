"""The step boundary's decisions (services/trainer/steering.py), with no training: every
control, guards confirmed and broken, proposals approved, rejected and timed out, redelivered
controls, pause, a stop while stopping. What the training loop does with them (the optimizer,
TRL's flags, the savepoint, the rollback on disk) is in tests/integration/test_trainer.py,
test_guards.py and test_approvals.py."""

from __future__ import annotations

import pytest

from tuneloop.config import FeedbackSection
from tuneloop.controls import Steering
from tuneloop.events import (Control, ControlApplied, ControlConfirmed, ControlRejected, Feedback, Proposal,
                             ProposalDecision, ProposalResolved)
from tuneloop.trainer import approvals
from tuneloop.trainer.steering import Boundary, Steerer

AT = Boundary(step=10, datasets=frozenset({"d0", "d1"}), now=1000.0)


def steerer(**gates) -> Steerer:
    state = Steering(learning_rate=1e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5, dataset_id="d0")
    return Steerer("r", state, FeedbackSection(**gates), categories=frozenset({"math"}))


def ctl(command: str, value=None, **kw) -> Control:
    return Control(run_id="r", command=command, value=value, **kw)


@pytest.mark.parametrize("command,value,field,new", [
    ("set-lr", 5e-4, "learning_rate", 5e-4), ("set-grad-clip", 0.5, "max_grad_norm", 0.5),
    ("set-save-interval", 20, "save_steps", 20), ("set-log-interval", 2, "logging_steps", 2),
    ("set-data", "d1", "dataset_id", "d1")])
def test_a_setting_is_applied_answered_and_made_durable(command, value, field, new):
    s = steerer()
    fx = s.decide(ctl(command, value), AT)
    assert isinstance(fx.answer, ControlApplied) and fx.answer.new == new and fx.answer.step == 10
    assert getattr(s.state, field) == new and fx.applied and fx.write_steering
    assert fx.set_lr == (command == "set-lr")
    assert (fx.switch_data, fx.stop, fx.save) == (("d1", True, True) if command == "set-data" else (None, False, False))
    assert [a.command for a in s.state.applied] == [command]


def test_set_data_at_the_loops_last_step_switches_nothing():
    fx = steerer().decide(ctl("set-data", "d1"), Boundary(step=10, datasets=AT.datasets, loop_stopping=True))
    assert fx.switch_data is None and fx.save


def test_bad_controls_are_rejected_with_the_reason_and_change_nothing():
    s = steerer()
    for event, why in ((ctl("frobnicate"), "unknown command 'frobnicate'"), (ctl("set-lr", -1), "must be in"),
                       (ctl("set-data", "d9"), "no data set 'd9' was announced"), (ctl("resume"), "not paused"),
                       (ctl("stop", guard="protocol>=0.9"), "stop cannot be guarded")):
        fx = s.decide(event, AT)
        assert isinstance(fx.answer, ControlRejected) and why in fx.answer.reason, (event.command, fx.answer)
    assert s.state.applied == [] and s.state.learning_rate == 1e-3


def test_pause_resume_checkpoint_eval():
    s = steerer()
    assert s.decide(ctl("pause"), AT).answer.new is True and s.state.paused
    assert "already paused" in s.decide(ctl("pause"), AT).answer.reason
    assert s.decide(ctl("resume"), AT).answer.new is False and not s.state.paused
    fx = s.decide(ctl("eval"), AT)
    assert fx.save and fx.evaluate_next_save
    fx = s.decide(ctl("checkpoint"), AT)
    assert fx.save and not fx.evaluate_next_save


def test_a_stop_while_stopping_is_rejected():
    s = steerer()
    fx = s.decide(ctl("stop", operator="ann"), AT)
    assert fx.stop and fx.save and s.stop_reason == ("control", "stop by ann")
    again = s.decide(ctl("prune"), AT)
    assert isinstance(again.answer, ControlRejected) and "already stopping (control)" in again.answer.reason


def test_a_redelivered_control_is_answered_again_not_applied_twice():
    s = steerer()
    event = ctl("set-lr", 5e-4)
    first = s.decide(event, AT)
    again = s.decide(event, Boundary(step=12, datasets=AT.datasets))
    assert again.answer.event_id == first.answer.event_id and again.answer.step == 10
    assert not again.applied and len(s.state.applied) == 1


def test_a_guarded_control_waits_for_its_savepoint_then_is_watched_and_confirmed():
    s = steerer()
    event = ctl("set-lr", 5e-4, guard="protocol>=0.9", within=2)
    fx = s.decide(event, AT)
    assert fx.deferred and fx.save and fx.answer is None and s.state.learning_rate == 1e-3
    other = s.decide(ctl("set-grad-clip", 0.5, guard="loss<3"), AT)  # one guard at a time
    assert "still under its guard" in other.answer.reason
    fx = s.at_savepoint("checkpoints/checkpoint-10", AT, ignore_data_skip=False)
    assert fx.answer.savepoint_step == 10 and fx.answer.guard == "protocol>=0.9" and fx.set_lr
    assert s.state.guard.savepoint == "checkpoints/checkpoint-10"
    for step in (15, 20):
        fb = Feedback(run_id="r", step=step, action="continue", reason="", score=0.95, scores={"protocol": 0.95})
        [judged] = s.judgements([fb], losses={}, now=0.0)
        fx = s.decide(judged, Boundary(step=step + 1))
    [confirmed] = fx.publish
    assert isinstance(confirmed, ControlConfirmed) and confirmed.verdict_steps == [15, 20] and s.state.guard is None


def test_a_broken_guard_rolls_back_unless_the_run_is_stopping():
    s = steerer()
    s.decide(ctl("set-lr", 5e-4, guard="protocol>=0.9"), AT)
    s.at_savepoint("checkpoints/checkpoint-10", AT, ignore_data_skip=False)
    fb = Feedback(run_id="r", step=15, action="continue", reason="", score=0.2, scores={"protocol": 0.2})
    [judged] = s.judgements([fb], losses={}, now=0.0)
    assert not judged.held
    fx = s.decide(judged, Boundary(step=16))
    assert fx.stop and fx.rollback is s.rollback and s.rollback.watch.savepoint_step == 10
    assert s.decide(judged, Boundary(step=16)).rollback is None  # one rollback at a time
    stopping = steerer()
    stopping.decide(ctl("set-lr", 5e-4, guard="protocol>=0.9"), AT)
    stopping.at_savepoint("checkpoints/checkpoint-10", AT, ignore_data_skip=False)
    stopping.decide(ctl("stop"), AT)
    assert stopping.decide(judged, Boundary(step=16)).rollback is None


def test_feedback_stops_and_a_discarded_checkpoints_feedback_does_nothing():
    s = steerer()
    s.state.discarded_requests.append("req-discarded")
    stale = Feedback(run_id="r", step=5, action="stop", reason="target", score=1.0, request_id="req-discarded")
    assert not s.decide(stale, AT).stop
    fx = s.decide(Feedback(run_id="r", step=5, action="stop", reason="target reached", score=1.0), AT)
    assert fx.stop and s.stop_reason == ("feedback", "target reached")


def test_gated_policies_become_proposals_approved_rejected_or_timed_out():
    s = steerer(approve=["stop", "set-data"], approve_timeout_s=60, on_timeout="reject")
    policy = ctl("set-data", "d1", policy="adaptive data")
    fx = s.decide(policy, AT)
    assert isinstance(fx.answer, Proposal) and fx.write_steering and s.state.dataset_id == "d0"
    pid = fx.answer.event_id
    assert s.decide(policy, AT).answer.event_id == pid  # redelivered: the same open proposal
    refused = s.decide(ctl("set-data", "d9", policy="adaptive data"), AT)
    assert isinstance(refused.answer, ControlRejected)  # could never apply: refused, not proposed
    fx = s.decide(ProposalDecision(run_id="r", proposal_id=pid, decision="approve", operator="ann"), AT)
    assert isinstance(fx.answer, ProposalResolved) and fx.answer.applied and fx.answer.outcome == "approved"
    assert [type(e) for e in fx.publish] == [ControlApplied] and fx.switch_data == "d1" and s.state.dataset_id == "d1"

    stop = Feedback(run_id="r", step=20, action="stop", reason="target reached", score=1.0)
    pid = s.decide(stop, AT).answer.event_id
    assert s.decide(stop.model_copy(update={"event_id": "other"}), AT).answer is None  # one stop proposal at a time
    fx = s.decide(ProposalDecision(run_id="r", proposal_id=pid, decision="reject", reason="keep going"), AT)
    assert fx.answer.outcome == "rejected" and not fx.answer.applied and not fx.stop and s.stop_reason is None

    pid = s.decide(stop.model_copy(update={"event_id": "again"}), AT).answer.event_id
    assert s.judgements([], {}, now=AT.now + 59) == []
    [late] = s.judgements([], {}, now=AT.now + 61)
    assert isinstance(late, approvals.TimedOut) and late.proposal_id == pid
    fx = s.decide(late, AT)
    assert fx.answer.outcome == "timed-out" and not fx.answer.applied and "reject" in fx.answer.reason
    unknown = s.decide(ProposalDecision(run_id="r", proposal_id="p-nope", decision="approve"), AT)
    assert unknown.answer.outcome == "unknown" and "no open proposal 'p-nope'" in unknown.answer.reason


def test_an_approved_stop_applies_unless_already_stopping():
    s = steerer(approve=["stop"], on_timeout="apply")
    pid = s.decide(Feedback(run_id="r", step=20, action="stop", reason="patience", score=0.5), AT).answer.event_id
    [late] = s.judgements([], {}, now=AT.now + 10_000)
    fx = s.decide(late, AT)
    assert fx.stop and fx.answer.applied and s.stop_reason[0] == "feedback" and "timed-out by timeout" in s.stop_reason[1]
    assert isinstance(late, approvals.TimedOut) and pid == late.proposal_id


def test_a_rollback_undoes_the_controls_applied_under_the_guard_and_what_was_saved_after_it(tmp_path):
    """The steerer's Rollback carried out on a run folder (no training): the savepoint's
    steering comes back, every control applied since it is rolled back (never applied again),
    the checkpoints and snapshots after it go, and the rollback is announced."""
    from tuneloop.checkpoints import folder, write_state
    from tuneloop.events import ControlRolledBack, derived_id
    from tuneloop.storage import RunDir
    from tuneloop.trainer import rollback

    class Link:
        datasets = {"d0": "the data set d0"}

        def __init__(self):
            self.sent = []

        def publish(self, event, **_):
            self.sent.append(event)

    rd = RunDir(tmp_path)
    s = steerer()
    s.decide(ctl("pause"), Boundary(step=5))
    s.decide(ctl("resume"), Boundary(step=6))
    at_savepoint = Steering.from_dict(s.state.to_dict())  # what checkpoint-10 holds
    folder(rd.checkpoints, 10).mkdir(parents=True)
    write_state(folder(rd.checkpoints, 10), at_savepoint)
    guarded = ctl("set-lr", 5e-4, guard="protocol>=0.9")
    s.decide(guarded, Boundary(step=10))
    s.at_savepoint("checkpoints/checkpoint-10", Boundary(step=10), ignore_data_skip=True)
    s.decide(ctl("set-grad-clip", 0.5), Boundary(step=12))
    s.state.guard.saves.append("saved-15")
    for step in (15, 20):
        folder(rd.checkpoints, step).mkdir()
    rd.snapshot(12).mkdir(parents=True)
    rd.snapshot(5).mkdir()
    fb = Feedback(run_id="r", step=15, action="continue", reason="", score=0.1, scores={"protocol": 0.1})
    [judged] = s.judgements([fb], {}, now=0.0)
    s.decide(judged, Boundary(step=21))

    link = Link()
    before = s.state
    back = rollback.roll_back(s.rollback, before, tmp_path, link.datasets, link, "r")
    assert back.savepoint == tmp_path / "checkpoints" / "checkpoint-10" and back.dataset == "the data set d0"
    assert back.step == 10 and back.ignore_data_skip is True
    state = back.state
    assert [a.command for a in state.applied] == ["pause", "resume"] and state.learning_rate == 1e-3
    assert [(a.command, a.rolled_back_at) for a in state.rolled_back] == [("set-lr", 21), ("set-grad-clip", 21)]
    assert state.discarded_requests == [derived_id("eval", "saved-15")]
    assert s.state is before and s.rollback is not None  # returned, not done: the loop carries it out
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["checkpoint-10"]
    assert sorted(rd.snapshot_folders()) == [5]
    s.state, s.rollback = state, None  # as LoopState.rolled_back does
    [announced] = link.sent
    assert isinstance(announced, ControlRolledBack) and announced.reverted == [s.state.rolled_back[1].control_id]
    assert (announced.savepoint_step, announced.step, announced.discarded_steps) == (10, 21, [11, 21])
    again = s.decide(guarded, Boundary(step=22))  # redelivered after the rollback: answered, not applied again
    assert again.answer.step == 10 and not again.applied
