"""Forks planned (tools/fork.py), with no training: which settings a full-state fork may
change, which checkpoint it starts from and why one is refused, and the tree `tuneloop runs`
draws. Forks that train are in tests/integration/test_fork.py (this file is named apart from it: pytest imports test modules by basename)."""

import pytest

from helpers import make_run, tiny_config
from tuneloop.checkpoints import folder, write_state, write_steering
from tuneloop.controls import AppliedControl, Steering
from tuneloop.storage import RunDir
from tuneloop.tools.fork import ForkRefused, fork_tree, keeps_state, parse_sets, plan


def parent(tmp_path, steps=(10, 20)):
    cfg = tiny_config(tmp_path, save_steps=10)
    storage = make_run(tmp_path, "p", cfg)
    rd = RunDir(storage / "p")
    for step in steps:
        folder(rd.checkpoints, step).mkdir(parents=True)
        (folder(rd.checkpoints, step) / "adapter_model.safetensors").write_bytes(b"w")
        write_state(folder(rd.checkpoints, step), Steering.from_config(cfg.train, "d"))
    return storage, rd


def test_settings_a_full_state_fork_may_change():
    assert all(keeps_state(k) for k in ("train.learning_rate", "train.max_steps", "eval.every", "feedback.patience"))
    assert not any(keeps_state(k) for k in ("train.lora.r", "train.method", "train.batch_size", "data.sources",
                                            "model.name_or_path", "train.learning_rate_x"))
    assert parse_sets(["train.learning_rate=5e-4", "eval.every=5", "x.y=[1, 2]"]) == {
        "train.learning_rate": 5e-4, "eval.every": 5, "x.y": [1, 2]}
    with pytest.raises(ForkRefused, match="--set 'lr': expected KEY=VALUE"):
        parse_sets(["lr"])


def test_a_fork_names_its_checkpoint_and_is_refused_with_the_reason(tmp_path):
    storage, rd = parent(tmp_path)
    f = plan(storage, "p", "latest", ["train.learning_rate=1e-3"], name="c")
    assert (f.step, f.child, f.checkpoint, f.config.train.learning_rate) == (20, "c", folder(rd.checkpoints, 20), 1e-3)
    assert f.config.eval.baseline is False and f.lineage(storage)["checkpoint"] == "checkpoints/checkpoint-20"
    assert plan(storage, "p", "10", name="c").step == 10
    with pytest.raises(ForkRefused, match=r"no complete checkpoint at step 15 \(it has: 10, 20\)"):
        plan(storage, "p", "15")
    with pytest.raises(ForkRefused, match="--set train.lora.r: a full-state fork .* fork with --weights-only"):
        plan(storage, "p", "latest", ["train.lora.r=4"])
    assert plan(storage, "p", "latest", ["train.lora.r=4"], weights_only=True, name="c").config.train.lora.r == 4
    with pytest.raises(ForkRefused, match="no run 'nope'"):
        plan(storage, "nope")
    with pytest.raises(ForkRefused, match="no best checkpoint yet"):
        plan(storage, "p", "best")
    with pytest.raises(ForkRefused, match="--set: .*learning_rate"):
        plan(storage, "p", "latest", ["train.learning_rate=-1"])
    (rd.path.parent / "taken").mkdir()
    with pytest.raises(ForkRefused, match="run taken exists already"):
        plan(storage, "p", name="taken")


def test_a_checkpoint_a_rollback_discarded_is_refused_with_why(tmp_path):
    storage, rd = parent(tmp_path, steps=(10,))
    state = Steering.from_config(tiny_config(tmp_path).train, "d")
    state.rolled_back = [AppliedControl(control_id="a", command="set-lr", value=9.0, step=12, rolled_back_at=25)]
    write_steering(rd.applied, state)
    with pytest.raises(ForkRefused, match="step 20: it was discarded when set-lr applied at step 12 was rolled back "
                                          "at step 25"):
        plan(storage, "p", "20")


def test_runs_draws_forks_under_their_parents():
    parents = {"a": None, "b": "a", "c": "b", "d": None, "e": "a", "x": "gone"}
    assert fork_tree(list(parents), parents.get) == [(0, "a"), (1, "b"), (2, "c"), (1, "e"), (0, "d"), (0, "x")]


def test_watch_says_what_a_fork_came_from():
    from rich.console import Console

    from tuneloop.events import RunForked
    from tuneloop.tools.watch import WatchView

    view = WatchView("c")
    view.update(RunForked(run_id="c", parent="p", child="c", step=10, checkpoint="checkpoints/checkpoint-10",
                          changed={"train.learning_rate": 0.05}))
    view.update(RunForked(run_id="c", parent="c", child="grandchild", step=12, checkpoint="checkpoints/checkpoint-12"))
    console = Console(width=120, record=True)
    console.print(view)
    text = console.export_text()
    assert "forked from p" in text and "at step 10" in text and "train.learning_rate" in text


def test_a_fork_of_a_pbt_member_does_not_keep_the_sweeps_barrier(tmp_path):
    """A member pauses at its sweep's barriers (train.pause_every); a fork is a run of its own:
    left as it was, it would wait at the first barrier for a resume no sweep sends."""
    cfg = tiny_config(tmp_path, save_steps=10, pause_every=20)
    storage = make_run(tmp_path, "m", cfg)
    rd = RunDir(storage / "m")
    folder(rd.checkpoints, 20).mkdir(parents=True)
    (folder(rd.checkpoints, 20) / "adapter_model.safetensors").write_bytes(b"w")
    write_state(folder(rd.checkpoints, 20), Steering.from_config(cfg.train, "d"))
    assert cfg.train.pause_every == 20 and plan(storage, "m", name="c").config.train.pause_every is None
