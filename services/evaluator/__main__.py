"""evaluator service: one verdict per eval request, computed by any number of replicas.

1. plan: the evaluator that takes an ``EvalRequest`` splits its cases into ``EvalShard``s
   (deterministic ids, so a redelivered request plans the same shards, stored once).
2. score: every evaluator takes shards from one work queue (a shared durable consumer), scores
   them and keeps the counts in the KV bucket ``tuneloop-eval-shards``. A process killed
   mid-shard never acks it; JetStream gives it to another after the ack wait.
3. verdict: whoever stores the last shard combines all of them into the ``EvalVerdict``. Its id
   derives from the request, so two evaluators finishing at once publish it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from datetime import datetime, timezone

from nats.js.errors import KeyNotFoundError

from tuneloop import metrics, subjects
from tuneloop.bus import Bus
from tuneloop.checks import parse_checks
from tuneloop.cores import CoreBudget
from tuneloop.config import FeedbackSection
from tuneloop.events import (DatasetReady, Decision, EvalRequest, EvalShard, EvalVerdict, Feedback, TrainingFinished,
                             derived_id)
from tuneloop.models import imports
from tuneloop.service import ServiceContext, consume_handlers, handles, on_torch_thread, run_service, warm_up
from tuneloop.storage import confine, resolve_model
from tuneloop.policy import ends_early
from tuneloop.task import EXACT, Judge, goal

from .generate import Models, generate, teacher_forced
from .suite import Case, ShardResult, combine, tally

log = logging.getLogger("tuneloop.evaluator")
SHARD_BUCKET = subjects.SHARD_BUCKET
SHARD_ACK_WAIT = 20.0  # a dead evaluator's shard goes to another after this long
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def load_cases(path, start: int, end: int, rows: list[int] | None = None) -> list[Case]:
    """Cases ``start``..``end`` (0-based rows, blank lines skipped) of a prepared split, or the
    rows ``rows`` in that order."""
    wanted = range(start, end) if rows is None else rows
    found: dict[int, Case] = {}
    # a range stays a range (``end`` may be "all": a set of it would hold a billion ints)
    keep = wanted if rows is None else set(rows)
    last, i = (end - 1 if rows is None else max(rows, default=-1)), 0
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            if i in keep:
                row = json.loads(line)
                checks = parse_checks(row["checks"]) if "checks" in row else None
                found[i] = Case(prompt=row["prompt"], category=row.get("category", "default"),
                                reference=row.get("reference"), weight=row.get("weight", 1.0), checks=checks,
                                completion=row.get("completion"), fields=json.loads(row.get("columns") or "{}"))
            i += 1
            if i > last:
                break
    return [found[r] for r in (sorted(found) if rows is None else rows) if r in found]


def plan(req: EvalRequest, dataset: DatasetReady, max_cases: int, shard_size: int,
         decision: Decision | None = None) -> list[EvalShard]:
    """The shards of a request, ``shard_size`` cases each: consecutive slices of the split, or
    for a sequential verdict (``decision.early_end``) slices of the split shuffled with a seed of
    the run's, so that every verdict of a run looks at the same cases in the same order and the
    order owes nothing to their scores (what the bound needs)."""
    split = dataset.splits.get(req.split)
    if split is None or not split.rows:
        raise ValueError(f"data set {dataset.dataset_id} has no {req.split!r} rows to evaluate on")
    n = min(split.rows, req.max_cases or max_cases)
    count = math.ceil(n / shard_size)
    order = random.Random(f"{req.run_id}:{split.path}").sample(range(split.rows), n) \
        if decision and decision.early_end else None
    return [EvalShard(run_id=req.run_id, event_id=derived_id("shard", req.event_id, i), request=req, shard=i, shards=count,
                      cases_path=split.path, start=i * shard_size, end=min((i + 1) * shard_size, n),
                      rows=order[i * shard_size:(i + 1) * shard_size] if order else None, decision=decision, planned=n)
            for i in range(count)]


def decision_of(req: EvalRequest, feedback: FeedbackSection, sequential: bool, latest: Feedback | None) -> Decision:
    """What the request's verdict is for: the run's feedback rule and its best so far. Only a
    periodic val verdict on a metric in [0, 1] may end early; the rest score every case."""
    early = sequential and req.purpose == "periodic" and req.split == "val" and feedback.confidence > 0 \
        and goal(feedback.metric or EXACT) == "max"
    return Decision(metric=feedback.metric or EXACT, confidence=feedback.confidence, early_end=early,
                    target=feedback.target if req.step >= feedback.min_step else None,
                    best_score=latest.best_score if latest else None, best_bound=latest.best_bound if latest else None)


def score_shard(ctx: ServiceContext, models: Models, sh: EvalShard, judge: Judge) -> ShardResult:
    """Blocking: load (or reuse) the model, generate, count. Runs on the torch thread."""
    t0 = time.perf_counter()
    req, run_dir = sh.request, ctx.run_dir(sh.run_id)
    cfg = ctx.config(sh.run_id)
    cases = load_cases(confine(run_dir, sh.cases_path), sh.start, sh.end, sh.rows)
    base = resolve_model(run_dir, req.base_model)
    checkpoint = None if req.checkpoint is None else confine(run_dir, req.checkpoint)  # None: a baseline
    model, tokenizer, adapters_on = models.get(base, checkpoint, req.adapter)
    t1 = time.perf_counter()
    outputs, counts = generate(model, tokenizer, [c.prompt for c in cases], cfg.eval.max_new_tokens, cfg.eval.batch_size,
                               adapters_on)
    demos = [i for i, c in enumerate(cases) if c.completion]
    nll = teacher_forced(model, tokenizer, [cases[i].prompt for i in demos], [cases[i].completion for i in demos],
                         cfg.eval.batch_size, adapters_on) if demos else []
    losses: list = [None] * len(cases)
    for i, x in zip(demos, nll):
        losses[i] = x
    t2 = time.perf_counter()
    result = tally(sh.shard, cases, outputs, counts, judge, losses)
    t3 = time.perf_counter()
    result.seconds, result.worker = t3 - t0, WORKER
    result.load_seconds, result.generate_seconds, result.score_seconds = t1 - t0, t2 - t1, t3 - t2
    result.finished = datetime.now(timezone.utc)
    return result


def verdict_of(sh: EvalShard, results: list[ShardResult], ended: str = "") -> EvalVerdict:
    req, confidence = sh.request, sh.decision.confidence if sh.decision else 0.0
    r = combine(results, confidence)
    return EvalVerdict(
        run_id=req.run_id, request_id=req.event_id, event_id=derived_id("verdict", req.event_id),
        step=req.step, checkpoint=req.checkpoint, split=req.split, purpose=req.purpose, cases=r.cases,
        scores=r.scores, by_category=r.by_category, failures=r.failures, mean_new_tokens=r.mean_new_tokens,
        seconds=(datetime.now(timezone.utc) - req.time).total_seconds(), shards=len(results),
        workers=sorted({x.worker for x in results}), bounds=r.bounds, confidence=confidence if r.bounds else 0.0,
        planned=sh.planned or r.cases,
        ended=ended or f"all {r.cases} cases scored",
    )


def ended_early(sh: EvalShard, results: list[ShardResult]) -> str | None:
    """Why the first ``len(results)`` shards settle the verdict's decision, or None."""
    d = sh.decision
    if d is None or not d.early_end or len(results) >= sh.shards:
        return None
    r = combine(results, d.confidence)
    if d.metric not in r.bounds:  # weighted cases, or a metric with no cases yet: go on
        return None
    return ends_early(d, r.bounds, r.scores[d.metric], r.cases, sh.planned or r.cases)


def settled_key(sh: EvalShard) -> str:
    return f"{sh.run_id}.{sh.request.event_id}.settled"


async def finish(bus: Bus, kv, sh: EvalShard) -> EvalVerdict | None:
    """Publish the verdict once the shards in KV settle it: every shard, or for a sequential
    verdict the first prefix of shards (0..k, in order) whose bound settles its decision.
    Whoever sees it first publishes it; any evaluator finds the same prefix, so the verdict is
    the same whichever does.

    Each shard's key is known, so this reads them one by one: a KV *watch* can announce "no
    more stored entries" before delivering one that was just written (seen under load: one
    verdict in 300 went missing), a direct get cannot."""
    results: list[ShardResult] = []
    for i in range(sh.shards):
        try:
            entry = await kv.get(f"{sh.run_id}.{sh.request.event_id}.{i:04d}")
        except KeyNotFoundError:
            return None  # another evaluator still has this shard; it will finish the request
        results.append(ShardResult.model_validate_json(entry.value))
        why = ended_early(sh, results)
        if why:
            await kv.put(settled_key(sh), why.encode())  # the shards still queued are skipped
            verdict = verdict_of(sh, results, why)
            await bus.publish(verdict)
            return verdict
    verdict = verdict_of(sh, results)
    await bus.publish(verdict)  # same id from any evaluator: JetStream keeps one
    return verdict


async def is_settled(kv, sh: EvalShard) -> bool:
    if sh.decision is None or not sh.decision.early_end:
        return False
    try:
        await kv.get(settled_key(sh))
        return True
    except KeyNotFoundError:
        return False


async def pruned(bus: Bus, run_id: str) -> bool:
    """Whether ``run_id`` was pruned: its checkpoints are being released, its work is void."""
    done = await bus.latest(TrainingFinished, run_id)
    return done is not None and done.reason == "pruned"


class EvaluatorService:
    """The service's handlers, each declared beside its code with what it consumes (``handles``)."""

    def __init__(self, ctx: ServiceContext, kv, budget: CoreBudget | None = None, threads: int = 1):
        self.ctx, self.kv, self.models = ctx, kv, Models()
        self.judges: dict[tuple, Judge] = {}
        self.budget, self.threads = budget, threads  # beside a trainer: cores borrowed while scoring

    @handles(EvalRequest, ack_wait=60, max_deliver=3)
    async def on_request(self, req: EvalRequest) -> None:
        ctx = self.ctx
        if await pruned(ctx.bus, req.run_id):
            log.info("run %s was pruned: not evaluating step %d", req.run_id, req.step)
            return
        dataset = await ctx.bus.latest(DatasetReady, req.run_id)
        if dataset is None:
            raise RuntimeError(f"run {req.run_id} has no data set yet")
        cfg = ctx.config(req.run_id)
        latest = await ctx.bus.latest(Feedback, req.run_id)
        decision = decision_of(req, cfg.feedback, cfg.eval.sequential, latest)
        shards = plan(req, dataset, cfg.eval.max_cases, cfg.eval.shard_size, decision)
        for sh in shards:
            await ctx.bus.publish(sh)
        log.info("step %d %s: %d cases in %d shards", req.step, req.split, shards[-1].end, len(shards))

    @handles(EvalShard, ack_wait=SHARD_ACK_WAIT, max_deliver=5)
    async def on_shard(self, sh: EvalShard) -> None:
        if await pruned(self.ctx.bus, sh.run_id):  # the pool's time goes to trials still running
            return
        if await is_settled(self.kv, sh):  # an earlier prefix of shards settled the verdict
            metrics.EVAL_CASES_SKIPPED.labels(sh.run_id).inc(sh.end - sh.start)
            return
        log.info("shard %d/%d of step %d %s: cases %d-%d", sh.shard + 1, sh.shards, sh.request.step,
                 sh.request.split, sh.start, sh.end)
        with self.budget.borrow(self.threads) if self.budget else contextlib.nullcontext():
            result = await on_torch_thread(self.score, sh)
        metrics.EVAL_CASES.labels(sh.run_id).inc(sh.end - sh.start)
        metrics.EVAL_SHARD_SECONDS.labels(sh.run_id).observe(result.seconds)
        await self.kv.put(f"{sh.run_id}.{sh.request.event_id}.{sh.shard:04d}", result.model_dump_json().encode())
        verdict = await finish(self.ctx.bus, self.kv, sh)
        if verdict:
            log.info("step %d %s: %s (%d of %d cases, %d shards, %.1fs; %s)", verdict.step, verdict.split,
                     " ".join(f"{k} {v:.3f}" for k, v in verdict.scores.items()), verdict.cases, verdict.planned,
                     verdict.shards, verdict.seconds, verdict.ended)

    def score(self, sh: EvalShard) -> ShardResult:
        """Blocking, on the torch thread: the shard's cases generated and counted."""
        return score_shard(self.ctx, self.models, sh, self.judge(sh.run_id))

    def judge(self, run_id: str) -> Judge:
        """The run's task with its functions imported (once per run and config)."""
        cfg = self.ctx.config(run_id)
        key = (run_id, cfg.task.model_dump_json(), cfg.base_dir)
        if key not in self.judges:
            self.judges[key] = Judge(cfg.task, cfg.base_dir)
        return self.judges[key]


async def main(ctx: ServiceContext) -> None:
    budget = CoreBudget.from_env()  # beside a trainer (tuneloop run): borrow cores while scoring
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    service = EvaluatorService(ctx, await ctx.bus.key_value(SHARD_BUCKET), budget, threads)
    warm_up(imports)  # torch loaded while the trainer's first steps run, not when the first shard arrives
    await consume_handlers(ctx.bus, ctx.run_id, service)
    with budget.present(threads) if budget else contextlib.nullcontext():
        await watch_queue(ctx)


async def watch_queue(ctx: ServiceContext, every: float = 2.0) -> None:
    """Keep ``tuneloop_eval_shards_pending`` (the work queue's lag) current until stopped."""
    while not ctx.stop.is_set():
        try:
            metrics.EVAL_PENDING.labels(ctx.run_id).set(await ctx.bus.pending(EvalShard, ctx.run_id))
        except Exception as e:  # a metric is not worth failing the service for
            log.debug("queue lag unavailable: %r", e)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), every)


if __name__ == "__main__":
    run_service("evaluator", main)
