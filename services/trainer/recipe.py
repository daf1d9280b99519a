"""The training recipe, top to bottom: data set → base model → TRL trainer (+ LoRA) → done.

One flow for the three methods; what differs is a row of ``METHODS``: TRL's config and
trainer classes and the columns each one reads. Runs in the training thread and speaks to
the world only through the link (link.py): its callbacks' metrics, answers and checkpoints,
GRPO's reward requests (remote_reward.py) and a rollback's announcement (rollback.py); how the
run ended is returned to the service, which publishes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from tuneloop import controls, trackers as tracking
from tuneloop.checkpoints import DiskFull, latest_complete, latest_intact, out_of_space, read_state
from tuneloop.config import NEEDS_BITSANDBYTES, OPTIMIZERS, Config
from tuneloop.models import base_ref, gguf_base, gguf_folder, local_base
from tuneloop.cores import CoreBudget
from tuneloop.events import DatasetReady, EvalRequest, TrainingFinished, derived_id
from tuneloop.storage import RunDir, confine, read_run_info

from . import distributed, model as models, prepared, rollback, trackers
from .callbacks import Hooks
from .loop_state import LoopState, durable_state, sync_args
from .remote_reward import RemoteReward
from .threads import CoreShareCallback

log = logging.getLogger(__name__)

# method -> (TRL config class, TRL trainer class, columns of the prepared rows it trains on)
METHODS = {
    "sft": ("SFTConfig", "SFTTrainer", ("prompt", "completion")),
    "dpo": ("DPOConfig", "DPOTrainer", ("prompt", "chosen", "rejected")),
    "grpo": ("GRPOConfig", "GRPOTrainer", ("prompt", "category", "reference")),
}
# Columns a method passes on when the data set has them (GRPO: the row's own columns, to the rewards).
OPTIONAL = {"grpo": {"columns": "{}"}}


def read_split(run_dir: Path, dataset: DatasetReady, split: str) -> list[dict]:
    path = confine(run_dir, dataset.splits[split].path)
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def uses_cuda(cfg: Config) -> bool:
    import torch

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cfg.train.device == "cuda" and not cuda:
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return cuda


def precision(cfg: Config) -> str:
    """fp32, bf16 or fp16 for the configured device (mixed precision is for GPUs only)."""
    import torch

    cuda, wanted = uses_cuda(cfg), cfg.train.precision
    if not cuda:
        if wanted in ("bf16", "fp16"):
            raise RuntimeError(f"train.precision {wanted} needs a CUDA GPU; on CPU use fp32 (or auto)")
        return "fp32"
    if wanted == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return wanted


def quantization_config(cfg: Config):
    """QLoRA's 4-bit NF4 base model (bitsandbytes), computing in the training precision; None without."""
    if cfg.train.quantization == "none":
        return None
    if not uses_cuda(cfg):
        raise RuntimeError("train.quantization 4bit needs a CUDA GPU (bitsandbytes); set quantization: none on CPU")
    import torch
    from transformers import BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg), torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def peak_memory_mb(cuda: bool) -> float:
    """Peak memory of this process: what torch allocated on the GPU, or the resident set on CPU."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare_base(cfg: Config, run_dir: Path, dataset: DatasetReady) -> tuple[str, Path | str]:
    """(reference carried on events, what from_pretrained loads)."""
    ref = base_ref(cfg)
    if ref != "base":
        return ref, ref
    path = run_dir / ref
    if distributed.rank() == 0:  # one rank builds or links the base, the others load it
        local = gguf_folder(cfg) if gguf_base(cfg) else local_base(cfg)
        if local:
            models.link_local(local, path)
        else:
            models.build_tiny(confine(run_dir, dataset.splits["train"].path), path, cfg.model.tiny, cfg.run.seed)
    distributed.broadcast(None)  # barrier: the base exists on disk for everyone
    return ref, path


def _checkpointing_arg() -> str:
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__  # transformers 5 renamed it (the old name warns)
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def trl_args(cfg: Config, out_dir: Path, run_id: str | None = None):
    """TRL's config for the method, from ours: the same for the service and for plain-TRL baselines."""
    import trl

    tc, owned = cfg.train, trl_kwargs(cfg, out_dir, run_id)
    try:
        return getattr(trl, METHODS[tc.method][0])(**owned, **tc.trl)
    except (TypeError, ValueError) as e:
        if not tc.trl:
            raise
        raise ValueError(f"train.trl {tc.trl}: {METHODS[tc.method][0]} refused it: {e}") from e


def trl_kwargs(cfg: Config, out_dir: Path, run_id: str | None = None) -> dict:
    """What tuneloop's keys set in TRL's config (``trl_options.OWNED`` names each one, so that
    ``train.trl`` cannot set it a second time); ``run_id``: the trackers' run name."""
    tc = cfg.train
    use_cpu, dtype = not uses_cuda(cfg), precision(cfg)
    checkpointing = _checkpointing_arg()
    common = dict(
        output_dir=str(out_dir), max_steps=tc.max_steps, per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps, learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler, warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm, logging_steps=tc.logging_steps, save_strategy="steps",
        save_steps=tc.save_steps, report_to=list(cfg.run.report_to), run_name=run_id, use_cpu=use_cpu,
        bf16=dtype == "bf16", fp16=dtype == "fp16",
        auto_find_batch_size=tc.auto_batch_size, **{checkpointing: tc.gradient_checkpointing},
        seed=cfg.run.seed, data_seed=cfg.run.seed, disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    refuse_what_the_machine_cannot_do(cfg, cuda=not use_cpu)
    if tc.parallel == "fsdp":
        common.update(fsdp=True, fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                              "reshard_after_forward": True})
    common.update(optimizer_args(tc.optimizer))
    if tc.epochs is not None:  # the Trainer turns epochs into steps from the data loader's length
        common.update(max_steps=-1, num_train_epochs=tc.epochs)
    if tc.method == "sft":
        extra = dict(max_length=tc.max_length)
    elif tc.method == "dpo":
        extra = dict(max_length=tc.max_length, beta=tc.dpo.beta, loss_type=tc.dpo.loss_type)
    else:
        g = tc.grpo
        extra = dict(num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                     temperature=g.temperature, beta=g.beta, loss_type=g.loss_type)
    return {**common, **extra}


def optimizer_args(opt) -> dict:
    """``train.optimizer`` as TrainingArguments' ``optim``/``optim_args``: the Trainer builds the
    optimizer, saves its state in each checkpoint and restores it on resume."""
    args = dict(optim=OPTIMIZERS[opt.name], adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], adam_epsilon=opt.eps)
    if opt.name == "sgd":
        args["optim_args"] = f"momentum={opt.momentum}"
    return args


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def refusal(tc, gpus: int) -> str | None:
    """Why this machine (``gpus`` CUDA devices in use, 0 on CPU) cannot run ``train``'s parallel
    mode or optimizer, with what to set instead; None when it can. Never a quiet fall-back."""
    where = "on CPU" if not gpus else f"with {gpus} visible GPU(s)"
    if tc.parallel == "fsdp" and not gpus:  # accelerate shards on GPUs only; on CPU it would quietly fall back to DDP
        return ("train.parallel fsdp needs CUDA GPUs (accelerate's FSDP does not run on CPU); "
                "on CPU set parallel: ddp: processes > 1 then trains data parallel over gloo")
    if tc.parallel == "tensor":
        if not gpus:
            return ("train.parallel tensor needs CUDA GPUs (transformers' tp_plan splits layers over GPUs); "
                    "on CPU set parallel: ddp")
        if tc.processes < 2:
            return ("train.parallel tensor splits each layer over the processes: set processes to the number "
                    "of GPUs to use (2 or more)")
        if tc.processes > gpus:
            return f"train.parallel tensor over {tc.processes} processes needs {tc.processes} GPUs, {where}: lower train.processes"
    if tc.parallel == "pipeline" and not gpus:
        return "train.parallel pipeline places layers over GPUs (device_map); on CPU there is one device: set parallel: ddp"
    if tc.optimizer.name in NEEDS_BITSANDBYTES and not gpus:
        return (f"train.optimizer {tc.optimizer.name} is a bitsandbytes optimizer and needs a CUDA GPU; "
                f"{where} use adamw, adafactor or sgd")
    return None


def refuse_what_the_machine_cannot_do(cfg: Config, cuda: bool) -> None:
    why = refusal(cfg.train, visible_gpus() if cuda else 0)
    if why:
        raise ValueError(why)
    if cfg.train.optimizer.name in NEEDS_BITSANDBYTES:
        from transformers.utils import is_bitsandbytes_available

        if not is_bitsandbytes_available():
            raise ValueError(f"train.optimizer {cfg.train.optimizer.name} needs bitsandbytes: pip install bitsandbytes")


def placement(cfg: Config, base_path: Path | str) -> dict:
    """from_pretrained's arguments that place the model for ``train.parallel``: the model's own
    tensor-parallel plan over the processes, or its layers over the visible GPUs."""
    if cfg.train.parallel == "pipeline":
        return {"device_map": "auto"}
    if cfg.train.parallel != "tensor":
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_path))
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(f"train.parallel tensor: {type(config).__name__} has no tensor-parallel plan in this "
                         "transformers; use parallel: fsdp or ddp")
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # transformers before DistributedConfig took tp_plan directly
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=cfg.train.processes)}


def lora_config(cfg: Config):
    from peft import LoraConfig

    lc = cfg.train.lora
    if not lc.enabled:
        return None
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                      modules_to_save=lc.modules_to_save, task_type="CAUSAL_LM")


def train_rows(cfg: Config, run_dir: Path, dataset: DatasetReady) -> list[dict]:
    """The train split with the columns the method reads; rows lacking one are named."""
    columns = METHODS[cfg.train.method][2]
    rows = read_split(run_dir, dataset, "train")
    for i, r in enumerate(rows, 1):
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"{dataset.splits['train'].path}:{i}: {cfg.train.method} needs {missing}")
    extra = OPTIONAL.get(cfg.train.method, {})
    return [{**{c: r[c] for c in columns}, **{c: r.get(c, default) for c, default in extra.items()}} for r in rows]


def build_trainer(cfg: Config, run_dir: Path, dataset: DatasetReady, callbacks: list, args=None, link=None, run_id="",
                  base_path: Path | str | None = None, eval_rows: list[dict] | None = None):
    """Base model + data + the TRL trainer. ``callbacks=[]`` is plain TRL (the benchmarks' baseline);
    ``base_path``: what ``prepare_base`` returned, when the caller prepared the base already;
    ``eval_rows``: TRL's own eval set (SFT: prompt and completion), for transformers' evaluation loop
    (the benches' ``EarlyStoppingCallback`` arm; tuneloop's evaluation is the evaluator's)."""
    import trl
    from datasets import Dataset
    from transformers import set_seed

    set_seed(cfg.run.seed)
    if base_path is None:
        _, base_path = prepare_base(cfg, run_dir, dataset)
    model, tokenizer = models.load(base_path, template=dataset.chat_template, quantization=quantization_config(cfg),
                                   **placement(cfg, base_path))
    if cfg.train.lora.enabled:
        models.check_target_modules(model, cfg.train.lora.target_modules)
    kwargs = {}
    if cfg.train.method == "grpo":
        g = cfg.train.grpo
        kwargs["reward_funcs"] = RemoteReward(link, run_id, g.rewards, g.reward_timeout)
    trainer_cls = getattr(trl, METHODS[cfg.train.method][1])
    args = args or trl_args(cfg, RunDir(run_dir).checkpoints)
    rows = train_rows(cfg, run_dir, dataset)
    if cfg.train.method != "sft":
        return trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=lora_config(cfg), callbacks=callbacks, **kwargs)
    # SFT: a set this process tokenized before (an earlier trial on the same data) is not tokenized again.
    k = prepared.key(rows, tokenizer, args)
    ready, given = (prepared.get(k) if eval_rows is None else None), args.dataset_kwargs  # skipping would skip the eval set too
    if ready is not None:
        log.info("train set tokenized by this process before (%d rows): not tokenized again", len(ready))
        args.dataset_kwargs = {**(given or {}), "skip_prepare_dataset": True}
    try:
        if eval_rows is not None:
            kwargs["eval_dataset"] = Dataset.from_list(eval_rows)
        trainer = trainer_cls(model=model, args=args, train_dataset=ready if ready is not None else Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=callbacks, **kwargs)
    finally:
        args.dataset_kwargs = given
    prepared.keep(k, trainer.train_dataset)
    return trainer


def core_sharing(loop: LoopState) -> list:
    """The callback that shares this machine's cores with the services beside the trainer
    (``TUNELOOP_CORE_DIR``, set by ``tuneloop run``); none for several training processes."""
    budget = CoreBudget.from_env()
    if budget is None or distributed.world_size() > 1:
        return []
    return [CoreShareCallback(budget, loop.expecting_verdicts)]


NEWEST = "newest"


def lineage(run_dir: Path, run_id: str) -> dict:
    """The run's run.json (its fork parent, for the trackers' tags); empty where there is none."""
    try:
        return read_run_info(Path(run_dir).parent, run_id)
    except (FileNotFoundError, ValueError):
        return {}


def train(cfg: Config, run_id: str, run_dir: Path, dataset: DatasetReady, link, resume: Path | None | str = NEWEST) -> TrainingFinished:
    """The whole run: resume where a complete checkpoint exists, train, switch data when told, report why it ended.

    ``resume``: the checkpoint to resume from (None: start afresh), when rank 0's caller has
    checked it already (verifying hashes every file); by default the newest intact one."""
    tc = cfg.train
    seconds = 0.0  # in trainer.train() itself: set-up (base model, tokenizing) aside
    out_dir = RunDir(run_dir).checkpoints
    if cfg.run.report_to:  # where TRL's tracker callbacks write, and how they name and tag this run
        os.environ.pop("MLFLOW_RUN_ID", None)  # a pool's previous run is not this one
        os.environ.update(tracking.environment(cfg.run.report_to, run_dir, run_id, cfg.run.name, lineage(run_dir, run_id)))
    args = trl_args(cfg, out_dir, run_id)
    if distributed.rank() != 0:
        resume = None
    elif resume == NEWEST:
        resume = latest_intact(out_dir, getattr(link, "recorded", None))
    resume = distributed.broadcast(resume)  # one rank checks (and moves aside); all resume from the same
    if resume:  # what operators decided before the restart still holds
        state = read_state(resume)
        log.info("resuming from %s (%d controls applied so far)", resume, len(state.applied))
    else:
        state = controls.Steering.from_config(tc, dataset.dataset_id)
    checkpointed = state
    state = durable_state(run_dir, state)  # ... and so do those answered since that checkpoint
    sync_args(args, state)
    ref, base_path = prepare_base(cfg, run_dir, dataset)
    if cfg.eval.baseline and not resume:  # the "before" of this run: its starting model on the test split
        link.publish(EvalRequest(run_id=run_id, event_id=derived_id("baseline", run_id), step=0, checkpoint=None,
                                 base_model=ref, adapter=False, split="test", purpose="baseline"))
    categories = frozenset(c for split in dataset.splits.values() for c in split.categories)
    hooks = Hooks(link, run_id, run_dir, ref, adapter=tc.lora.enabled, state=state,
                  method=tc.method, sharded=tc.sharded, eval_every=cfg.eval.every, pause_every=tc.pause_every,
                  gates=cfg.feedback, categories=categories, metrics=cfg.task.names())
    loop = hooks.loop
    if state is not checkpointed:
        hooks.steering.restored = [a for a in state.applied if a.control_id not in checkpointed.applied_ids()]
    callbacks = [*hooks.callbacks, *core_sharing(loop)]
    seen = {dataset.dataset_id: dataset}  # what a rollback may go back to
    while True:
        trainer = build_trainer(cfg, run_dir, dataset, callbacks, args=args, link=link, run_id=run_id, base_path=base_path)
        loop.trackers = trackers.TrackerLog(trainer, cfg.run.report_to) if cfg.run.report_to else None
        t0 = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Exception as e:
            if out_of_space(e, run_dir):  # stopped with where it resumes; nothing half written stays
                raise DiskFull(run_dir, trainer.state.global_step, out_dir) from e
            raise
        seconds += time.perf_counter() - t0
        if "mlflow" in cfg.run.report_to:
            trackers.same_mlflow_run_next()  # a rollback or set-data trains again: in the same MLflow run
        if loop.steer.rollback is not None:  # a guard broke: back to its savepoint, as it was then
            back = rollback.roll_back(loop.steer.rollback, loop.run_state, run_dir, seen, link, run_id)
            loop.rolled_back(back.state, back.step)
            resume, dataset, args.ignore_data_skip = back.savepoint, back.dataset, back.ignore_data_skip
            continue
        if loop.switch_to is None or loop.stop_reason is not None:
            break
        # set-data: the checkpoint just saved holds weights, optimizer and schedule; go on with the new rows.
        dataset, loop.switch_to = loop.switch_to, None
        seen[dataset.dataset_id] = dataset
        resume = latest_complete(out_dir)
        args.ignore_data_skip = True  # the new data set starts at its beginning
        log.info("switching to data set %s at step %d", dataset.dataset_id, trainer.state.global_step)
    step = trainer.state.global_step
    planned = f"{tc.epochs:g} epochs ({trainer.state.max_steps} steps)" if tc.epochs else f"max_steps {tc.max_steps}"
    reason, detail = loop.stop_reason or ("completed", f"reached {planned}")
    tps, peak = hooks.metrics.tokens_per_second, peak_memory_mb(not args.use_cpu)
    log.info("training finished at step %d (%s: %s), loss %.4f, %s tokens/s, peak memory %.0f MB, batch %d",
             step, reason, detail, result.training_loss, f"{tps:.0f}" if tps else "-", peak, trainer._train_batch_size)
    return TrainingFinished(
        run_id=run_id, step=step, reason=reason, detail=detail,
        final_loss=loop.last_loss, final_checkpoint=loop.final_checkpoint,
        train_seconds=seconds, processes=distributed.world_size(),
        tokens_per_second=tps, peak_memory_mb=peak, batch_size=trainer._train_batch_size,
    )
