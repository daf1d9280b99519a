"""Controls as pure logic: the vocabulary, what each command does to the run's steering, the learning rate."""

import pytest
import torch

from tuneloop import controls
from tuneloop.trainer.loop_state import set_learning_rate


def test_controls_apply_or_reject_without_side_effects():
    s = controls.Steering(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5)
    out = controls.apply(s, "set-lr", "0.001")
    assert (out.old, out.new, s.learning_rate) == (3e-3, 1e-3, 1e-3)
    before = s.to_dict()
    for cmd, value, why in [("set-lr", -1, "must be in"), ("set-lr", "fast", "needs a number"),
                            ("set-lr", float("nan"), "must be in"), ("warp", None, "unknown command 'warp'"),
                            ("set-save-interval", 2.5, "whole number"), ("resume", None, "not paused")]:
        with pytest.raises(controls.Rejected, match=why):
            controls.apply(s, cmd, value)
    assert s.to_dict() == before
    assert controls.apply(s, "pause", None).new is True
    with pytest.raises(controls.Rejected, match="already paused"):
        controls.apply(s, "pause", None)
    assert controls.apply(s, "resume", None).new is False
    assert controls.apply(s, "set-save-interval", "10").new == 10 and s.save_steps == 10
    stop = controls.apply(s, "stop", None)
    assert stop.stop and stop.save
    assert controls.Steering.from_dict(s.to_dict()) == s


def test_set_data_only_switches_to_an_announced_other_data_set():
    s = controls.Steering(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5, dataset_id="aaa")
    with pytest.raises(controls.Rejected, match=r"no data set 'zzz' was announced.*announced: aaa, bbb"):
        controls.apply(s, "set-data", "zzz", frozenset({"aaa", "bbb"}))
    with pytest.raises(controls.Rejected, match="already training on data set 'aaa'"):
        controls.apply(s, "set-data", "aaa", frozenset({"aaa", "bbb"}))
    out = controls.apply(s, "set-data", "bbb", frozenset({"aaa", "bbb"}))
    assert (out.old, out.new, out.switch_data, out.save, s.dataset_id) == ("aaa", "bbb", True, True, "bbb")


def test_set_learning_rate_rescales_the_schedule_so_it_continues_from_the_new_value():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    sched.step()  # lr 0.5
    set_learning_rate(opt, sched, 0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    sched.step()  # schedule goes on from the new value: 0.05 * (1/3) / (1/2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)


def test_the_vocabulary_is_what_the_trainer_accepts_and_what_the_cli_and_readme_say():
    from pathlib import Path

    from typer.testing import CliRunner

    from tuneloop.tools.cli import app

    s = controls.Steering(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5, dataset_id="a")
    for name, spec in controls.COMMANDS.items():  # each command is known to apply: accepted or refused for its value
        value = {"X": 0.5, "N": 7, "ID": "b", "WHY": "slow"}.get(spec.value)
        try:
            controls.apply(s, name, value, frozenset({"a", "b"}))
        except controls.Rejected as e:
            assert "unknown command" not in str(e), name
    with pytest.raises(controls.Rejected, match="unknown command 'explode'; known: stop, prune"):
        controls.apply(s, "explode", None)
    help_text = CliRunner().invoke(app, ["ctl", "--help"], env={"COLUMNS": "400"}).output
    assert all(c.usage in help_text for c in controls.COMMANDS.values()), help_text
    doc = (Path(__file__).resolve().parents[2] / "docs" / "events-and-controls.md").read_text()
    assert controls.in_document(doc) == doc, "docs/events-and-controls.md's controls table is stale: run `make docs`"
    assert controls.table().count("\n| `") == len(controls.COMMANDS)


def test_stop_and_prune_say_who_and_why_and_are_refused_while_stopping():
    s = controls.Steering(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5)
    assert controls.apply(s, "stop", None, who="ana").stop_reason == ("control", "stop by ana")
    pruned = controls.apply(s, "prune", "behind the median", who="sweep")
    assert pruned.prune and not pruned.save and pruned.stop_reason == ("pruned", "pruned by sweep: behind the median")
    with pytest.raises(controls.Rejected, match=r"already stopping \(control\)"):
        controls.apply(s, "prune", None, stopping="control")
    assert controls.apply(s, "eval", None).evaluate and not controls.apply(s, "checkpoint", None).evaluate
    assert controls.apply(s, "set-lr", "0.01").set_lr and not controls.apply(s, "set-grad-clip", 2).set_lr
    assert controls.parse_value("set-lr", "1e-3") == 1e-3 and controls.parse_value("set-data", "7") == "7"
    assert controls.parse_value("set-lr", "fast") == "fast"  # sent as typed: the trainer answers why not
