"""The feedback loop in figures, in one run:

1. evaluation throughput (cases/s) with 1 and 2 evaluator processes sharing one request's
   shards, and the ratio;
2. wall time of the same training job with periodic evaluation done in-process by the training
   loop (blocking: TRL + a callback that generates and scores every ``save_steps``) and by
   tuneloop's remote evaluators (non-blocking), and the ratio;
3. time from a checkpoint saved to the feedback on its verdict consumed by the trainer.

    .venv/bin/python bench/feedback_loop.py [--steps 150] [--every 25] [--requests 3]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console
from transformers import TrainerCallback

from tuneloop.bus import Bus
from tuneloop.config import load_config
from tuneloop.embedded import NatsServer
from tuneloop.evaluator.generate import generate
from tuneloop.evaluator.suite import score
from tuneloop.events import CheckpointSaved, DatasetReady, EvalRequest, EvalVerdict
from tuneloop.runner import run as run_job, service_env
from tuneloop.storage import confine
from tuneloop.trainer import recipe

REPO = Path(__file__).resolve().parents[1]


def job_config(tmp: Path, steps: int, every: int) -> Path:
    """The example job's SFT phase, with periodic evaluation every ``every`` steps and no early stop."""
    cfg = load_config(REPO / "examples" / "protocol.yaml")
    raw = (cfg.phase_config(0) if cfg.phases else cfg).model_dump(mode="json")  # the example's SFT phase
    raw["run"]["output_dir"] = str(tmp / "runs")
    raw["data"]["sources"][0]["path"] = str(REPO / "examples" / "data" / "protocol.jsonl")
    raw["train"].update(max_steps=steps, save_steps=every)
    raw["feedback"].update(min_step=10**9)  # evaluate throughout, never stop early
    raw["data"]["adapt"]["enabled"] = False  # the same data throughout: both variants train alike
    raw["eval"]["baseline"] = False
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class InProcessEval(TrainerCallback):
    """What a trainer without tuneloop does: stop training every N steps to generate and score."""

    def __init__(self, cases, every: int, max_new_tokens: int, batch_size: int):
        self.cases, self.every, self.max_new_tokens, self.batch_size = cases, every, max_new_tokens, batch_size
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        t0 = time.perf_counter()
        tok, side = processing_class, processing_class.padding_side
        tok.padding_side = "left"
        model.eval()
        outputs, _ = generate(model, tok, [c.prompt for c in self.cases], self.max_new_tokens, self.batch_size)
        model.train()
        tok.padding_side = side
        score(self.cases, outputs)
        self.seconds += time.perf_counter() - t0


def in_process_seconds(config: Path, tmp: Path, rdir: Path) -> tuple[float, float]:
    """(wall seconds of trainer.train(), of which evaluating) for the blocking variant."""
    from tuneloop.evaluator.__main__ import load_cases

    cfg = load_config(config)
    ds = DatasetReady.model_validate_json((rdir / "bench-dataset.json").read_text())
    cases = load_cases(confine(rdir, ds.splits["val"].path), 0, cfg.eval.max_cases)
    evaluator = InProcessEval(cases, cfg.train.save_steps, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    args = recipe.trl_args(cfg, tmp / "inproc-checkpoints")
    trainer = recipe.build_trainer(cfg, rdir, ds, [evaluator], args=args)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, evaluator.seconds


def feedback_latencies(rdir: Path, saved_at: dict[int, float]) -> list[float]:
    """Seconds from each checkpoint saved to the trainer applying the feedback on its verdict."""
    pattern = re.compile(r"^(\S+ \S+) trainer INFO \S+: feedback at step \d+ \(verdict of step (\d+)\)")
    out = []
    for line in (rdir / "logs" / "trainer.log").read_text().splitlines():
        m = pattern.match(line)
        if m and int(m.group(2)) in saved_at:
            applied = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append(applied - saved_at[int(m.group(2))])
    return out


async def eval_throughput(storage: Path, run_id: str, evaluators: int, requests: int, url: str) -> float:
    """cases/s of ``evaluators`` processes over ``requests`` requests on the run's exported model."""
    env = service_env("evaluator")  # as `tuneloop run` starts them
    procs = [subprocess.Popen([sys.executable, "-m", "tuneloop.evaluator", "--run-id", run_id, "--storage", str(storage),
                               "--nats-url", url, "--parent-pid", str(os.getpid())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(evaluators)]
    bus = await Bus.connect(url, "bench")
    verdicts: list[EvalVerdict] = []

    async def on(v: EvalVerdict) -> None:
        verdicts.append(v)

    await bus.subscribe(EvalVerdict, run_id, on)
    try:
        await asyncio.sleep(8)  # processes up and subscribed
        warm = EvalRequest(run_id=run_id, step=0, checkpoint="export/merged", base_model="base", adapter=False,
                           split="test", purpose="manual")
        await bus.publish(warm)  # every process loads the model once before the clock starts
        while not any(v.request_id == warm.event_id for v in verdicts):
            await asyncio.sleep(0.05)
        t0, cases = time.perf_counter(), 0
        for i in range(requests):
            req = warm.model_copy(update={"event_id": f"bench-{evaluators}-{i}-{time.time_ns()}", "step": i + 1})
            await bus.publish(req)
            while not any(v.request_id == req.event_id for v in verdicts):
                await asyncio.sleep(0.05)
            cases += next(v.cases for v in verdicts if v.request_id == req.event_id)
        return cases / (time.perf_counter() - t0)
    finally:
        await bus.close()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


async def replay(url: str, run_id: str) -> tuple[DatasetReady, dict[int, float]]:
    """The run's data set and when each checkpoint was saved, from its JetStream store."""
    bus = await Bus.connect(url, "bench")
    saved_at: dict[int, float] = {}

    async def on_saved(ev: CheckpointSaved) -> None:
        saved_at[ev.step] = ev.time.timestamp()

    try:
        ds = await bus.latest(DatasetReady, run_id)
        await bus.follow(CheckpointSaved, run_id, on_saved)
        await asyncio.sleep(1)
        return ds, saved_at
    finally:
        await bus.close()


def main(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        config = job_config(tmp, args.steps, args.every)
        t0 = time.perf_counter()
        summary = run_job(config, console=Console(file=io.StringIO()))
        job_wall = time.perf_counter() - t0
        rdir = Path(summary["run_dir"])
        storage, run_id = rdir.parent, summary["run_id"]

        with NatsServer(rdir / "nats") as server:  # the finished run's store, events and all
            ds, saved_at = asyncio.run(replay(server.url, run_id))
            (rdir / "bench-dataset.json").write_text(ds.model_dump_json())
            latencies = feedback_latencies(rdir, saved_at)
            inproc_wall, inproc_eval = in_process_seconds(config, tmp, rdir)
            rates = {n: asyncio.run(eval_throughput(storage, run_id, n, args.requests, server.url)) for n in (1, 2)}

    remote = summary["train_seconds"]
    print(f"\njob: example config, {args.steps} steps, evaluation of {len(summary['evaluations'])} checkpoints "
          f"(every {args.every} steps), {os.cpu_count()} CPU cores")
    print(f"(1) evaluation throughput: 1 evaluator {rates[1]:.1f} cases/s, 2 evaluators {rates[2]:.1f} cases/s, "
          f"ratio {rates[2] / rates[1]:.2f}")
    print(f"(2) training wall time: in-process blocking evaluation {inproc_wall:.1f} s (of which evaluating "
          f"{inproc_eval:.1f} s), tuneloop remote evaluators {remote:.1f} s; ratio remote/in-process "
          f"{remote / inproc_wall:.2f} (whole tuneloop job incl. start-up and export: {job_wall:.1f} s)")
    if latencies:
        print(f"(3) checkpoint saved -> feedback applied by the trainer: median {statistics.median(latencies):.1f} s, "
              f"max {max(latencies):.1f} s over {len(latencies)} checkpoints")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--requests", type=int, default=3)
    main(ap.parse_args())
