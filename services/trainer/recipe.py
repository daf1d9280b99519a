"""The SFT recipe, top to bottom: data set → base model → TRL SFTTrainer (+ LoRA) → done.

Runs in the training thread. Everything it says to the world goes through ``BusCallback``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tuneloop.config import Config
from tuneloop.events import DatasetReady, TrainingFinished
from tuneloop.storage import confine

from . import controls, model as models
from .callback import BusCallback, latest_complete, read_state, sync_args
from .link import BusLink

log = logging.getLogger(__name__)


def read_split(run_dir: Path, dataset: DatasetReady, split: str) -> list[dict]:
    path = confine(run_dir, dataset.splits[split].path)
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def precision(cfg: Config) -> tuple[bool, bool]:
    """(use_cpu, bf16) for the configured device."""
    import torch

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cfg.train.device == "cuda" and not cuda:
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    bf16 = cuda and torch.cuda.is_bf16_supported() if cfg.train.bf16 == "auto" else bool(cfg.train.bf16)
    return not cuda, bf16


def base_ref(cfg: Config) -> str:
    """The base model as events name it: ``base`` (inside the run directory) for the tiny model, else the hub id/path."""
    return "base" if cfg.model.name_or_path == models.TINY else cfg.model.name_or_path


def prepare_base(cfg: Config, run_dir: Path, dataset: DatasetReady) -> tuple[str, Path | str]:
    """(reference carried on events, what from_pretrained loads)."""
    ref = base_ref(cfg)
    if cfg.model.name_or_path == models.TINY:
        train_file = confine(run_dir, dataset.splits["train"].path)
        return ref, models.build_tiny(train_file, run_dir / ref, cfg.model.tiny, cfg.run.seed)
    return ref, ref


def sft_args(cfg: Config, out_dir: Path):
    """TRL's SFTConfig from our config: the same for the service and for plain-TRL baselines."""
    from trl import SFTConfig

    tc = cfg.train
    use_cpu, bf16 = precision(cfg)
    return SFTConfig(
        output_dir=str(out_dir), max_steps=tc.max_steps, per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps, learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler, warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm, max_length=tc.max_length, logging_steps=tc.logging_steps,
        save_strategy="steps", save_steps=tc.save_steps, report_to=[], use_cpu=use_cpu, bf16=bf16,
        gradient_checkpointing=False, seed=cfg.run.seed, data_seed=cfg.run.seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def lora_config(cfg: Config):
    from peft import LoraConfig

    lc = cfg.train.lora
    if not lc.enabled:
        return None
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      modules_to_save=lc.modules_to_save, task_type="CAUSAL_LM")


def build_trainer(cfg: Config, run_dir: Path, dataset: DatasetReady, callbacks: list, args=None):
    """Base model + data + TRL SFTTrainer. ``callbacks=[]`` is plain TRL (the benchmarks' baseline)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(cfg.run.seed)
    _, base_path = prepare_base(cfg, run_dir, dataset)
    model, tokenizer = models.load(base_path)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_split(run_dir, dataset, "train")]
    return SFTTrainer(model=model, args=args or sft_args(cfg, run_dir / "checkpoints"),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=lora_config(cfg), callbacks=callbacks)


def train(cfg: Config, run_id: str, run_dir: Path, dataset: DatasetReady, link: BusLink) -> TrainingFinished:
    """The whole SFT run: resume where a complete checkpoint exists, train, report why it ended."""
    t0 = time.perf_counter()
    tc = cfg.train
    out_dir = run_dir / "checkpoints"
    args = sft_args(cfg, out_dir)
    resume = latest_complete(out_dir)
    if resume:  # what operators decided before the restart still holds
        state = read_state(resume)
        sync_args(args, state)
        log.info("resuming from %s (%d controls applied so far)", resume, len(state.applied))
    else:
        state = controls.RunState.from_config(tc)
    base_ref, _ = prepare_base(cfg, run_dir, dataset)
    callback = BusCallback(link, run_id, run_dir, base_ref, adapter=tc.lora.enabled, state=state)
    trainer = build_trainer(cfg, run_dir, dataset, [callback], args=args)

    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    step = trainer.state.global_step
    reason, detail = callback.stop_reason or ("completed", f"reached max_steps {tc.max_steps}")
    log.info("training finished at step %d (%s: %s), loss %.4f", step, reason, detail, result.training_loss)
    return TrainingFinished(
        run_id=run_id, step=step, reason=reason, detail=detail,
        final_loss=callback.last_loss, final_checkpoint=callback.final_checkpoint,
        train_seconds=time.perf_counter() - t0,
    )
