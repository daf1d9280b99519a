"""Typed events: the only thing services exchange.

Every event is a pydantic v2 model with the same envelope (run_id, event_id, time,
schema_version, source). ``KIND`` is the subject suffix (``tuneloop.<run>.<KIND>``) and
``DURABLE`` says whether it goes through JetStream (kept, de-duplicated by event_id) or
core NATS (fire and forget / request-reply). ``proto/`` is generated from these classes.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN, description="Run identifier; part of every subject.")]
RelPath = Annotated[
    str,
    Field(min_length=1, max_length=1024, description="Path relative to the run directory; never absolute."),
]


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(timezone.utc)



class Reject(Exception):
    """Raised by a handler for an event that can never succeed (e.g. a path outside the run):
    dead-lettered at once instead of retried."""

class Event(BaseModel):
    """Envelope shared by all events."""

    model_config = ConfigDict(extra="forbid")

    KIND: ClassVar[str] = ""
    DURABLE: ClassVar[bool] = True

    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: RunId
    event_id: str = Field(default_factory=_new_id, min_length=1, max_length=64,
                          description="Unique id; used as Nats-Msg-Id so JetStream drops duplicates.")
    time: datetime = Field(default_factory=_now)
    source: str = Field(default="", max_length=64, description="Service (or CLI) that produced the event.")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


# ---------------------------------------------------------------- data
class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: RelPath
    rows: int = Field(ge=0)
    categories: dict[str, int] = Field(default_factory=dict)


class DatasetReady(Event):
    """A prepared data set is on disk."""

    KIND: ClassVar[str] = "data.ready"
    dataset_id: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(description="sha256 over the prepared files; same input, same fingerprint.")
    splits: dict[str, SplitInfo] = Field(description="train / val / test")
    chat_template: str
    mixture: dict[str, float] = Field(default_factory=dict, description="Weight per source.")
    category_weights: dict[str, float] = Field(default_factory=dict, description="Train re-weighting per category (adaptive data).")
    rejected_rows: int = Field(default=0, ge=0)
    quality: dict = Field(default_factory=dict, description=(
        "The data-quality gate's summary: rows checked, findings and rows dropped by reason, violation rate, "
        "categories and balance (quality.json beside the splits has the first examples of each finding)."))
    augmented_rows: int = Field(default=0, ge=0, description="Train rows added by data.augment.")
    requested_by: str | None = Field(default=None, description="event_id of the MixtureRequest this answers.")


class RunQueued(Event):
    """Serve this run.

    Its config is already in its run directory. Pool processes (``--run-id '*'``) take runs
    from a work queue one after another, so a sweep's trials pay for no process start-up; a
    worker that dies mid-run leaves the message unacked, and another one resumes the run from
    its last checkpoint. A newer ``RunQueued`` of the same run supersedes older ones.
    """

    KIND: ClassVar[str] = "run.queued"
    attempt: int = Field(default=0, ge=0, description="0 for the first start; a restart queues the run again with the next.")
    reason: str = ""


class MixtureRequest(Event):
    """Prepare the run's data again with these source weights.

    data-pipeline answers with a new ``DatasetReady``; the trainer switches to it on ``set-data``.
    """

    KIND: ClassVar[str] = "data.mixture"
    weights: dict[str, float] = Field(min_length=1, description="Source name -> weight (> 0); unnamed sources keep theirs.")
    reason: str = ""


class RunForked(Event):
    """A run was forked: a new run starts from one of its checkpoints (``tuneloop fork``).

    Published on the parent's subject and on the child's, so the audit trail of both has it."""

    KIND: ClassVar[str] = "run.forked"
    parent: str
    child: str
    step: int = Field(ge=0, description="The step of the parent's checkpoint the child starts from.")
    checkpoint: str = Field(description="That checkpoint, relative to the parent's run directory.")
    changed: dict[str, Any] = Field(default_factory=dict, description="The settings the child changed (dotted keys).")
    weights_only: bool = Field(default=False, description="Only the weights (a fresh optimizer), or the full state.")


class DataSwitch(Event):
    """Adaptive data asks the trainer to go on with a data set it announced for the run.

    A subject of its own rather than a ``control``: data-pipeline, the one service that parses
    untrusted datasets, may publish this and nothing the trainer would take as ``stop`` or
    ``set-lr``. The trainer applies it as ``set-data`` (``as_control``): answered, audited,
    gated by ``feedback.approve`` and rolled back like any control.
    """

    KIND: ClassVar[str] = "data.switch"
    dataset_id: str = Field(min_length=1, max_length=128)
    policy: str = Field(default="adaptive data", max_length=64)
    requested_by: str | None = Field(default=None, description="event_id of the feedback that asked for it.")

    def as_control(self) -> "Control":
        return Control(run_id=self.run_id, event_id=self.event_id, time=self.time, source=self.source,
                       command="set-data", value=self.dataset_id, operator=f"data-pipeline ({self.policy})",
                       policy=self.policy)


# ---------------------------------------------------------------- trainer
class StepMetrics(Event):
    """One logging step."""

    KIND: ClassVar[str] = "train.step"
    step: int = Field(ge=0)
    max_steps: int = Field(ge=0)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    tokens: int | None = Field(default=None, ge=0, description=(
        "Tokens trained since the previous train.step: tuneloop_train_tokens_total grows by it, and its rate() "
        "is the throughput."))
    reward: float | None = Field(default=None, description="GRPO: mean reward of the step's completions.")
    method: str = "sft"
    paused: bool = False


class CheckpointSaved(Event):
    """A complete checkpoint (or evaluation snapshot) directory exists."""

    KIND: ClassVar[str] = "ckpt.saved"
    step: int = Field(ge=0)
    path: RelPath
    base_model: RelPath | str = Field(description="Base model the adapter applies to (run-relative path or hub id).")
    adapter: bool = Field(description="True when the checkpoint holds a LoRA adapter, False for full weights.")
    is_final: bool = False
    loss: float | None = None
    snapshot: bool = Field(default=False, description="Weights (or adapter) only, for evaluation (eval.every): not resumable.")
    evaluate: bool = Field(default=True, description="Ask for its evaluation (False: a checkpoint kept for resume only).")
    savepoint: bool = Field(default=False, description="Saved before a guarded control: the run rolls back to it if the guard breaks.")


class TrainingFinished(Event):
    """Training ended (completed, stopped by control or feedback, pruned, or failed).

    ``interrupted``: the process was told to stop (SIGTERM, its parent gone); it saved a
    checkpoint and resumes from it when started again, so nothing is exported. ``pruned``:
    a sweep stopped a trial that fell behind; its checkpoints are released, not exported.
    """

    KIND: ClassVar[str] = "train.done"
    step: int = Field(ge=0)
    reason: Literal["completed", "control", "feedback", "pruned", "interrupted", "error"]
    detail: str = ""
    final_loss: float | None = None
    final_checkpoint: RelPath | None = None
    train_seconds: float = Field(default=0.0, description="Seconds in the training loop (set-up aside).")
    processes: int = Field(default=1, ge=1, description="Training processes (ranks) that took part.")
    tokens_per_second: float | None = Field(default=None, description="Tokens trained on per second of training (all ranks).")
    peak_memory_mb: float | None = Field(default=None, description="Peak memory of rank 0: GPU memory allocated by torch on CUDA, process RSS on CPU.")
    batch_size: int | None = Field(default=None, description="Per-device batch size trained with (the finder's choice with batch_size: auto).")


# ---------------------------------------------------------------- checkpoint
class CheckpointRecorded(Event):
    """A checkpoint was verified and catalogued."""

    KIND: ClassVar[str] = "ckpt.recorded"
    step: int = Field(ge=0)
    path: RelPath
    sha256: str
    bytes: int = Field(ge=0)


class CheckpointsReleased(Event):
    """A pruned run's checkpoints were deleted from storage (the catalogue keeps their record)."""

    KIND: ClassVar[str] = "ckpt.released"
    steps: list[int] = Field(default_factory=list)
    bytes: int = Field(ge=0, description="Bytes freed.")
    reason: str = ""


class ExportDone(Event):
    """The run's best checkpoint was exported."""

    KIND: ClassVar[str] = "export.done"
    step: int = Field(ge=0, description="Step of the exported checkpoint.")
    score: float | None = None
    adapter_path: RelPath | None = None
    merged_path: RelPath | None = None
    requested_by: str | None = Field(default=None, description="event_id of the ExportRequest this answers.")


class ExportRequest(Event):
    """Merge a finished run's exported adapter.

    A run that exported only its LoRA adapter gets its merged model too, made by the
    checkpoint service, which has torch loaded already; it answers with an ``ExportDone``
    naming this request (``requested_by``), or a dead letter saying why it could not.
    """

    KIND: ClassVar[str] = "export.request"
    reason: str = ""


# ---------------------------------------------------------------- evaluation
SPLIT_PATTERN = r"^(val|test|suite:[A-Za-z0-9_-]{1,40})$"


class EvalRequest(Event):
    """Evaluate a checkpoint."""

    KIND: ClassVar[str] = "eval.request"
    step: int = Field(ge=0)
    checkpoint: RelPath | None = Field(description="The checkpoint; None: the base model itself (a baseline).")
    base_model: RelPath | str
    adapter: bool = True
    split: str = Field(default="val", pattern=SPLIT_PATTERN, description="val, test, or suite:<name>.")
    purpose: Literal["periodic", "final", "manual", "baseline"] = "periodic"
    max_cases: int | None = Field(default=None, ge=1)


class Decision(BaseModel):
    """What a verdict is for, so that it can end once that is settled (sequential verdicts).

    The evaluator that plans a request fills it from the run's config and its latest feedback;
    every shard carries it, so any evaluator judges a prefix of the shards alike."""

    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="The feedback metric (a fraction in [0, 1] to be bounded).")
    confidence: float = Field(ge=0, lt=1, description="feedback.confidence: 0 = point estimates, no bound.")
    target: float | None = Field(default=None, description="The target to decide on; None: no stop at this step (min_step).")
    best_score: float | None = Field(default=None, description="The best verdict so far (its score).")
    best_bound: float | None = Field(default=None, description="The best verdict's lower bound.")
    early_end: bool = Field(default=False, description="End once settled; False: score every case (final, test, suites).")


class EvalShard(Event):
    """One slice of an eval request, on a work queue.

    Any evaluator process takes it; one killed mid-shard leaves it unacked and JetStream hands
    it to another after the ack wait.
    """

    KIND: ClassVar[str] = "eval.shard"
    request: EvalRequest
    shard: int = Field(ge=0)
    shards: int = Field(ge=1)
    cases_path: RelPath = Field(description="The split file the cases come from (pinned when planned).")
    start: int = Field(ge=0, description="First case of the slice, in the request's order.")
    end: int = Field(ge=0, description="One past the last case.")
    rows: list[int] | None = Field(default=None, description=(
        "The split's rows (0-based) this shard scores, in order; None: rows start..end. A sequential verdict "
        "takes the split in an order shuffled once per run."))
    decision: Decision | None = None
    planned: int = Field(default=0, ge=0, description="Cases of the whole request.")


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    output: str
    reason: str = Field(description="Each metric the case failed, with why (metric: why; ...).")
    category: str = ""
    scores: dict[str, float] = Field(default_factory=dict, description="The case's score on each metric.")


class EvalVerdict(Event):
    """Scores of one checkpoint."""

    KIND: ClassVar[str] = "eval.verdict"
    request_id: str = Field(description="event_id of the EvalRequest this answers.")
    step: int = Field(ge=0)
    checkpoint: RelPath | None = Field(description="None: the base model itself (a baseline).")
    split: str = Field(pattern=SPLIT_PATTERN)
    purpose: Literal["periodic", "final", "manual", "baseline"]
    cases: int = Field(ge=0)
    scores: dict[str, float] = Field(description=(
        "The task's metrics (fractions in [0, 1]), exact, and eval_loss / perplexity of the demonstrations; "
        "a test suite's cases: pass."))
    by_category: dict[str, dict[str, float]] = Field(default_factory=dict)
    mean_new_tokens: float = 0.0
    failures: list[Failure] = Field(default_factory=list, max_length=20)
    seconds: float = Field(default=0.0, description="From the request to the verdict.")
    shards: int = Field(default=1, ge=1)
    workers: list[str] = Field(default_factory=list, description="Evaluator processes that scored shards.")
    bounds: dict[str, list[float]] = Field(default_factory=dict, description=(
        "metric -> [lower, upper]: where its true score lies with probability `confidence` (an anytime-valid "
        "confidence sequence over the cases scored, tuneloop.bounds); fractions only."))
    confidence: float = Field(default=0.0, ge=0, lt=1)
    planned: int = Field(default=0, ge=0, description="Cases the request would score in full; `cases` < this: it ended early.")
    ended: str = Field(default="", description="Why scoring ended: every case scored, or the decision it settled.")


# ---------------------------------------------------------------- feedback
class Feedback(Event):
    """What the verdicts mean for training."""

    KIND: ClassVar[str] = "feedback"
    step: int = Field(ge=0, description="Step of the verdict this follows.")
    action: Literal["continue", "stop"]
    reason: str
    score: float
    best_step: int | None = None
    best_score: float | None = None
    weak_categories: list[str] = Field(default_factory=list)
    # The verdict itself, for guards on the metrics it reports (see tuneloop.guard).
    verdict_id: str | None = None
    request_id: str | None = Field(default=None, description="The eval request the verdict answers (which checkpoint).")
    scores: dict[str, float] = Field(default_factory=dict)
    bounds: dict[str, list[float]] = Field(default_factory=dict, description="The verdict's bounds (EvalVerdict.bounds).")
    best_bound: float | None = Field(default=None, description="The best verdict's lower bound (its score without bounds).")
    by_category: dict[str, dict[str, float]] = Field(default_factory=dict)
    mean_new_tokens: float | None = None


# ---------------------------------------------------------------- control
class Control(Event):
    """Steer a running job. Applied at the next step boundary."""

    KIND: ClassVar[str] = "control"
    command: str = Field(min_length=1, max_length=64, description="e.g. stop, set-lr. Unknown commands are rejected, not dropped.")
    value: float | str | None = None
    operator: str = ""
    guard: str | None = Field(default=None, max_length=200, description=(
        "Keep the change only while the next `within` verdicts meet this condition (e.g. correct>=0.9, any of the task's metrics); "
        "else roll back to the savepoint taken before it."))
    within: int | None = Field(default=None, ge=1, le=100, description="Verdicts the guard watches (default 1).")
    policy: str = Field(default="", max_length=64, description=(
        "The automatic policy that sent it (adaptive data, a sweep's pruner); empty for a person. "
        "With feedback.approve naming its command, it becomes a proposal instead."))


class ControlApplied(Event):
    """A control took effect."""

    KIND: ClassVar[str] = "control.applied"
    control_id: str
    command: str
    step: int = Field(ge=0)
    old: Any = None
    new: Any = None
    guard: str | None = None
    within: int | None = None
    savepoint_step: int | None = Field(default=None, description="A guarded control: the checkpoint saved just before it.")


class ControlRolledBack(Event):
    """A guarded control broke its guard; the run went back to its savepoint.

    Weights, optimizer, schedule, RNG, data position and the controls in force are the
    savepoint's again; the steps after it were discarded (their checkpoints deleted)."""

    KIND: ClassVar[str] = "control.rolled_back"
    control_id: str
    command: str
    value: Any = None
    guard: str
    step: int = Field(ge=0, description="The step the run was at when it rolled back.")
    savepoint_step: int = Field(ge=0)
    discarded_steps: list[int] = Field(default_factory=list, description="First and last step discarded.")
    verdict_step: int = Field(ge=0, description="The step of the verdict that broke the guard.")
    verdict_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="What the guard read from that verdict.")
    reverted: list[str] = Field(default_factory=list, description="Other controls applied since the savepoint, undone too.")
    discarded_saves: list[str] = Field(default_factory=list, description="event ids of the discarded checkpoints' ckpt.saved.")


class ControlConfirmed(Event):
    """A guarded control met its guard on ``within`` verdicts; it stays."""

    KIND: ClassVar[str] = "control.confirmed"
    control_id: str
    command: str
    guard: str
    step: int = Field(ge=0)
    savepoint_step: int = Field(ge=0)
    verdict_steps: list[int] = Field(default_factory=list)


class ControlRejected(Event):
    """A control was refused; the run is unchanged."""

    KIND: ClassVar[str] = "control.rejected"
    control_id: str
    command: str
    step: int = Field(ge=0)
    reason: str


# ---------------------------------------------------------------- approval gates
# What the automatic policies may be made to propose instead of doing (feedback.approve).
Gated = Literal["stop", "set-data", "prune"]


class Proposal(Event):
    """What an automatic policy wants to do, held for approval (feedback.approve).

    Its ``event_id`` is the id ``tuneloop approve RUN ID`` names. Training goes on while it waits."""

    KIND: ClassVar[str] = "proposal"
    command: Gated
    value: Any = None
    reason: str
    proposer: str = Field(description="The policy: feedback, adaptive data, a sweep's pruner.")
    step: int = Field(ge=0, description="The trainer's step when it was proposed.")
    verdict_step: int | None = None
    verdict_id: str | None = None
    score: float | None = None
    control_id: str | None = Field(default=None, description="The policy's control this holds (set-data, prune).")
    timeout_s: float = Field(gt=0)
    on_timeout: Literal["apply", "reject"]


class ProposalDecision(Event):
    """Approve or reject a proposal (only the operator identity may publish it)."""

    KIND: ClassVar[str] = "proposal.decision"
    proposal_id: str = Field(min_length=1, max_length=64)
    decision: Literal["approve", "reject"]
    operator: str = ""
    reason: str = Field(default="", max_length=500)


class ProposalResolved(Event):
    """How a proposal ended, and at which step."""

    KIND: ClassVar[str] = "proposal.resolved"
    proposal_id: str
    command: str
    outcome: Literal["approved", "rejected", "timed-out", "unknown"]
    applied: bool = Field(description="Whether the proposed action took effect.")
    step: int = Field(ge=0)
    by: str = ""
    reason: str = ""
    decision_id: str | None = Field(default=None, description="The proposal.decision this answers (none for a timeout).")


# ---------------------------------------------------------------- rewards (request/reply)
class RewardRequest(Event):
    """Score a batch of completions."""

    KIND: ClassVar[str] = "reward.score"
    DURABLE: ClassVar[bool] = False
    completions: list[str] = Field(max_length=4096)
    prompts: list[str | list[dict] | None] = Field(default_factory=list, description="Each completion's prompt, as the data set has it.")
    references: list[str | None] = Field(default_factory=list)
    categories: list[str | None] = Field(default_factory=list)
    columns: list[str | None] = Field(default_factory=list, description="Each item's other data columns, as JSON.")
    conversational: bool = Field(default=False, description="The data set is chats: functions get completions as messages.")
    weights: dict[str, float] = Field(default_factory=dict, description="Reward (a task metric or package.module:function) -> weight; empty: the task's first metric.")


class RewardReply(Event):
    KIND: ClassVar[str] = "reward.reply"
    DURABLE: ClassVar[bool] = False
    rewards: list[float | None]
    errors: list[str | None] = Field(default_factory=list)


# ---------------------------------------------------------------- operations
class DeadLetter(Event):
    """An event that could not be validated or handled, kept for inspection."""

    KIND: ClassVar[str] = "dlq"
    subject: str
    reason: str
    payload: str = Field(description="The raw message (truncated to 64 KiB).")
    service: str


EVENT_TYPES: tuple[type[Event], ...] = (
    RunQueued, RunForked, DatasetReady, MixtureRequest, DataSwitch, StepMetrics, CheckpointSaved, TrainingFinished, CheckpointRecorded, CheckpointsReleased,
    ExportDone, ExportRequest,
    EvalRequest, EvalShard, EvalVerdict, Feedback, Control, ControlApplied, ControlRejected,
    ControlRolledBack, ControlConfirmed, Proposal, ProposalDecision, ProposalResolved,
    RewardRequest, RewardReply, DeadLetter,
)
BY_KIND: dict[str, type[Event]] = {cls.KIND: cls for cls in EVENT_TYPES}
DURABLE_KINDS: tuple[str, ...] = tuple(cls.KIND for cls in EVENT_TYPES if cls.DURABLE)


def parse(cls: type[Event], data: bytes | str | dict[str, Any]) -> Event:
    """Validate raw JSON (or a dict) as ``cls``; raises pydantic.ValidationError with field paths."""
    if isinstance(data, dict):
        return cls.model_validate(data)
    return cls.model_validate_json(data)


def derived_id(prefix: str, *parts: object) -> str:
    """The event id of an event made from others (a shard of a request, the verdict of a
    shard set, the feedback on a verdict...): the same inputs give the same id, so a handler
    that runs again after a redelivery publishes a duplicate that JetStream drops; different
    inputs never share one, however long the run id and the source ids are (ids are at most
    64 characters: a long one keeps its start and ends in a hash of the whole)."""
    whole = "-".join([prefix, *map(str, parts)])
    if len(whole) <= 64:
        return whole
    return f"{whole[:43]}-{hashlib.sha256(whole.encode()).hexdigest()[:20]}"


def explain(err: ValidationError) -> str:
    """One line per problem, naming the field: what a log line or a dead letter should say."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg"))
        if e.get("type") == "value_error":  # our own validators' messages name the field themselves
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
