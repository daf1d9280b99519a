"""What tuneloop puts in experiment trackers, and where: verdicts, feedback and controls at their
own steps, the run named by its id and tagged with its parent, the user's tracking settings
kept, and only what is missing written at the end. TensorBoard is read back from its files."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tuneloop.events import ControlApplied, Feedback
from tuneloop.trackers import environment, missing, records
from tuneloop.trainer.trackers import TrackerLog


def feedback(step=20, action="continue"):
    return Feedback(run_id="r", step=step, action=action, reason="improved", score=0.5, best_step=step, best_score=0.5,
                    scores={"protocol": 0.5, "correctness": 0.25},
                    by_category={"math": {"protocol": 1.0, "cases": 4}})


def test_a_verdicts_feedback_and_an_applied_control_become_scalars_at_their_steps():
    step, values = records(feedback(), None)
    assert step == 20 and values == {"eval/protocol": 0.5, "eval/correctness": 0.25, "eval/math/protocol": 1.0,
                                     "feedback/continue": 1.0, "feedback/best_score": 0.5}
    applied = ControlApplied(run_id="r", control_id="c", command="set-lr", step=33, old=1e-3, new=5e-4)
    assert records(object(), applied) == (33, {"control/set-lr": 5e-4})  # the control's answer says what was applied
    paused = ControlApplied(run_id="r", control_id="c", command="pause", step=7, old=False, new=True)
    assert records(object(), paused) == (7, {"control/pause": 1.0})
    assert records(object(), None) is None


def test_each_tracker_writes_in_the_run_names_it_by_id_and_tags_its_parent(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    fork = {"forked_from": {"run": "parent", "step": 40}}
    env = environment(["tensorboard", "mlflow", "wandb"], tmp_path, "child", "protocol", fork)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "trackers" / "tensorboard")
    assert env["MLFLOW_TRACKING_URI"] == f"file:{tmp_path / 'trackers' / 'mlruns'}" and env["MLFLOW_EXPERIMENT_NAME"] == "protocol"
    assert json.loads(env["MLFLOW_TAGS"]) == {"tuneloop.run_id": "child", "tuneloop.parent": "parent", "tuneloop.parent_step": "40"}
    assert env["WANDB_MODE"] == "offline" and "tuneloop.parent=parent" in env["WANDB_TAGS"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # the user's server: kept
    assert "MLFLOW_TRACKING_URI" not in environment(["mlflow"], tmp_path, "child", "protocol", {})
    assert environment([], tmp_path, "child", "protocol", fork) == {}


def test_only_what_the_trainer_did_not_write_is_written_at_the_end():
    done = [(10, {"eval/protocol": 0.2}), (20, {"eval/protocol": 0.6}), (20, {"test/protocol": 0.7})]
    assert missing(done, {"eval/protocol": {10}}) == [(20, {"eval/protocol": 0.6}), (20, {"test/protocol": 0.7})]
    assert missing(done, {"eval/protocol": {10, 20}, "test/protocol": {20}}) == []


def test_the_trainers_records_reach_tensorboard_at_their_own_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[SimpleNamespace(tb_writer=writer)]))
    log = TrackerLog(trainer, ["tensorboard"])
    log.seen(feedback(step=20), None)
    log.seen(feedback(step=10, action="stop"), None)  # a verdict comes in later than a newer one: its own step
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    assert sorted((e.step, e.value) for e in ea.Scalars("feedback/continue")) == [(10, 0.0), (20, 1.0)]
    assert [e.value for e in ea.Scalars("eval/protocol")] == [0.5, 0.5]
