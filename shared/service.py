"""What every service's ``__main__`` shares: arguments, logging, the bus connection,
graceful shutdown on SIGTERM/SIGINT, and a watchdog that ends the service when the
process that started it (``tuneloop run``) is gone, so no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from . import cores, subjects, exporter
from .bus import Bus
from .config import Config
from .storage import load_run_config, run_dir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServiceContext:
    name: str
    bus: Bus
    run_id: str                      # a run id, or ALL_RUNS ("*") for every run on the bus
    storage: Path                    # root of run directories
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    args: argparse.Namespace = field(default_factory=argparse.Namespace)  # incl. a service's own flags

    def run_dir(self, run_id: str) -> Path:
        return run_dir(self.storage, run_id)

    def config(self, run_id: str) -> Config:
        return load_run_config(self.storage, run_id)


ServiceMain = Callable[[ServiceContext], Awaitable[None]]


def handles(cls: type, **options):
    """Declare, on a handler method, the event it consumes and how (``Bus.consume``'s options):
    the subscription stands beside its handler, and ``consume_handlers`` starts them all."""
    def mark(fn):
        fn.consumes = (cls, options)
        return fn
    return mark


async def consume_handlers(bus: Bus, run_id: str, service: object) -> None:
    """Start a durable consumer for every ``@handles`` method of ``service``, in the order written."""
    for name in type(service).__dict__:
        if (spec := getattr(getattr(type(service), name), "consumes", None)) is not None:
            cls, options = spec
            await bus.consume(cls, run_id, getattr(service, name), **options)

# Model work (training, generation, export) always runs on this one thread. torch's OpenMP pool
# belongs to the calling thread, and idle pools of other threads spin: spreading torch calls over
# asyncio's default executor makes every later call slower.
_TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


def on_torch_thread(fn: Callable[..., T], *args) -> Awaitable[T]:
    """Run blocking model work off the event loop, on the one torch thread."""
    return asyncio.get_running_loop().run_in_executor(_TORCH_THREAD, fn, *args)


def warm_up(imports: Callable[[], None]) -> None:
    """Run ``imports`` (a service's torch/transformers imports) on the torch thread now, in the
    background. A service that loads models (evaluator, checkpoint's merged export) would
    otherwise pay seconds of imports on its first piece of work, beside a busy trainer: a first
    verdict tens of steps late, an export queued behind a cold merge. Work queued on the torch
    thread runs after it."""
    warm = asyncio.ensure_future(on_torch_thread(imports))
    warm.add_done_callback(lambda f: f.cancelled() or f.exception() and log.warning("warm-up: %r", f.exception()))


def parse_args(name: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m tuneloop.{name.replace('-', '_')}", description=f"tuneloop {name} service")
    p.add_argument("--run-id", default=os.environ.get("TUNELOOP_RUN_ID", subjects.ALL_RUNS),
                   help="serve one run (default: every run on the bus)")
    p.add_argument("--storage", default=os.environ.get("TUNELOOP_STORAGE", "runs"),
                   help="root of the run directories (env TUNELOOP_STORAGE)")
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("TUNELOOP_METRICS_PORT", "-1")),
                   help="serve /metrics and /healthz here (0: any free port, -1: off)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    p.add_argument("--log-level", default=os.environ.get("TUNELOOP_LOG_LEVEL", "INFO"))
    if extra:
        extra(p)
    return p.parse_args(argv)


def setup_logging(name: str, level: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def run_log(path: Path):
    """While a pool process serves one run, its log lines go to that run's own log file too
    (``<run>/logs/<service>.log``, as when the run had a process of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    root = logging.getLogger()
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def run_service(name: str, main: ServiceMain, argv: list[str] | None = None,
                args: argparse.Namespace | None = None, fast_exit: bool = True) -> None:
    """Run ``main`` until SIGTERM/SIGINT; ``args`` when the service parsed its own (extra flags).

    After a clean stop the process leaves without the interpreter's teardown (``fast_exit``):
    with torch loaded that takes seconds (measured: 3-5 s per service on 2 shared cores, the
    tail of every sweep), and nothing is left to do then: the bus is closed, files are
    written, logs are flushed. An error still ends the process the usual way."""
    args = args or parse_args(name, argv)
    setup_logging(name, args.log_level)
    subjects.check_run_id(args.run_id)
    cores.priority_from_env()
    server = exporter.start_http(args.metrics_port)
    target = None
    if server and args.run_id != subjects.ALL_RUNS:  # an embedded run: tell its Prometheus where we are
        target = exporter.register_target(Path(args.storage) / args.run_id / "prometheus", name,
                                           server.server_address[1], args.run_id)
    try:
        asyncio.run(_run(name, main, args))
    except KeyboardInterrupt:
        pass
    finally:
        if target:
            target.unlink(missing_ok=True)
    if fast_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


async def _run(name: str, main: ServiceMain, args: argparse.Namespace) -> None:
    bus = await Bus.connect(args.nats_url, name)
    exporter.HEALTH.append(bus.health)
    ctx = ServiceContext(name=name, bus=bus, run_id=args.run_id, storage=Path(args.storage).resolve(), args=args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stop.set)
    parents = [pid for pid in (args.parent_pid, getattr(args, "launcher_pid", 0)) if pid]
    watchdog = asyncio.create_task(_watch_parents(parents, ctx.stop)) if parents else None
    janitor = asyncio.create_task(_forget_idle_runs(ctx.stop)) if args.run_id == subjects.ALL_RUNS else None
    log.info("%s serving run %s on %s", name, args.run_id, args.nats_url)
    try:
        await main(ctx)
    finally:
        for task in (watchdog, janitor):
            if task:
                task.cancel()
        exporter.HEALTH.remove(bus.health)
        await bus.close()
        log.info("%s stopped", name)


async def _forget_idle_runs(stop: asyncio.Event) -> None:
    """A pool: the series of runs idle for ``TUNELOOP_METRICS_IDLE_S`` (default 900) leave its registry."""
    idle_s = float(os.environ.get("TUNELOOP_METRICS_IDLE_S", "900"))
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), min(60.0, idle_s / 4))
        if forgotten := exporter.forget_idle(idle_s):
            log.info("metrics of idle run(s) %s forgotten", ", ".join(forgotten))


def parent_gone(pids: list[int]) -> int | None:
    """The first of ``pids`` that no longer runs, if any."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
    return None


async def _watch_parents(pids: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        if (pid := parent_gone(pids)) is not None:
            log.warning("parent %d is gone; stopping", pid)
            stop.set()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
