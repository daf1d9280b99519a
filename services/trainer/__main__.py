"""trainer service: waits for the run's data set, trains, and answers controls meanwhile.

With ``--processes N`` (or ``train.processes`` in the config) the service re-executes itself
under torchrun: rank 0 runs ``main`` (the bus), the other ranks run ``follow`` (no bus; they
get everything from rank 0 at step boundaries, see ``distributed``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

from tuneloop.events import Control, ControlRejected, DatasetReady, Feedback, TrainingFinished
from tuneloop.service import ServiceContext, on_torch_thread, parent_gone, parse_args, run_service, setup_logging
from tuneloop.storage import load_run_config, run_dir

from . import distributed, recipe
from .callback import latest_intact, read_state
from .link import BusLink, FollowerLink

log = logging.getLogger("tuneloop.trainer")


async def main(ctx: ServiceContext) -> None:
    run_id, bus = ctx.run_id, ctx.bus
    cfg = ctx.config(run_id)
    await on_torch_thread(distributed.init, recipe.uses_cuda(cfg))
    link = BusLink(bus, asyncio.get_running_loop())
    link.start()
    await bus.follow(DatasetReady, run_id, link.remember_dataset)
    dataset = await bus.wait_latest(DatasetReady, run_id, ctx.stop)
    if dataset is not None:
        dataset = await _dataset_to_resume(link, dataset, ctx.run_dir(run_id))
    await on_torch_thread(distributed.broadcast, dataset)  # None tells the other ranks to leave
    if dataset is None:
        return
    log.info("dataset %s: %s", dataset.dataset_id, {k: v.rows for k, v in dataset.splits.items()})

    await bus.consume(Control, run_id, link.deliver, concurrency=64, ack_wait=60)
    await bus.consume(Feedback, run_id, link.deliver, concurrency=64, ack_wait=60)
    stopper = asyncio.create_task(_forward_stop(ctx, link))

    try:
        finished = await on_torch_thread(recipe.train, cfg, run_id, ctx.run_dir(run_id), dataset, link)
    except Exception as e:
        log.exception("training failed")
        finished = TrainingFinished(run_id=run_id, step=0, reason="error", detail=f"{type(e).__name__}: {e}")
    stopper.cancel()
    await link.close()
    await bus.publish(finished)
    # Whatever arrives now can no longer take effect: say so instead of leaving the operator waiting.
    for event, done in link.drain():
        if isinstance(event, Control):
            await bus.publish(ControlRejected(run_id=run_id, control_id=event.event_id, command=event.command,
                                              step=finished.step, reason="training has finished"))
        done()
    if finished.reason == "error":
        raise SystemExit(1)


async def _dataset_to_resume(link: BusLink, latest: DatasetReady, rdir) -> DatasetReady:
    """A fresh run trains on the newest data set; a resumed one on the data set its checkpoint names."""
    ckpt = latest_intact(rdir / "checkpoints")
    want = read_state(ckpt).dataset_id if ckpt else ""
    if not want or want == latest.dataset_id:
        return latest
    for _ in range(100):  # the replay of announced data sets is under way
        if want in link.datasets:
            return link.datasets[want]
        await asyncio.sleep(0.1)
    raise SystemExit(f"{ckpt} trains on data set {want}, which was never announced for this run")


async def _forward_stop(ctx: ServiceContext, link: BusLink) -> None:
    await ctx.stop.wait()
    link.stopping.set()


def follow(args: argparse.Namespace) -> None:
    """Ranks 1..N-1: train in lockstep with rank 0, which speaks for all of them on the bus."""
    setup_logging(f"trainer[{distributed.rank()}]", args.log_level)
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop, at a step boundary
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_parents([args.parent_pid, args.launcher_pid])
    cfg = load_run_config(args.storage, args.run_id)
    distributed.init(recipe.uses_cuda(cfg))
    dataset = distributed.broadcast(None)
    if dataset is None:
        return
    recipe.train(cfg, args.run_id, run_dir(args.storage, args.run_id), dataset, FollowerLink())


def _exit_with_parents(pids: list[int]) -> None:
    def watch():
        while parent_gone([p for p in pids if p]) is None:
            time.sleep(1.0)
        os._exit(1)  # rank 0 saves what can be saved; a lone follower has nothing to add

    threading.Thread(target=watch, daemon=True, name="watchdog").start()


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=int(os.environ.get("TUNELOOP_PROCESSES", "0")),
                   help="training processes on this machine (default: train.processes in the run's config)")


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args("trainer", argv, extra=_flags)
    if args.run_id == "*":
        raise SystemExit("the trainer trains one run: pass --run-id or TUNELOOP_RUN_ID")
    if distributed.launched():
        distributed.die_with_launcher()
        args.launcher_pid = os.getppid()  # torchrun (if it went before the line above took effect)
        if distributed.rank() > 0:
            return follow(args)
        return run_service("trainer", main, args=args)
    processes = args.processes or load_run_config(args.storage, args.run_id).train.processes
    if processes > 1:
        os.execv(sys.executable, distributed.torchrun_argv(processes, argv))
    run_service("trainer", main, args=args)


if __name__ == "__main__":
    cli()
