"""trainer service: waits for the run's data set, trains, and answers controls meanwhile.

With ``--run-id '*'`` it is a pool worker: it takes queued runs (``RunQueued``, e.g. a sweep's
trials) from a work queue one after another, in one process.

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
from pathlib import Path

from tuneloop.checkpoints import DiskFull, latest_intact, read_state, verify
from tuneloop.events import (CheckpointRecorded, Control, DataSwitch, DatasetReady, DeadLetter, Feedback, ProposalDecision,
                             RunQueued, TrainingFinished)
from tuneloop.service import ServiceContext, consume_handlers, handles, on_torch_thread, parent_gone, parse_args, run_log, run_service, setup_logging
from tuneloop.subjects import ALL_RUNS
from tuneloop.storage import RunDir, load_run_config, run_dir

from . import distributed, recipe
from .link import BusLink, FollowerLink, too_late

log = logging.getLogger("tuneloop.trainer")


async def main(ctx: ServiceContext) -> None:
    if ctx.run_id == ALL_RUNS:
        return await serve_pool(ctx)
    await train_run(ctx, ctx.run_id)


async def serve_pool(ctx: ServiceContext) -> None:
    """A trainer worker: runs queued (``RunQueued``) one after another, in this process, so
    torch and transformers are imported once for all of them (a sweep's trials)."""
    pool = Pool(ctx)
    # One run at a time; the message stays in progress while it trains (a dead worker's run goes to another).
    await consume_handlers(ctx.bus, ALL_RUNS, pool)
    await ctx.stop.wait()
    await pool.idle.wait()  # a run in progress saves its checkpoint and says 'interrupted' before the process ends


class Pool:
    """The pool worker's handler, declared beside its code with what it consumes (``handles``)."""

    def __init__(self, ctx: ServiceContext, train=None):
        self.ctx = ctx
        self.train = train or (lambda run_id: train_run(ctx, run_id, in_pool=True))
        self.idle = asyncio.Event()
        self.idle.set()

    @handles(RunQueued, ack_wait=30, max_deliver=20)
    async def on_queued(self, ev: RunQueued) -> None:
        ctx = self.ctx
        if ctx.stop.is_set():
            raise asyncio.CancelledError  # not acked: whoever serves the queue next takes it
        latest = await ctx.bus.latest(RunQueued, ev.run_id)
        if latest is not None and latest.event_id != ev.event_id:
            log.info("run %s: queued again since (attempt %d); this older request is void", ev.run_id, latest.attempt)
            return
        done = await ctx.bus.latest(TrainingFinished, ev.run_id)
        if done is not None and done.reason != "interrupted" and done.time > ev.time:
            log.info("run %s already finished (%s); nothing to train", ev.run_id, done.reason)
            return
        self.idle.clear()
        try:
            with run_log(RunDir(ctx.run_dir(ev.run_id)).log("trainer")):
                log.info("worker %d takes run %s (attempt %d)", os.getpid(), ev.run_id, ev.attempt)
                await self.train(ev.run_id)
        finally:
            self.idle.set()


async def train_run(ctx: ServiceContext, run_id: str, in_pool: bool = False) -> None:
    """Serve one run: wait for its data set, train, answer controls meanwhile, say how it ended."""
    bus = ctx.bus
    cfg = ctx.config(run_id)
    if in_pool and cfg.train.processes > 1:
        await bus.publish(TrainingFinished(run_id=run_id, step=0, reason="error",
                                           detail="a pool trainer trains one process per run; start a trainer "
                                                  f"with --run-id {run_id} for train.processes {cfg.train.processes}"))
        return
    await on_torch_thread(distributed.init, recipe.uses_cuda(cfg))
    link = BusLink(bus, asyncio.get_running_loop())
    link.start()
    announced = asyncio.Event()

    async def on_dataset(ev: DatasetReady) -> None:
        await link.remember_dataset(ev)
        announced.set()

    replay = await bus.follow(DatasetReady, run_id, on_dataset)
    try:
        dataset = await wait_for_data(ctx, run_id, announced)
    except DataUnavailable as e:
        await bus.publish(TrainingFinished(run_id=run_id, step=0, reason="error", detail=str(e)))
        dataset = None
    if dataset is not None:
        link.recorded = {r.path: r.sha256 for r in await bus.history(CheckpointRecorded, run_id)}  # newest wins
        dataset, resume = await _dataset_to_resume(link, dataset, ctx.run_dir(run_id))
    if not in_pool:
        await on_torch_thread(distributed.broadcast, dataset)  # None tells the other ranks to leave
    if dataset is None:
        await replay.unsubscribe()
        await link.close()
        return
    log.info("dataset %s: %s", dataset.dataset_id, {k: v.rows for k, v in dataset.splits.items()})

    consumers = [await bus.consume(kind, run_id, link.deliver, concurrency=64, ack_wait=60)
                 for kind in (Control, DataSwitch, Feedback, ProposalDecision)]
    stopper = asyncio.create_task(_forward_stop(ctx, link))

    try:
        finished = await on_torch_thread(recipe.train, cfg, run_id, ctx.run_dir(run_id), dataset, link, resume)
    except DiskFull as e:
        log.error("training stopped: %s", e)
        finished = TrainingFinished(run_id=run_id, step=e.step, reason="error", detail=f"disk full: {e.strerror}")
    except Exception as e:
        log.exception("training failed")
        finished = TrainingFinished(run_id=run_id, step=0, reason="error", detail=f"{type(e).__name__}: {e}")
    stopper.cancel()
    await link.close()
    await bus.publish(finished)
    # Whatever arrives now can no longer take effect: say so instead of leaving the operator waiting.
    await link.end(too_late(bus, run_id, finished.step))
    for task in consumers:
        await bus.stop_consuming(task)
    await replay.unsubscribe()
    if finished.reason == "error" and not in_pool:
        raise SystemExit(1)


class DataUnavailable(RuntimeError):
    """data-pipeline could not prepare the run's data (its dead letter says why)."""


async def wait_for_data(ctx: ServiceContext, run_id: str, announced: asyncio.Event,
                        poll: float = 0.5) -> DatasetReady | None:
    """The run's newest data set, once there (``announced`` wakes the wait when one is); None
    when the service is stopping. A pool worker must not wait forever for a run whose data was
    rejected: that raises DataUnavailable."""
    while not ctx.stop.is_set():
        dataset = await ctx.bus.latest(DatasetReady, run_id)
        if dataset is not None:
            return dataset
        dead = await ctx.bus.latest(DeadLetter, run_id)
        if dead is not None and dead.subject.endswith("." + RunQueued.KIND):
            raise DataUnavailable(f"no data for run {run_id}: {dead.reason}")
        stop, news = asyncio.create_task(ctx.stop.wait()), asyncio.create_task(announced.wait())
        await asyncio.wait({stop, news}, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        news.cancel()
    return None


def fork_start(rdir) -> Path | None:
    """A fork with no checkpoint of its own yet resumes from the parent's (``RunDir.fork_start``),
    once it checks out against its manifest."""
    starts = sorted(RunDir(rdir).fork_start.glob("checkpoint-*"))
    if not starts:
        return None
    if problem := verify(starts[-1], None, uncatalogued_ok=True):
        raise SystemExit(f"the fork's starting checkpoint {starts[-1]} cannot be used: {problem}")
    return starts[-1]


async def _dataset_to_resume(link: BusLink, latest: DatasetReady, rdir) -> tuple[DatasetReady, Path | None]:
    """(data set, checkpoint to resume from): a fresh run trains on the newest data set; a
    resumed one on the data set its checkpoint names."""
    ckpt = await asyncio.to_thread(latest_intact, RunDir(rdir).checkpoints, link.recorded) or fork_start(rdir)
    want = read_state(ckpt).dataset_id if ckpt else ""
    if not want or want == latest.dataset_id:
        return latest, ckpt
    for _ in range(100):  # the replay of announced data sets is under way
        if want in link.datasets:
            return link.datasets[want], ckpt
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
    if args.run_id == ALL_RUNS and (distributed.launched() or args.processes > 1):
        raise SystemExit("a pool trainer (--run-id '*') trains one process per run; pass --run-id for --processes")
    if distributed.launched():
        distributed.die_with_launcher()
        args.launcher_pid = os.getppid()  # torchrun (if it went before the line above took effect)
        if distributed.rank() > 0:
            return follow(args)
        return run_service("trainer", main, args=args, fast_exit=False)  # torchrun's ranks end together
    if args.run_id == ALL_RUNS:
        return run_service("trainer", main, args=args)
    processes = args.processes or load_run_config(args.storage, args.run_id).train.processes
    if processes > 1:
        os.execv(sys.executable, distributed.torchrun_argv(processes, argv))
    run_service("trainer", main, args=args)


if __name__ == "__main__":
    cli()
