"""data-pipeline service: prepares the run's data and announces it with ``DatasetReady``."""

from __future__ import annotations

import asyncio
import logging

from tuneloop.events import DatasetReady, SplitInfo
from tuneloop.service import ServiceContext, run_service

from .prepare import DataError, prepare

log = logging.getLogger("tuneloop.data_pipeline")


async def announce(ctx: ServiceContext, run_id: str) -> DatasetReady:
    cfg = ctx.config(run_id)
    rdir = ctx.run_dir(run_id)
    prepared = await asyncio.to_thread(prepare, cfg, rdir / "data", rdir)
    for r in prepared.rejected[:20]:
        log.warning("skipped bad row %s", r)
    event = DatasetReady(
        run_id=run_id,
        # Same data, same id: a restarted pipeline re-announces and JetStream drops the copy.
        event_id=f"data-{run_id}-{prepared.fingerprint[:24]}"[:64],
        dataset_id=prepared.fingerprint[:16], fingerprint=prepared.fingerprint,
        splits={k: SplitInfo(path=p, rows=n, categories=c) for k, (p, n, c) in prepared.splits.items()},
        chat_template="tuneloop", mixture=prepared.mixture, rejected_rows=len(prepared.rejected),
    )
    await ctx.bus.publish(event)
    log.info("dataset %s ready: %s (rejected %d)", event.dataset_id,
             {k: v.rows for k, v in event.splits.items()}, event.rejected_rows)
    return event


async def main(ctx: ServiceContext) -> None:
    if ctx.run_id != "*":
        try:
            await announce(ctx, ctx.run_id)
        except DataError as e:
            log.error("data set for run %s rejected: %s", ctx.run_id, e)
            raise SystemExit(2) from e
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("data-pipeline", main)
