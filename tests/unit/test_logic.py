"""Pure logic of trainer controls, the feedback policy, the checkpoint catalogue, path confinement."""

import pytest
import torch

from tuneloop.checkpoint.catalogue import Entry, best, pending, stale_snapshots
from tuneloop.config import FeedbackSection
from tuneloop.events import EvalVerdict
from tuneloop.rl_reward.policy import PolicyState, decide
from tuneloop.storage import UnsafePath, confine, resolve_model
from tuneloop.trainer import controls
from tuneloop.trainer.callback import set_learning_rate


def test_controls_apply_or_reject_without_side_effects():
    s = controls.RunState(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5)
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
    assert controls.RunState.from_dict(s.to_dict()) == s


def test_set_data_only_switches_to_an_announced_other_data_set():
    s = controls.RunState(learning_rate=3e-3, max_grad_norm=1.0, save_steps=50, logging_steps=5, dataset_id="aaa")
    with pytest.raises(controls.Rejected, match=r"no data set 'zzz' was announced.*announced: aaa, bbb"):
        controls.apply(s, "set-data", "zzz", frozenset({"aaa", "bbb"}))
    with pytest.raises(controls.Rejected, match="already training on data set 'aaa'"):
        controls.apply(s, "set-data", "aaa", frozenset({"aaa", "bbb"}))
    out = controls.apply(s, "set-data", "bbb", frozenset({"aaa", "bbb"}))
    assert (out.old, out.new, out.switch_data, out.save, s.dataset_id) == ("aaa", "bbb", True, True, "bbb")


def test_fsdp_on_cpu_is_refused_not_silently_data_parallel(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer.recipe import trl_args

    cfg = tiny_config(tmp_path, fsdp=True, processes=2, device="cpu")
    with pytest.raises(ValueError, match="train.fsdp needs CUDA GPUs"):
        trl_args(cfg, tmp_path / "out")


def test_grpo_group_must_divide_the_global_batch(tmp_path):
    from helpers import tiny_config
    from tuneloop.config import ConfigError, load_config
    import yaml

    path = tmp_path / "c.yaml"
    raw = tiny_config(tmp_path).model_dump(mode="json")
    raw["train"].update(method="grpo", batch_size=6, grpo={"num_generations": 4})
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="batch_size 6 x processes 1 is not divisible by grpo.num_generations 4"):
        load_config(path)


def test_set_learning_rate_rescales_the_schedule_so_it_continues_from_the_new_value():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    sched.step()  # lr 0.5
    set_learning_rate(opt, sched, 0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    sched.step()  # schedule goes on from the new value: 0.05 * (1/3) / (1/2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)


def verdict(step, score, vid=None):
    return EvalVerdict(run_id="r", request_id="q", step=step, checkpoint=f"c{step}", split="val", purpose="periodic",
                       cases=10, scores={"protocol": score, "correctness": 0.0},
                       by_category={"math": {"protocol": score}, "upper": {"protocol": 1.0}}, **({"event_id": vid} if vid else {}))


def test_policy_stops_on_target_or_patience_and_ignores_duplicates():
    cfg = FeedbackSection(target=0.9, patience=2, min_step=10)
    st = PolicyState()
    assert decide(cfg, st, verdict(5, 0.95)).action == "continue"  # before min_step
    st = PolicyState()
    first = verdict(10, 0.5, "v1")
    fb = decide(cfg, st, first)
    assert fb.action == "continue" and fb.weak_categories == ["math"]
    assert decide(cfg, st, first) is None
    assert decide(cfg, st, verdict(20, 0.4)).action == "continue"
    fb = decide(cfg, st, verdict(30, 0.45))
    assert fb.action == "stop" and "no improvement for 2" in fb.reason and fb.best_step == 10
    fb = decide(cfg, PolicyState(), verdict(40, 0.92))
    assert fb.action == "stop" and fb.reason.startswith("target reached")


def test_best_checkpoint_prefers_score_then_later_step():
    e = lambda step, s: Entry(step=step, path=f"c{step}", base_model="base", adapter=True, sha256="x", bytes=1,
                              scores=None if s is None else {"protocol": s})
    entries = [e(50, 0.8), e(100, 0.9), e(150, 0.9), e(200, None)]
    assert best(entries, "protocol").step == 150
    assert pending(entries) == [200]


def test_snapshots_are_exported_when_best_and_released_when_outscored():
    def e(step, s, snapshot=False, evaluated=True, released=False):
        return Entry(step=step, path=f"p{step}", base_model="base", adapter=True, sha256="x", bytes=1,
                     scores=None if s is None else {"protocol": s}, snapshot=snapshot, evaluated=evaluated,
                     released=released)

    entries = [e(10, 0.5, snapshot=True), e(15, None, evaluated=False), e(20, 0.9, snapshot=True),
               e(30, 0.7), e(40, None, snapshot=True)]
    assert best(entries, "protocol").step == 20          # a snapshot can be the export
    assert pending(entries) == [40]                       # a resume-only checkpoint awaits no verdict
    assert [x.step for x in stale_snapshots(entries, "protocol")] == [10]  # not the best, not unscored
    entries[1] = e(20, 0.9, snapshot=True, released=True)
    entries.pop(2)
    assert best(entries, "protocol").step == 30           # a released entry is never chosen
    assert stale_snapshots([e(10, 0.9, snapshot=True)], "protocol") == []  # the only one is the best


def test_eval_snapshots_are_refused_with_sharded_weights(tmp_path):
    from helpers import tiny_config
    from pydantic import ValidationError

    raw = tiny_config(tmp_path, fsdp=True).model_dump(mode="json")
    raw["eval"]["every"] = 10
    with pytest.raises(ValidationError, match="eval.every saves snapshots from one rank"):
        type(tiny_config(tmp_path)).model_validate(raw)


def test_paths_from_events_stay_inside_the_run(tmp_path):
    (tmp_path / "ck").mkdir()
    assert confine(tmp_path, "ck") == (tmp_path / "ck").resolve()
    for bad in ("../x", "/etc/passwd", "ck/../../x", ""):
        with pytest.raises(UnsafePath):
            confine(tmp_path, bad)
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(UnsafePath):
        confine(tmp_path, "out/passwd")
    assert resolve_model(tmp_path, "ck") == (tmp_path / "ck").resolve()
    assert resolve_model(tmp_path, "Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(UnsafePath):
        resolve_model(tmp_path, "/etc")


def test_a_local_model_folder_becomes_the_runs_base_and_events_name_it_relatively(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer import model as models
    from tuneloop.trainer.recipe import base_ref, local_base

    src = tmp_path / "previous" / "export" / "merged"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    cfg = tiny_config(tmp_path)
    assert base_ref(cfg) == "base" and local_base(cfg) is None  # the tiny model is built in the run
    cfg.model.name_or_path = str(src)
    assert base_ref(cfg) == "base" and local_base(cfg) == src
    rdir = tmp_path / "run"
    base = models.link_local(src, rdir / "base")
    assert (base / "model.safetensors").read_bytes() == b"weights"
    assert resolve_model(rdir, base_ref(cfg)) == base.resolve()  # events carry "base", never an absolute path
    cfg.model.name_or_path = "org/some-model"
    assert base_ref(cfg) == "org/some-model" and local_base(cfg) is None
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.link_local(tmp_path / "not-a-model", tmp_path / "run2" / "base")


def test_grafana_annotations_say_what_was_done_and_are_off_without_url_and_token(monkeypatch):
    from tuneloop.events import CheckpointRecorded, ControlApplied, StepMetrics
    from tuneloop.grafana import Annotator, annotation

    applied = ControlApplied(run_id="r1", control_id="c", command="set-lr", step=42, old=0.003, new=0.001)
    a = annotation(applied)
    assert a["tags"] == ["tuneloop", "r1", "control", "set-lr"] and a["text"] == "r1: set-lr at step 42: 0.003 -> 0.001"
    assert a["time_from"] == int(applied.time.timestamp() * 1000) and a["dashboard_uid"] == "tuneloop"
    saved = annotation(CheckpointRecorded(run_id="r1", step=50, path="checkpoints/checkpoint-50", sha256="ab" * 32,
                                          bytes=14_300_000))
    assert saved["tags"][-1] == "checkpoint" and "step 50 (14.3 MB, sha256 abababababab)" in saved["text"]
    assert annotation(StepMetrics(run_id="r1", step=1, max_steps=2)) is None
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert Annotator.from_env() is None
