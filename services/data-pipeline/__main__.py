"""data-pipeline service: prepares the run's data and announces it with ``DatasetReady``.

- Serving every run (``--run-id '*'``, a pool), it prepares each run queued (``RunQueued``).
- On a ``MixtureRequest`` (operator: ``tuneloop data``) it prepares the data again with other
  source weights and announces the new data set.
- With ``data.adapt.enabled``, on ``Feedback`` naming weak categories it weighs those up in
  train, announces the new data set and asks the trainer to switch to it (``DataSwitch``, which
  the trainer applies as ``set-data`` at a step boundary, answered and audited like a control).
"""

from __future__ import annotations

import asyncio
import logging

from tuneloop.events import (ControlApplied, DataSwitch, DatasetReady, Feedback, MixtureRequest, Reject, RunQueued, SplitInfo,
                             derived_id)
from tuneloop.service import ServiceContext, consume_handlers, handles, run_service
from tuneloop.storage import RunDir
from tuneloop.subjects import ALL_RUNS

from .prepare import DataError, adapt_weights, evidence_is_new, prepare

log = logging.getLogger("tuneloop.data_pipeline")


async def applied_at(ctx: ServiceContext, run_id: str, dataset_id: str) -> int | None:
    """The step at which the trainer switched ``run_id`` to ``dataset_id`` (set-data), or None."""
    steps = [a.step for a in await ctx.bus.history(ControlApplied, run_id) if a.command == "set-data" and a.new == dataset_id]
    return steps[-1] if steps else None


async def announce(ctx: ServiceContext, run_id: str, *, weights: dict[str, float] | None = None,
                   category_weights: dict[str, float] | None = None, requested_by: str | None = None) -> DatasetReady:
    cfg = ctx.config(run_id)
    rdir = ctx.run_dir(run_id)
    if category_weights is None:
        category_weights = cfg.data.category_weights
    prepared = await asyncio.to_thread(prepare, cfg, RunDir(rdir).data, rdir, cfg.model.template(), weights, category_weights)
    for r in prepared.rejected[:20]:
        log.warning("skipped bad row %s", r)
    for line in prepared.quality.lines():
        log.info("%s", line)
    event = DatasetReady(
        run_id=run_id,
        # Same data, same id: a restarted pipeline re-announces and JetStream drops the copy.
        event_id=derived_id("data", run_id, prepared.fingerprint[:24], *([requested_by] if requested_by else [])),
        dataset_id=prepared.fingerprint[:16], fingerprint=prepared.fingerprint,
        splits={k: SplitInfo(path=p, rows=n, categories=c) for k, (p, n, c) in prepared.splits.items()},
        chat_template=cfg.model.template(), mixture=prepared.mixture, category_weights=category_weights or {},
        rejected_rows=len(prepared.rejected), quality=prepared.quality.summary(), augmented_rows=prepared.augmented,
        requested_by=requested_by,
    )
    await ctx.bus.publish(event)
    log.info("dataset %s ready: %s, mixture %s, category weights %s (rejected %d, augmented %d)", event.dataset_id,
             {k: v.rows for k, v in event.splits.items()}, event.mixture, event.category_weights, event.rejected_rows,
             event.augmented_rows)
    return event


class DataService:
    """The service's handlers, each declared beside its code with what it consumes (``handles``;
    a pool's queued runs are consumed only by a pool: see ``main``)."""

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def on_queued(self, ev: RunQueued) -> None:
        """A pool serving every run: prepare each queued run's data (a sweep's trials)."""
        try:
            await announce(self.ctx, ev.run_id)
        except DataError as e:  # the run cannot start; the dead letter names why, the pool goes on
            raise Reject(f"data set for run {ev.run_id} rejected: {e}") from e

    @handles(MixtureRequest)
    async def on_mixture(self, req: MixtureRequest) -> None:
        current = await self.ctx.bus.latest(DatasetReady, req.run_id)
        try:
            await announce(self.ctx, req.run_id, weights=req.weights, requested_by=req.event_id,
                           category_weights=current.category_weights if current else None)
        except DataError as e:  # a wrong request, not a broken service: dead-letter it with the reason
            raise Reject(str(e)) from e

    @handles(Feedback)
    async def on_feedback(self, fb: Feedback) -> None:
        ctx = self.ctx
        adapt = ctx.config(fb.run_id).data.adapt
        if not adapt.enabled or fb.action != "continue" or not fb.weak_categories:
            return
        current = await ctx.bus.latest(DatasetReady, fb.run_id)
        if current is not None and current.requested_by:  # the mixture was changed already: since when?
            switched_at = await applied_at(ctx, fb.run_id, current.dataset_id)
            if not evidence_is_new(fb.step, switched_at, adapt.cooldown_steps):
                log.info("feedback of step %d: not acting, the mixture %s %s", fb.step, current.dataset_id,
                         "is not applied yet" if switched_at is None else
                         f"was applied at step {switched_at} (cooldown {adapt.cooldown_steps} steps)")
                return
        before = current.category_weights if current else {}
        categories = list(current.splits["train"].categories) if current else []
        after = adapt_weights(before, fb.weak_categories, categories, adapt.boost, adapt.max_weight)
        if after == before:
            return  # weak categories already at the cap, or all of them weak: nothing to shift
        ready = await announce(ctx, fb.run_id, weights=dict(current.mixture) if current else None,
                               category_weights=after, requested_by=fb.event_id)
        log.info("feedback of step %d: weak %s -> category weights %s", fb.step, fb.weak_categories, after)
        await ctx.bus.publish(DataSwitch(run_id=fb.run_id, event_id=derived_id("adapt", fb.event_id),
                                         dataset_id=ready.dataset_id, requested_by=fb.event_id))


async def main(ctx: ServiceContext) -> None:
    service = DataService(ctx)
    if ctx.run_id != ALL_RUNS:
        try:
            await announce(ctx, ctx.run_id)
        except DataError as e:
            log.error("data set for run %s rejected: %s", ctx.run_id, e)
            raise SystemExit(2) from e
    else:
        await ctx.bus.consume(RunQueued, ctx.run_id, service.on_queued)
    await consume_handlers(ctx.bus, ctx.run_id, service)
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("data-pipeline", main)
