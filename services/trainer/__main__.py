"""trainer service: waits for the run's data set, trains, and answers controls meanwhile."""

from __future__ import annotations

import asyncio
import logging

from tuneloop.events import Control, ControlRejected, DatasetReady, Feedback, TrainingFinished
from tuneloop.service import ServiceContext, on_torch_thread, run_service

from . import recipe
from .link import BusLink

log = logging.getLogger("tuneloop.trainer")


async def main(ctx: ServiceContext) -> None:
    if ctx.run_id == "*":
        raise SystemExit("the trainer trains one run: pass --run-id or TUNELOOP_RUN_ID")
    run_id, bus = ctx.run_id, ctx.bus
    dataset = await bus.wait_latest(DatasetReady, run_id, ctx.stop)
    if dataset is None:
        return
    log.info("dataset %s: %s", dataset.dataset_id, {k: v.rows for k, v in dataset.splits.items()})

    link = BusLink(bus, asyncio.get_running_loop())
    await bus.consume(Control, run_id, link.deliver, concurrency=64, ack_wait=60)
    await bus.consume(Feedback, run_id, link.deliver, concurrency=64, ack_wait=60)
    stopper = asyncio.create_task(_forward_stop(ctx, link))

    cfg = ctx.config(run_id)
    try:
        finished = await on_torch_thread(recipe.train, cfg, run_id, ctx.run_dir(run_id), dataset, link)
    except Exception as e:
        log.exception("training failed")
        finished = TrainingFinished(run_id=run_id, step=0, reason="error", detail=f"{type(e).__name__}: {e}")
    stopper.cancel()
    await bus.publish(finished)
    # Whatever arrives now can no longer take effect: say so instead of leaving the operator waiting.
    for event, done in link.drain():
        if isinstance(event, Control):
            await bus.publish(ControlRejected(run_id=run_id, control_id=event.event_id, command=event.command,
                                              step=finished.step, reason="training has finished"))
        done()
    if finished.reason == "error":
        raise SystemExit(1)


async def _forward_stop(ctx: ServiceContext, link: BusLink) -> None:
    await ctx.stop.wait()
    link.stopping.set()


if __name__ == "__main__":
    run_service("trainer", main)
