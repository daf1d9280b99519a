"""Time to the first training step: ``tuneloop run`` against a plain TRL script, in paired rounds.

- **tuneloop**: ``tuneloop run CONFIG`` as a user types it (nats-server, five services, data
  prepared by data-pipeline, base model built by the trainer), until the first ``train.step``
  event (its own timestamp, taken at the step).
- **plain**: a fresh Python process that does the same work in one script — prepare the same
  data, build the same tiny base, TRL's ``SFTTrainer`` — until its first step ends.

Both from the moment the process is started, ``logging_steps: 1``, the example's SFT phase;
rounds alternate which goes first. Prints the medians, ``first_step_over_plain`` (the median of the
per-round ratios, with its 95% interval) and the overhead in seconds.

    .venv/bin/python bench/startup.py [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import interval, order, verdict, write_figures

REPO = Path(__file__).resolve().parents[1]
TUNELOOP = Path(sys.executable).parent / "tuneloop"


def bench_config(tmp: Path) -> Path:
    """The example's SFT phase as a one-run config (logging every step, runs under ``tmp``)."""
    from tuneloop.config import load_config

    raw = load_config(REPO / "examples" / "protocol-tiny.yaml").phase_config(0).model_dump(mode="json")
    raw["run"].update(output_dir=str(tmp / "runs"), name="startup")
    raw["data"]["sources"][0]["path"] = str(REPO / "examples" / "data" / "protocol.jsonl")
    raw["eval"]["suites"] = []
    raw["train"].update(logging_steps=1)
    raw.pop("base_dir", None)
    path = tmp / "startup.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def plain_child(config: Path, out: Path) -> None:
    """The plain script: what a user of TRL alone writes to train this job (run in a fresh process)."""
    from transformers import TrainerCallback

    from tuneloop.config import load_config
    from tuneloop.data_pipeline.prepare import prepare
    from tuneloop.events import DatasetReady, SplitInfo
    from tuneloop.trainer import recipe

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            out.write_text(str(time.time()))
            control.should_training_stop = True

    cfg = load_config(config)
    rdir = out.parent / "plain-run"
    p = prepare(cfg, rdir / "data", rdir)
    ds = DatasetReady(run_id="plain", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint, chat_template=cfg.model.template(),
                      splits={k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()})
    trainer = recipe.build_trainer(cfg, rdir, ds, [FirstStep()], args=recipe.trl_args(cfg, rdir / "checkpoints"))
    trainer.train()


def time_plain(config: Path, tmp: Path, i: int) -> float:
    out = tmp / f"plain-{i}" / "first-step"
    out.parent.mkdir(parents=True)
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--plain-child", str(config), str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(out.read_text()) - t0


async def first_step_event(storage: Path, run_id: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Wall time of the run's first ``train.step`` (from its timestamp)."""
    from tuneloop.bus import Bus
    from tuneloop.events import StepMetrics

    info = storage / run_id / "run.json"
    deadline = time.monotonic() + timeout
    while not info.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tuneloop run exited ({proc.returncode}) before writing {info}")
        await asyncio.sleep(0.02)
    bus = await Bus.connect(json.loads(info.read_text())["nats_url"], "bench")
    first: list[float] = []

    async def on(ev: StepMetrics) -> None:
        first.append(ev.time.timestamp())

    await bus.subscribe(StepMetrics, run_id, on)
    while not first:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tuneloop run {run_id} gave no train.step (exit {proc.returncode})")
        await asyncio.sleep(0.02)
    await bus.close()
    return min(first)


def time_tuneloop(config: Path, tmp: Path, i: int) -> float:
    run_id = f"startup-{i}"
    log = (tmp / f"tuneloop-{i}.log").open("wb")
    t0 = time.time()
    proc = subprocess.Popen([str(TUNELOOP), "run", str(config), "--run-id", run_id], stdout=log, stderr=subprocess.STDOUT)
    try:
        first = asyncio.run(first_step_event(tmp / "runs", run_id, proc))
    finally:
        proc.send_signal(signal.SIGINT)  # as an operator's Ctrl-C: services stopped, nothing left behind
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return first - t0


def main(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        config = bench_config(tmp)
        plain, ours = [], []
        for r in range(args.warmup + args.rounds):
            got = {}
            for side in order(r, "plain", "tuneloop"):
                got[side] = (time_plain if side == "plain" else time_tuneloop)(config, tmp, r)
            label = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}"
            print(f"{label:8s} plain {got['plain']:6.2f} s  tuneloop {got['tuneloop']:6.2f} s  "
                  f"ratio {got['tuneloop'] / got['plain']:.3f}", flush=True)
            if r >= args.warmup:
                plain.append(got["plain"])
                ours.append(got["tuneloop"])
    p, o = statistics.median(plain), statistics.median(ours)
    ratios = [b / a for a, b in zip(plain, ours)]
    extra = [b - a for a, b in zip(plain, ours)]
    key, (lo, hi) = statistics.median(ratios), interval(ratios)
    over, (over_lo, over_hi) = statistics.median(extra), interval(extra)
    print(f"\ntime to the first training step, {args.rounds} rounds (+{args.warmup} warm-up), {os.cpu_count()} CPU cores:")
    print(f"plain TRL script   {p:6.2f} s (median)")
    print(f"tuneloop run       {o:6.2f} s (median)")
    print(f"first_step_over_plain: {key:.3f} median of per-round ratios, 95% CI {lo:.3f}-{hi:.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; target <= 1.5: {verdict(lo, hi, 1.5)})")
    print(f"overhead: {over:+.2f} s (median of per-round differences, 95% CI {over_lo:+.2f} to {over_hi:+.2f} s)")
    write_figures(args.json, {
        "first_step_over_plain": round(key, 4), "first_step_over_plain_ci95": [round(lo, 4), round(hi, 4)],
        "ratios": [round(v, 4) for v in ratios], "ratio_of_medians": round(o / p, 4),
        "overhead_s": round(over, 3), "overhead_s_ci95": [round(over_lo, 3), round(over_hi, 3)],
        "plain_s": round(p, 3), "tuneloop_s": round(o, 3),
        "ratio_min": round(min(ratios), 4), "ratio_max": round(max(ratios), 4), "rounds": args.rounds,
    })

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--plain-child":
        plain_child(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    main(ap.parse_args())
