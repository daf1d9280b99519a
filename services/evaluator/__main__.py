"""evaluator service: one verdict per eval request. Replicas share the request queue."""

from __future__ import annotations

import json
import logging
import time

from tuneloop.events import DatasetReady, EvalRequest, EvalVerdict
from tuneloop.service import ServiceContext, on_torch_thread, run_service
from tuneloop.storage import confine, resolve_model

from .generate import generate, load_for_eval
from .suite import Case, score

log = logging.getLogger("tuneloop.evaluator")


def load_cases(path, limit: int) -> list[Case]:
    cases = []
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                cases.append(Case(prompt=row["prompt"], category=row.get("category", "default"), reference=row.get("reference")))
            if len(cases) >= limit:
                break
    return cases


def evaluate(ctx: ServiceContext, req: EvalRequest, dataset: DatasetReady) -> EvalVerdict:
    """Blocking: load, generate, score. Runs in a worker thread."""
    t0 = time.perf_counter()
    run_dir = ctx.run_dir(req.run_id)
    cfg = ctx.config(req.run_id)
    checkpoint = confine(run_dir, req.checkpoint)
    base = resolve_model(run_dir, req.base_model)
    if req.split not in dataset.splits or not dataset.splits[req.split].rows:
        raise ValueError(f"data set {dataset.dataset_id} has no {req.split!r} rows to evaluate on")
    cases = load_cases(confine(run_dir, dataset.splits[req.split].path), req.max_cases or cfg.eval.max_cases)
    model, tokenizer = load_for_eval(base, checkpoint, req.adapter)
    outputs, counts = generate(model, tokenizer, [c.prompt for c in cases], cfg.eval.max_new_tokens, cfg.eval.batch_size)
    result = score(cases, outputs)
    return EvalVerdict(
        run_id=req.run_id, request_id=req.event_id, event_id=f"verdict-{req.event_id}"[:64],
        step=req.step, checkpoint=req.checkpoint, split=req.split, purpose=req.purpose, cases=len(cases),
        scores=result.scores, by_category=result.by_category, failures=result.failures,
        mean_new_tokens=sum(counts) / max(len(counts), 1), seconds=time.perf_counter() - t0,
    )


async def main(ctx: ServiceContext) -> None:
    async def on_request(req: EvalRequest) -> None:
        dataset = await ctx.bus.latest(DatasetReady, req.run_id)
        if dataset is None:
            raise RuntimeError(f"run {req.run_id} has no data set yet")
        verdict = await on_torch_thread(evaluate, ctx, req, dataset)
        # event_id derives from the request: a redelivered request yields a duplicate JetStream drops.
        await ctx.bus.publish(verdict)
        log.info("step %d %s: protocol %.3f correctness %.3f (%d cases, %.1fs)", verdict.step, verdict.split,
                 verdict.scores["protocol"], verdict.scores["correctness"], verdict.cases, verdict.seconds)

    await ctx.bus.consume(EvalRequest, ctx.run_id, on_request, ack_wait=120, max_deliver=3)
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("evaluator", main)
