"""``train.trl``: fields passed as they are to the installed TRL config of the method.

What tuneloop does not name (NEFTune, packing strategy, eval accumulation, the loss options of
a new TRL release) a user still sets, under ``train.trl``. Each field is checked against the
dataclass of the installed TRL (``SFTConfig``, ``DPOConfig`` or ``GRPOConfig``): an unknown
field is refused with the closest names, and a field tuneloop sets itself is refused with the
tuneloop key that sets it, so no setting has two places and none is silently overwritten.
"""

from __future__ import annotations

import dataclasses
import difflib

CONFIG_CLASS = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}

_EVAL = "eval.* (the evaluator service judges every checkpoint)"
_CHECKPOINTS = "the checkpoint service (export.*, retention)"
# TRL field -> the tuneloop key (or part) that sets it.
OWNED = {
    "output_dir": "the run directory (run.output_dir)",
    "max_steps": "train.max_steps (or train.epochs)",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps",
    "report_to": "run.report_to",
    "run_name": "the run id (--run-id)",
    "use_cpu": "train.device",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "auto_find_batch_size": "train.auto_batch_size",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "seed": "run.seed",
    "data_seed": "run.seed",
    "disable_tqdm": "tuneloop's progress (tuneloop watch)",
    "ddp_find_unused_parameters": "train.parallel (every parameter of a step is used)",
    "dataloader_num_workers": "tuneloop (0: the data is prepared before training)",
    "fsdp": "train.parallel",
    "fsdp_config": "train.parallel",
    "optim": "train.optimizer.name",
    "optim_args": "train.optimizer.momentum",
    "adam_beta1": "train.optimizer.betas",
    "adam_beta2": "train.optimizer.betas",
    "adam_epsilon": "train.optimizer.eps",
    "max_length": "train.max_length",
    "beta": "train.dpo.beta or train.grpo.beta",
    "loss_type": "train.dpo.loss_type or train.grpo.loss_type",
    "num_generations": "train.grpo.num_generations",
    "max_completion_length": "train.grpo.max_completion_length",
    "temperature": "train.grpo.temperature",
    "eval_strategy": _EVAL,
    "eval_steps": _EVAL,
    "do_eval": _EVAL,
    "load_best_model_at_end": _EVAL,
    "metric_for_best_model": _EVAL,
    "greater_is_better": _EVAL,
    "save_total_limit": _CHECKPOINTS,
    "save_only_model": _CHECKPOINTS,
    "resume_from_checkpoint": "the trainer (it resumes from the newest intact checkpoint; `tuneloop fork` from any)",
    "push_to_hub": "the export (export.*)",
}


def fields(method: str) -> set[str]:
    """The fields the installed TRL config of ``method`` takes."""
    import trl

    return {f.name for f in dataclasses.fields(getattr(trl, CONFIG_CLASS[method])) if f.init}


def refusal(method: str, options: dict, known: set[str]) -> str | None:
    """Why ``options`` cannot go to TRL's config (``known``: its fields), or None."""
    cls = CONFIG_CLASS[method]
    for name in options:
        if name in OWNED:
            return f"trl.{name}: {cls}.{name} is tuneloop's to set, from {OWNED[name]}"
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            return (f"trl.{name}: {cls} of the installed TRL has no field {name!r}"
                    + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return None


def check(method: str, options: dict) -> None:
    """ValueError when ``options`` cannot go to the installed TRL's config of ``method``. Where
    TRL is not installed (the slim images of rl-reward and data-pipeline read the run's config
    too) only the fields tuneloop owns are checked; the trainer, which has TRL, checks them all."""
    if not options:
        return
    try:
        known = fields(method)
    except ImportError:
        known = set(options) - set(OWNED)
    if why := refusal(method, options, known):
        raise ValueError(why)
