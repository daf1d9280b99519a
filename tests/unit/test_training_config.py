"""Training configurations refused before anything runs: what the machine or the method cannot do."""

import pytest


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


def test_eval_snapshots_are_refused_with_sharded_weights(tmp_path):
    from helpers import tiny_config
    from pydantic import ValidationError

    raw = tiny_config(tmp_path, fsdp=True).model_dump(mode="json")
    raw["eval"]["every"] = 10
    with pytest.raises(ValidationError, match="eval.every saves snapshots from one rank"):
        type(tiny_config(tmp_path)).model_validate(raw)
