"""data-pipeline service: prepares the run's data and announces it with ``DatasetReady``;
prepares it again with other source weights on a ``MixtureRequest``."""

from __future__ import annotations

import asyncio
import logging

from tuneloop.bus import Reject
from tuneloop.events import DatasetReady, MixtureRequest, SplitInfo
from tuneloop.service import ServiceContext, run_service

from .prepare import DataError, prepare

log = logging.getLogger("tuneloop.data_pipeline")


async def announce(ctx: ServiceContext, run_id: str, request: MixtureRequest | None = None) -> DatasetReady:
    cfg = ctx.config(run_id)
    rdir = ctx.run_dir(run_id)
    weights = request.weights if request else None
    prepared = await asyncio.to_thread(prepare, cfg, rdir / "data", rdir, "tuneloop", weights)
    for r in prepared.rejected[:20]:
        log.warning("skipped bad row %s", r)
    event = DatasetReady(
        run_id=run_id,
        # Same data, same id: a restarted pipeline re-announces and JetStream drops the copy.
        event_id=f"data-{run_id}-{prepared.fingerprint[:24]}{'-' + request.event_id[:8] if request else ''}"[:64],
        dataset_id=prepared.fingerprint[:16], fingerprint=prepared.fingerprint,
        splits={k: SplitInfo(path=p, rows=n, categories=c) for k, (p, n, c) in prepared.splits.items()},
        chat_template="tuneloop", mixture=prepared.mixture, rejected_rows=len(prepared.rejected),
        requested_by=request.event_id if request else None,
    )
    await ctx.bus.publish(event)
    log.info("dataset %s ready: %s, mixture %s (rejected %d)", event.dataset_id,
             {k: v.rows for k, v in event.splits.items()}, event.mixture, event.rejected_rows)
    return event


async def main(ctx: ServiceContext) -> None:
    if ctx.run_id != "*":
        try:
            await announce(ctx, ctx.run_id)
        except DataError as e:
            log.error("data set for run %s rejected: %s", ctx.run_id, e)
            raise SystemExit(2) from e

    async def on_mixture(req: MixtureRequest) -> None:
        try:
            await announce(ctx, req.run_id, req)
        except DataError as e:  # a wrong request, not a broken service: dead-letter it with the reason
            raise Reject(str(e)) from e

    await ctx.bus.consume(MixtureRequest, ctx.run_id, on_mixture)
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("data-pipeline", main)
