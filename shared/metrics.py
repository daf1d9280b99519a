"""The services' Prometheus metrics, and how the events a service publishes move them.

Most of what an operator wants to see is already in the events: a trainer's ``train.step``
carries loss, lr, grad norm and tokens/s; a ``control.applied`` is a control applied. So the
bus calls ``observe`` for every event this process publishes, and each service exports the
metrics of its own events on its /metrics port; only what never rides on an event (shard
timings, queue lag, reward latency) is measured where it happens.

Conventions: ``tuneloop_<area>_<what>[_<unit>]``, counters end in ``_total``, the run id is
the ``run_id`` label. The dashboards (``tuneloop.tools.dashboards``) query only these names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .events import (CheckpointRecorded, ControlApplied, ControlConfirmed, ControlRejected, ControlRolledBack, DatasetReady,
                     EvalVerdict, Event, ExportDone, Feedback, Proposal, ProposalResolved, StepMetrics)

R = ["run_id"]

# trainer
TRAIN_STEP = Gauge("tuneloop_train_step", "Last optimizer step reported.", R)
TRAIN_MAX_STEPS = Gauge("tuneloop_train_max_steps", "Steps the run is configured for.", R)
TRAIN_LOSS = Gauge("tuneloop_train_loss", "Training loss of the last logged step.", R)
TRAIN_LR = Gauge("tuneloop_train_learning_rate", "Learning rate of the last logged step.", R)
TRAIN_GRAD_NORM = Gauge("tuneloop_train_grad_norm", "Gradient norm of the last logged step.", R)
TRAIN_TOKENS = Counter("tuneloop_train_tokens_total", "Tokens trained (rate() of it: the throughput).", R)
TRAIN_REWARD = Gauge("tuneloop_train_reward", "GRPO: mean reward of the last logged step.", R)
TRAIN_PAUSED = Gauge("tuneloop_train_paused", "1 while the run is paused by a control.", R)
CONTROLS = Counter("tuneloop_controls_total", "Controls answered by the trainer.", R + ["command", "outcome"])
FEEDBACK = Counter("tuneloop_feedback_total", "Feedback events sent by the policy.", R + ["action"])
GUARDS = Counter("tuneloop_guards_total", "Guarded controls that ended: confirmed, or rolled back to their savepoint.",
                 R + ["command", "outcome"])
PROPOSALS = Counter("tuneloop_proposals_total", "Policy actions held for approval: proposed, then approved, rejected "
                    "or timed-out.", R + ["command", "outcome"])

# evaluator
EVAL_CASES = Counter("tuneloop_eval_cases_total", "Cases generated and scored.", R)
EVAL_CASES_SKIPPED = Counter("tuneloop_eval_cases_skipped_total",
                             "Cases a sequential verdict did not need: its decision was settled before.", R)
EVAL_SHARD_SECONDS = Histogram("tuneloop_eval_shard_seconds", "Time to score one shard (load, generate, check).", R,
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
EVAL_PENDING = Gauge("tuneloop_eval_shards_pending", "Shards waiting on the evaluators' work queue (queue lag).", R)
EVAL_SCORE = Gauge("tuneloop_eval_score", "Score of the last verdict (category 'all': overall).",
                   R + ["split", "metric", "category"])
EVAL_STEP = Gauge("tuneloop_eval_step", "Step of the last verdict per split.", R + ["split"])
EVAL_VERDICT_SECONDS = Histogram("tuneloop_eval_verdict_seconds", "From an eval request to its verdict.", R,
                                 buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

# rl-reward
REWARD_REQUESTS = Counter("tuneloop_reward_requests_total", "Reward requests answered.", R + ["outcome"])
REWARD_SECONDS = Histogram("tuneloop_reward_request_seconds", "Time to score one reward request.", R,
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
REWARD_ITEMS = Counter("tuneloop_reward_items_total", "Completions scored, per reward function and outcome.",
                       R + ["function", "outcome"])
REWARD_SUM = Counter("tuneloop_reward_sum_total", "Sum of the rewards given, per reward function (divide by items).",
                     R + ["function"])

# data-pipeline
DATA_ROWS = Counter("tuneloop_data_rows_total", "Rows prepared per split, and rows rejected.", R + ["split"])
DATA_SETS = Counter("tuneloop_data_sets_total", "Data sets announced.", R)
DATA_SOURCE_WEIGHT = Gauge("tuneloop_data_source_weight", "Share of each source in the current mixture.", R + ["source"])
DATA_CATEGORY_WEIGHT = Gauge("tuneloop_data_category_weight", "Weight of each category in train (1 = unchanged).",
                             R + ["category"])

# checkpoint
CHECKPOINTS = Counter("tuneloop_checkpoints_total", "Checkpoints verified and catalogued.", R)
CHECKPOINT_BYTES = Counter("tuneloop_checkpoint_bytes_total", "Bytes of the checkpoints catalogued.", R)
CHECKPOINT_SECONDS = Histogram("tuneloop_checkpoint_verify_seconds", "Time to hash and catalogue one checkpoint.", R,
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EXPORT_SECONDS = Histogram("tuneloop_export_seconds", "Time to export the best checkpoint (adapter and merged).", R,
                           buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
EXPORTS = Counter("tuneloop_exports_total", "Exports written.", R)


def observe(event: Event) -> None:
    """Move the metrics that ``event`` (published by this process) speaks for."""
    run = event.run_id
    if isinstance(event, StepMetrics):
        TRAIN_STEP.labels(run).set(event.step)
        TRAIN_MAX_STEPS.labels(run).set(event.max_steps)
        TRAIN_PAUSED.labels(run).set(1 if event.paused else 0)
        for gauge, value in ((TRAIN_LOSS, event.loss), (TRAIN_LR, event.learning_rate),
                             (TRAIN_GRAD_NORM, event.grad_norm), (TRAIN_REWARD, event.reward)):
            if value is not None:
                gauge.labels(run).set(value)
        if event.tokens:
            TRAIN_TOKENS.labels(run).inc(event.tokens)
    elif isinstance(event, ControlApplied):
        CONTROLS.labels(run, event.command, "applied").inc()
        if event.command in ("pause", "resume"):
            TRAIN_PAUSED.labels(run).set(1 if event.command == "pause" else 0)
    elif isinstance(event, ControlRejected):
        CONTROLS.labels(run, event.command, "rejected").inc()
    elif isinstance(event, ControlRolledBack):
        GUARDS.labels(run, event.command, "rolled_back").inc()
    elif isinstance(event, ControlConfirmed):
        GUARDS.labels(run, event.command, "confirmed").inc()
    elif isinstance(event, Proposal):
        PROPOSALS.labels(run, event.command, "proposed").inc()
    elif isinstance(event, ProposalResolved) and event.outcome != "unknown":
        PROPOSALS.labels(run, event.command, event.outcome).inc()
    elif isinstance(event, Feedback):
        FEEDBACK.labels(run, event.action).inc()
    elif isinstance(event, EvalVerdict):
        split = event.split
        EVAL_STEP.labels(run, split).set(event.step)
        EVAL_VERDICT_SECONDS.labels(run).observe(event.seconds)
        for metric, value in event.scores.items():
            EVAL_SCORE.labels(run, split, metric, "all").set(value)
        for category, scores in event.by_category.items():
            for metric, value in scores.items():
                if metric != "cases":
                    EVAL_SCORE.labels(run, split, metric, category).set(value)
    elif isinstance(event, DatasetReady):
        DATA_SETS.labels(run).inc()
        for split, info in event.splits.items():
            DATA_ROWS.labels(run, split).inc(info.rows)
        DATA_ROWS.labels(run, "rejected").inc(event.rejected_rows)
        for source, weight in event.mixture.items():
            DATA_SOURCE_WEIGHT.labels(run, source).set(weight)
        for category in event.splits["train"].categories if "train" in event.splits else {}:
            DATA_CATEGORY_WEIGHT.labels(run, category).set(event.category_weights.get(category, 1.0))
    elif isinstance(event, CheckpointRecorded):
        CHECKPOINTS.labels(run).inc()
        CHECKPOINT_BYTES.labels(run).inc(event.bytes)
    elif isinstance(event, ExportDone):
        EXPORTS.labels(run).inc()
