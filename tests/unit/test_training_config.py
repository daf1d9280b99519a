"""Training configurations refused before anything runs (what the machine or the method cannot
do), and the optimizers the config names, as transformers builds them."""

import copy

import pytest
import yaml


def _load(tmp_path, **train):
    from helpers import tiny_config
    from tuneloop.config import load_config

    raw = tiny_config(tmp_path).model_dump(mode="json")
    raw["train"].update(train)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize("train, gpus, why", [
    (dict(parallel="fsdp", processes=2), 0, "train.parallel fsdp needs CUDA GPUs"),
    (dict(parallel="tensor", processes=2), 0, "train.parallel tensor needs CUDA GPUs"),
    (dict(parallel="tensor", processes=1), 1, "set processes to the number of GPUs"),
    (dict(parallel="tensor", processes=4), 2, "over 4 processes needs 4 GPUs, with 2 visible GPU"),
    (dict(parallel="pipeline"), 0, "train.parallel pipeline places layers over GPUs"),
    (dict(optimizer="adamw_8bit"), 0, "adamw_8bit is a bitsandbytes optimizer and needs a CUDA GPU"),
    (dict(optimizer="lion"), 0, "lion is a bitsandbytes optimizer"),
])
def test_what_the_machine_cannot_run_is_refused_with_the_reason(tmp_path, train, gpus, why):
    from tuneloop.trainer.recipe import refusal

    assert why in refusal(_load(tmp_path, **train).train, gpus)


@pytest.mark.parametrize("train, gpus", [
    (dict(parallel="ddp", processes=2), 0), (dict(parallel="fsdp", processes=2), 2),
    (dict(parallel="tensor", processes=2), 2), (dict(parallel="pipeline"), 1), (dict(optimizer="lion"), 1),
])
def test_what_the_machine_can_run_is_not_refused(tmp_path, train, gpus):
    from tuneloop.trainer.recipe import refusal

    assert refusal(_load(tmp_path, **train).train, gpus) is None


def test_on_this_cpu_machine_the_trainer_refuses_before_building_anything(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer.recipe import trl_args

    for parallel in ("fsdp", "tensor", "pipeline"):
        cfg = tiny_config(tmp_path, parallel=parallel, processes=1 if parallel == "pipeline" else 2, device="cpu")
        with pytest.raises(ValueError, match=f"train.parallel {parallel} .*CPU"):
            trl_args(cfg, tmp_path / "out")


def test_config_errors_name_the_field_and_the_known_values(tmp_path):
    from tuneloop.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.optimizer.name: .*unknown optimizer 'adam'; known: adamw, adamw_8bit, "
                                          r"adafactor, sgd, lion"):
        _load(tmp_path, optimizer="adam")
    with pytest.raises(ConfigError, match=r"betas must lie in \[0, 1\)"):
        _load(tmp_path, optimizer={"name": "adamw", "betas": [0.9, 1.5]})
    with pytest.raises(ConfigError, match="pipeline places the layers over the GPUs from one process"):
        _load(tmp_path, parallel="pipeline", processes=2)
    with pytest.raises(ConfigError, match="parallel"):
        _load(tmp_path, parallel="zero3")
    with pytest.raises(ConfigError, match="fsdp"):  # the old switch is gone, not silently ignored
        _load(tmp_path, fsdp=True)


def test_grpo_group_must_divide_the_global_batch(tmp_path):
    from tuneloop.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size 6 x processes 1 is not divisible by grpo.num_generations 4"):
        _load(tmp_path, method="grpo", batch_size=6, grpo={"num_generations": 4})


def test_eval_snapshots_are_refused_with_sharded_weights(tmp_path):
    from helpers import tiny_config
    from pydantic import ValidationError

    for parallel in ("fsdp", "tensor"):
        raw = tiny_config(tmp_path, parallel=parallel, processes=2).model_dump(mode="json")
        raw["eval"]["every"] = 10
        with pytest.raises(ValidationError, match=f"eval.every saves snapshots from one rank.*parallel {parallel}"):
            type(tiny_config(tmp_path)).model_validate(raw)


def _optimizer(tmp_path, model, **optimizer):
    """The optimizer transformers' Trainer builds from our config (its own code path)."""
    from helpers import tiny_config
    from transformers import Trainer
    from tuneloop.trainer.recipe import trl_args

    args = trl_args(tiny_config(tmp_path, optimizer=optimizer, learning_rate=1e-2), tmp_path / "out")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls(model.parameters(), **kwargs)


@pytest.mark.parametrize("optimizer, cls, settings", [
    ({"name": "adamw", "betas": [0.8, 0.95], "eps": 1e-6}, "AdamW", {"betas": (0.8, 0.95), "eps": 1e-6}),
    ({"name": "sgd", "momentum": 0.5}, "SGD", {"momentum": 0.5}),
    ({"name": "adafactor"}, "Adafactor", {"relative_step": False, "scale_parameter": False}),
])
def test_each_optimizer_is_built_by_transformers_with_its_settings(tmp_path, optimizer, cls, settings):
    import torch

    opt = _optimizer(tmp_path, torch.nn.Linear(4, 4), **optimizer)
    assert type(opt).__name__ == cls
    group = opt.param_groups[0]
    assert group["lr"] == 1e-2
    for key, value in settings.items():
        assert group[key] == value, (key, group[key])


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_set_lr_changes_the_step_each_optimizer_takes(tmp_path, name):
    """The same state, one step at the old lr and one after set-lr to half of it: the second
    update is half the first (each of these optimizers moves in proportion to its lr)."""
    import torch
    from tuneloop.trainer.loop_state import set_learning_rate

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = _optimizer(tmp_path, model, name=name)
    x = torch.randn(16, 8)
    for _ in range(3):  # some optimizer state first (momentum, moments)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = _optimizer(tmp_path, twin, name=name)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in model.parameters()]
    scheduler = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda _: 1.0)
    set_learning_rate(twin_opt, scheduler, 5e-3)
    opt.step()
    twin_opt.step()
    for b, p, q in zip(before, model.parameters(), twin.parameters()):
        assert torch.allclose(q - b, (p - b) / 2, rtol=1e-4, atol=1e-7), name
    assert scheduler.base_lrs == [5e-3]
