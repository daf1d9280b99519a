"""Subject names: ``tuneloop.<run>.<kind>``. One place, so no service spells them by hand."""

from __future__ import annotations

import re

from .events import DURABLE_KINDS, RUN_ID_PATTERN

PREFIX = "tuneloop"
STREAM = "TUNELOOP"
AUDIT_STREAM = "TUNELOOP_AUDIT"
# What operators (and the feedback policy) did to runs, and the answers: kept longer, never purged.
AUDIT_KINDS = ("control", "control.applied", "control.rejected", "control.rolled_back", "control.confirmed",
               "data.mixture", "data.switch", "proposal", "proposal.decision", "proposal.resolved", "run.forked")
ALL_RUNS = "*"
# The JetStream KV buckets, with how long a key lives (None: until deleted). Who may write each
# is declared in topology.py (KV_WRITERS).
CHECKPOINT_BUCKET = "tuneloop-checkpoints"
SHARD_BUCKET = "tuneloop-eval-shards"
SWEEP_BUCKET = "tuneloop-sweeps"
POLICY_BUCKET = "tuneloop-policy"  # rl-reward's feedback policy, per run
BUCKETS: dict[str, float | None] = {CHECKPOINT_BUCKET: None, SHARD_BUCKET: 24 * 3600.0, SWEEP_BUCKET: None,
                                    POLICY_BUCKET: None}
_RUN_RE = re.compile(RUN_ID_PATTERN)


def check_run_id(run_id: str) -> str:
    if run_id != ALL_RUNS and not _RUN_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return run_id


def subject(run_id: str, kind: str) -> str:
    """``tuneloop.<run>.<kind>``; run_id may be ``*`` to match every run."""
    return f"{PREFIX}.{check_run_id(run_id)}.{kind}"


def stream_subjects() -> list[str]:
    """What the JetStream stream captures: every durable kind of every run.

    Request/reply kinds (reward.score) stay out on purpose: a stream that captures a
    request subject would answer the request itself with a PubAck.
    """
    return [f"{PREFIX}.*.{kind}" for kind in DURABLE_KINDS]


def run_of(subj: str) -> str:
    """The run id in a subject, or ``unknown`` when the subject is not ours."""
    parts = subj.split(".")
    if len(parts) >= 3 and parts[0] == PREFIX and _RUN_RE.match(parts[1]):
        return parts[1]
    return "unknown"


def kind_of(subj: str) -> str:
    parts = subj.split(".")
    return ".".join(parts[2:]) if len(parts) >= 3 else subj


def durable_name(service: str, run_id: str, kind: str) -> str:
    """Consumer name: replicas of one service on one run share it (a work queue)."""
    run = "all" if run_id == ALL_RUNS else run_id
    return f"{service}_{run}_{kind}".replace(".", "-")
