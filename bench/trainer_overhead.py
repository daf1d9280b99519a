"""What does the bus cost the trainer? Plain TRL vs the tuneloop trainer, alternated in one run.

Both train the same tiny model on the same data for the same steps (same seed, so the same
batches), with a checkpoint every ``--save-steps`` steps. The tuneloop side runs as a real
run does: a real nats-server, ``StepMetrics`` published every step, control and feedback
drained every step, every checkpoint announced, and an operator's control every
``--control-every`` steps, each applied and answered. The operator is a process of its own
(``operator_probe.py``), as ``tuneloop ctl`` is: what it costs is not the trainer's. Prints
tokens/s of each, the median of the per-round ratios (target >= 0.97) with its 95% interval, and the control latency: from ``ctl`` publish
to ``ControlApplied``, and what the bus's side (the loop thread, nats-server, the operator)
took of the CPU: what it can cost on cores the training keeps busy.

    .venv/bin/python bench/trainer_overhead.py [--steps 80] [--rounds 15] [--warmup 1] [--json PATH]
    .venv/bin/python bench/trainer_overhead.py --real --json bench/results/trainer_overhead_real.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import cpu_seconds, interval, order, verdict, write_figures
from tuneloop.bus import Bus
from tuneloop.config import load_config
from tuneloop.tools.client import send_control
from tuneloop.data_pipeline.prepare import prepare
from tuneloop.tools.embedded import NatsServer
from tuneloop.events import Control, DatasetReady, Feedback, SplitInfo, StepMetrics
from tuneloop import controls
from tuneloop.trainer import recipe
from tuneloop.trainer.callbacks import Hooks
from tuneloop.trainer.link import BusLink, too_late

REPO = Path(__file__).resolve().parents[1]
# Every training run on one and the same thread: torch's OpenMP pool is per calling thread, and
# idle pools of other threads spin, which would slow each later run (and bias the comparison).
TRAIN_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")


def on_train_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(TRAIN_THREAD, fn, *args)


def bus_cpu(nats_pid: int, probe_pid: int) -> tuple[float, float, float, float]:
    """CPU seconds so far: (the bus's in all, this process's loop thread, nats-server + the
    operator process, this whole process)."""
    loop = cpu_seconds(tid=threading.main_thread().native_id)
    others = cpu_seconds(nats_pid) + cpu_seconds(probe_pid)
    return loop + others, loop, others, cpu_seconds()


def tokens_per_second(trainer, seconds: float) -> float:
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    return tokens / seconds


def setup(tmp: Path, steps: int, config: Path, save_steps: int):
    cfg = load_config(config)
    if cfg.phases:  # a phased job (the example): measure its first phase, SFT
        cfg = cfg.phase_config(0)
    cfg.train.max_steps, cfg.train.logging_steps, cfg.train.save_steps = steps, 1, save_steps
    rdir = tmp / "run"
    p = prepare(cfg, rdir / "data", rdir)
    ds = DatasetReady(run_id="bench", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint, chat_template=cfg.model.template(),
                      splits={k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()})
    recipe.prepare_base(cfg, rdir, ds)  # build the base once, outside the timings
    return cfg, rdir, ds


def run_plain(cfg, rdir, ds, out: Path) -> float:
    trainer = recipe.build_trainer(cfg, rdir, ds, [], args=recipe.trl_args(cfg, out))
    t0 = time.perf_counter()
    trainer.train()
    tps = tokens_per_second(trainer, time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)
    return tps


async def run_tuneloop(cfg, rdir, ds, bus: Bus, run_id: str, during=None, out: Path | None = None) -> tuple[float, object, Hooks]:
    link = BusLink(bus, asyncio.get_running_loop())
    link.start()
    consumers = [await bus.consume(cls, run_id, link.deliver, concurrency=64, group=f"trainer-{run_id}")
                 for cls in (Control, Feedback)]
    state = controls.Steering.from_config(cfg.train)
    hooks = Hooks(link, run_id, rdir, "base", adapter=True, state=state)
    out = out or rdir / f"checkpoints-{run_id}"
    # Built on the training thread, as the trainer service does (recipe.train) and as the plain arm does.
    trainer = await on_train_thread(lambda: recipe.build_trainer(cfg, rdir, ds, hooks.callbacks, args=recipe.trl_args(cfg, out)))
    t0 = time.perf_counter()
    job = asyncio.ensure_future(on_train_thread(trainer.train))
    extra = await during(job) if during else None
    await job
    await link.close()
    await link.end(too_late(bus, run_id, trainer.state.global_step))  # as the trainer service does when training ends
    for task in consumers:  # as the trainer service does when its run ends: no round polls for the ones before it
        await bus.stop_consuming(task)
    shutil.rmtree(out, ignore_errors=True)
    return tokens_per_second(trainer, time.perf_counter() - t0), extra, hooks


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        cfg, rdir, ds = setup(Path(tmp), args.steps, args.config, args.save_steps)
        bus = await Bus.connect(server.url, "trainer")
        operator = await Bus.connect(server.url, "ctl")
        probe = subprocess.Popen([sys.executable, str(Path(__file__).with_name("operator_probe.py")), server.url,
                                  "--every", str(args.control_every), "--value", str(cfg.train.max_grad_norm)],
                                 stdout=subprocess.PIPE, text=True)
        assert probe.stdout.readline().strip() == "ready", "the operator process did not start"
        plain, ours, shares = [], [], []
        for r in range(args.warmup + args.rounds):  # alternate, so drift hits both sides alike
            got = {}
            for side in order(r, "plain", "tuneloop"):
                if side == "plain":
                    got[side] = await on_train_thread(run_plain, cfg, rdir, ds, rdir / f"plain-{r}")
                else:
                    before = bus_cpu(server.proc.pid, probe.pid)
                    got[side], _, hooks = await run_tuneloop(cfg, rdir, ds, bus, f"bench{r}")
                    applied = len(hooks.loop.run_state.applied)
                    spent = [b - a for a, b in zip(before, bus_cpu(server.proc.pid, probe.pid))]
            label = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}"
            print(f"{label:8s} plain {got['plain']:8.0f} tokens/s  tuneloop {got['tuneloop']:8.0f} tokens/s  "
                  f"ratio {got['tuneloop'] / got['plain']:.3f}  ({applied} controls applied; bus CPU "
                  f"{spent[0]:.2f} s of {spent[3]:.1f} s: loop {spent[1]:.2f}, nats-server + operator {spent[2]:.2f})", flush=True)
            if r >= args.warmup:
                plain.append(got["plain"])
                ours.append(got["tuneloop"])
                shares.append(spent[0] / spent[3])

        probe.terminate()
        probe.wait()
        latencies = await measure_control_latency(cfg, rdir, ds, bus, operator, server.url, args.controls)
        await bus.close()
        await operator.close()

    p, o = statistics.median(plain), statistics.median(ours)
    paired = statistics.median(b / a for a, b in zip(plain, ours))
    print()
    dtype = recipe.precision(cfg)
    device = "CPU" if not recipe.uses_cuda(cfg) else f"{torch.cuda.get_device_name()}, {dtype}"
    print(f"model: {cfg.model.name_or_path} ({args.config.name}), {args.steps} steps x {args.rounds} rounds "
          f"(+{args.warmup} warm-up), batch {cfg.train.batch_size}, {device}; a checkpoint every {args.save_steps} "
          f"steps (both), a control every {args.control_every} steps (tuneloop)")
    print(f"plain TRL          {p:10.0f} tokens/s (median)")
    print(f"tuneloop (bus on)  {o:10.0f} tokens/s (median)")
    ratios = [b / a for a, b in zip(plain, ours)]
    lo, hi = interval(ratios)
    print(f"ratio tuneloop/plain: {paired:.3f} median of per-round ratios, 95% CI {lo:.3f}-{hi:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.97: {verdict(lo, hi, 0.97, at_most=False)}); "
          f"{o / p:.3f} the ratio of the medians")
    print(f"the bus's CPU (the loop thread, nats-server, the operator process) over the whole process's: "
          f"median {statistics.median(shares):.1%} per round: on cores the training keeps busy, about what it costs")
    if latencies:
        ms = sorted(m for m, _ in latencies)
        steps = [s for _, s in latencies]
        print(f"control latency over {len(ms)} controls: median {statistics.median(ms):.0f} ms, "
              f"max {ms[-1]:.0f} ms; steps from publish to apply: median {statistics.median(steps):.0f}, max {max(steps)}")
    write_figures(args.json, {
        "ratio_of_medians": round(o / p, 4), "median_of_ratios": round(paired, 4),
        "median_of_ratios_ci95": [round(lo, 4), round(hi, 4)], "ratios": [round(v, 4) for v in ratios],
        "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4), "model": cfg.model.name_or_path,
        "plain_tokens_per_s": round(p, 1), "tuneloop_tokens_per_s": round(o, 1), "rounds": args.rounds,
        "steps": args.steps, "save_steps": args.save_steps, "control_every": args.control_every, "device": device,
        "bus_cpu_share": round(statistics.median(shares), 4),
        "control_latency_median_ms": round(statistics.median(m for m, _ in latencies), 1) if latencies else None,
    })


async def measure_control_latency(cfg, rdir, ds, bus, operator, url, n: int) -> list[tuple[float, int]]:
    """On a long run: publish a control, wait for ControlApplied; (ms, steps) for each."""
    if n <= 0:
        return []
    cfg = cfg.model_copy(deep=True)
    cfg.train.max_steps = 10**6
    seen: list[int] = [0]

    async def on_step(ev: StepMetrics) -> None:
        seen.append(ev.step)

    await operator.subscribe(StepMetrics, "latency", on_step)

    async def probe(job):
        while seen[-1] < 3:
            await asyncio.sleep(0.05)
        out = []
        for _ in range(n):
            step0, t0 = seen[-1], time.perf_counter()
            ans = await send_control(url, "latency", "set-grad-clip", cfg.train.max_grad_norm, bus=operator)
            out.append(((time.perf_counter() - t0) * 1000, ans.step - step0))
            await asyncio.sleep(0.3)
        await send_control(url, "latency", "stop", bus=operator)
        return out

    return (await run_tuneloop(cfg, rdir, ds, bus, "latency", during=probe))[1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "protocol-tiny.yaml")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=15, help="paired rounds measured (per-round ratios scatter on a shared VM: read the medians)")
    ap.add_argument("--save-steps", type=int, default=20, help="a checkpoint every N steps, in both arms")
    ap.add_argument("--control-every", type=int, default=10, help="an operator's control every N steps (tuneloop arm)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--controls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (the first run on a VM is often faster)")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (examples/protocol.yaml), where a "
                    "step takes ~1-2 s: 20 steps x 5 rounds, a checkpoint every 10 steps, a control every 5")
    args = ap.parse_args()
    if args.real:
        args.config, args.steps, args.rounds, args.save_steps = REPO / "examples" / "protocol.yaml", 20, 5, 10
        args.control_every, args.controls = 5, 5
    sys.exit(asyncio.run(main(args)))
