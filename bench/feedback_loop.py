"""What evaluating off the training loop costs the trainer, measured in paired rounds.

Each round trains the same job twice, in alternating order, in this process, with the same
services (checkpoint, rl-reward, evaluators: real processes on a real nats-server) running:

- **inline**: TRL plus a callback that stops training every ``eval.every`` steps to generate
  and score the val cases, what a user without tuneloop writes;
- **remote**: tuneloop's trainer recipe (``recipe.train``: the bus callback, weights-only
  snapshots every ``eval.every`` steps), the evaluator pool scoring them, rl-reward turning
  verdicts into feedback that the trainer applies between steps.

Same data, cases, answer length, checkpoint cadence (``train.save_steps``) and seed. The
figure compared is each arm's time until its last evaluation is scored: ``trainer.train()``
for inline (its evaluations happen inside), and for remote ``trainer.train()`` plus the wait,
after training ends, for the feedback on its last snapshot. Inline generates all the cases in
one batch (the cheapest a user would write). Two settings:

- ``shared`` (the headline: equal hardware): every process on every core (the cores split by
  tuneloop's lease folder);
- ``extra_core``: an extra core for the evaluator: the trainer pinned to core 0 with one
  thread in both arms, the services and nats-server on the other cores, standing in for
  evaluators (and a broker) on other machines. Remote has hardware inline does not use.

Then the evaluation throughput of 1 and 2 evaluators on one request, and where the time goes
from a snapshot saved to the feedback on its verdict applied (per stage, medians).

    .venv/bin/python bench/feedback_loop.py [--rounds 5] [--json PATH]
    .venv/bin/python bench/feedback_loop.py --config examples/protocol.yaml --steps 40 --every 10 \
        --cases 48 --tokens 32 --shard 48 --rounds 3 --settings shared       # the real model
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import TrainerCallback

from common import interval, order, spread, write_figures
from inloop import judge_of

from tuneloop import cores
from tuneloop.bus import Bus
from tuneloop.config import load_config
from tuneloop.data_pipeline.prepare import prepare
from tuneloop.tools.embedded import NatsServer
from tuneloop.evaluator.__main__ import SHARD_BUCKET, load_cases
from tuneloop.evaluator.generate import generate
from tuneloop.evaluator.suite import ShardResult, score
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, Control, DatasetReady, EvalRequest, EvalShard,
                             EvalVerdict, Feedback, SplitInfo)
from tuneloop.tools.processes import spawn, stop_all
from tuneloop.storage import init_run
from tuneloop.storage import confine
from tuneloop.trainer import recipe
from tuneloop.trainer.link import BusLink

REPO = Path(__file__).resolve().parents[1]
# Every training run on one thread: torch's OpenMP pool belongs to the calling thread.
TRAIN_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
SERVICES = ("checkpoint", "rl-reward", "evaluator")


def on_train_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(TRAIN_THREAD, fn, *args)


def job_config(args) -> dict:
    """The example's SFT phase, evaluation-heavy: many val cases, long answers, often."""
    cfg = load_config(args.config)
    raw = (cfg.phase_config(0) if cfg.phases else cfg).model_dump(mode="json")
    raw["data"]["sources"][0]["path"] = str(cfg.resolve(cfg.data.sources[0].path))
    raw["data"]["adapt"]["enabled"] = False  # the same data throughout: both arms train alike
    raw["train"].update(max_steps=args.steps, save_steps=args.save_steps, logging_steps=10)
    raw["eval"].update(every=args.every, max_cases=args.cases, max_new_tokens=args.tokens, baseline=False,
                       shard_size=args.shard, batch_size=args.shard, suites=[])
    raw["feedback"].update(min_step=10**9)  # evaluate throughout, never stop early
    return raw


class InlineEval(TrainerCallback):
    """What a trainer without tuneloop does: stop every N steps to generate and score."""

    def __init__(self, cases, every: int, max_new_tokens: int, batch_size: int, judge=None):
        self.cases, self.every, self.max_new_tokens, self.batch_size = cases, every, max_new_tokens, batch_size
        self.judge = judge  # the run's task, as the evaluator scores by it
        self.seconds = 0.0
        self.count = 0

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
        score(self.cases, outputs, judge=self.judge)
        self.seconds += time.perf_counter() - t0
        self.count += 1


# ------------------------------------------------------------------ CPU placement
def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (threads created later inherit it from their creator)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except (ProcessLookupError, OSError):
            pass


class Applied(logging.Handler):
    """When the trainer applied each feedback: (verdict step, wall time), from its log line."""

    def __init__(self):
        super().__init__()
        self.times: dict[tuple[str, int], float] = {}
        self.run_id = ""

    def emit(self, record):
        if record.getMessage().startswith("feedback at step"):
            step = int(record.args[1])
            self.times[(self.run_id, step)] = record.created


# ------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, tmp: Path, args):
        self.tmp, self.args = tmp, args
        self.storage = tmp / "runs"
        self.raw = job_config(args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.events: dict[str, list] = {}
        self.applied = Applied()
        logging.getLogger("tuneloop.trainer.steering").addHandler(self.applied)
        logging.getLogger("tuneloop.trainer.steering").setLevel(logging.INFO)
        logging.getLogger("tuneloop.trainer.steering").propagate = False
        self.template = self.prepare_template()

    def prepare_template(self) -> Path:
        """Data and base model once; every run gets a copy (paths on events are run-relative)."""
        rdir = self.tmp / "template"
        cfg = self.config()
        p = prepare(cfg, rdir / "data", rdir)
        self.splits = {k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()}
        self.fingerprint = p.fingerprint
        ds = DatasetReady(run_id="template", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint,
                          chat_template=cfg.model.template(), splits=self.splits)
        recipe.prepare_base(cfg, rdir, ds)
        return rdir

    def config(self):
        from tuneloop.config import Config

        return Config.model_validate(self.raw)

    async def new_run(self, run_id: str):
        cfg = self.config()
        rdir = init_run(cfg, run_id, self.storage)
        for part in ("data", "base"):
            shutil.copytree(self.template / part, rdir / part)
        ds = DatasetReady(run_id=run_id, dataset_id=self.fingerprint[:16], fingerprint=self.fingerprint,
                          chat_template=cfg.model.template(), splits=self.splits)
        await self.bus.publish(ds)
        return cfg, rdir, ds

    # services ----------------------------------------------------------
    def start_services(self, url: str, cpus: set[int] | None, evaluators: int = 1) -> None:
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        names = [*SERVICES[:-1], *(f"evaluator-{i}" for i in range(evaluators))]
        for name in names:
            service, replica = (name, 0) if not name.startswith("evaluator") else ("evaluator", int(name[10:]))
            self.procs[name] = spawn(service, "*", self.storage, url, logs, replica)
            if cpus:
                pin_process(self.procs[name].pid, cpus)
        time.sleep(self.args.settle)  # imported and subscribed

    def stop_services(self) -> None:
        stop_all(self.procs)
        self.procs.clear()

    async def watch(self, run_id: str, stages: bool) -> None:
        """Record the run's events: all the stage table needs, or (``stages`` off: the
        trainer's core is the measured one) only the feedback that says evaluation is done."""
        got = self.events.setdefault(run_id, [])

        async def on(ev):
            got.append(ev)

        kinds = (CheckpointSaved, CheckpointRecorded, EvalRequest, EvalShard, EvalVerdict, Feedback) if stages else (Feedback,)
        for cls in kinds:
            await self.bus.subscribe(cls, run_id, on)

    # arms --------------------------------------------------------------
    async def inline(self, run_id: str, setting: str) -> dict:
        cfg, rdir, ds = await self.new_run(run_id)
        cases = load_cases(confine(rdir, ds.splits["val"].path), 0, cfg.eval.max_cases)
        ev = InlineEval(cases, cfg.eval.every, cfg.eval.max_new_tokens, batch_size=len(cases), judge=judge_of(cfg))  # one batch

        def train():
            trainer = recipe.build_trainer(cfg, rdir, ds, [ev], args=recipe.trl_args(cfg, rdir / "checkpoints"))
            t0 = time.perf_counter()
            trainer.train()
            return time.perf_counter() - t0

        seconds = await on_train_thread(train)
        return {"train_s": seconds, "eval_s": ev.seconds, "evaluations": ev.count}

    async def remote(self, run_id: str, setting: str) -> dict:
        cfg, rdir, ds = await self.new_run(run_id)
        await self.watch(run_id, stages=setting == "shared")
        self.applied.run_id = run_id
        link = BusLink(self.bus, asyncio.get_running_loop())
        link.start()
        await self.bus.consume(Control, run_id, link.deliver, concurrency=64)
        await self.bus.consume(Feedback, run_id, link.deliver, concurrency=64)
        finished = await on_train_thread(recipe.train, cfg, run_id, rdir, ds, link)
        await link.close()
        expected = set(range(cfg.eval.every, cfg.train.max_steps + 1, cfg.eval.every)) | {finished.step}
        deadline = time.monotonic() + 300
        while {e.step for e in self.events[run_id] if isinstance(e, Feedback)} < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{run_id}: no feedback for steps {sorted(expected)} within 300 s; see {self.tmp / 'logs'}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the last feedback's ack; the pool is idle before the next arm
        last = max(e.time for e in self.events[run_id] if isinstance(e, Feedback))
        tail = max(0.0, (last - finished.time).total_seconds())  # training over, its last verdict still coming
        return {"train_s": finished.train_seconds + tail, "after_training_s": tail, "evaluations": len(expected)}

    async def rounds(self, setting: str) -> list[dict]:
        out = []
        for r in range(self.args.warmup + self.args.rounds):
            got = {}
            for arm in order(r, "inline", "remote"):
                got[arm] = await getattr(self, arm)(f"{setting.replace('_', '')}-{arm}-{r}", setting)
            ratio = got["remote"]["train_s"] / got["inline"]["train_s"]
            label = "warm-up" if r < self.args.warmup else f"round {r - self.args.warmup + 1}"
            print(f"  {setting:8s} {label:8s} inline {got['inline']['train_s']:6.2f} s (evaluating "
                  f"{got['inline']['eval_s']:5.2f} s)  remote {got['remote']['train_s']:6.2f} s  ratio {ratio:.3f}",
                  flush=True)
            if r >= self.args.warmup:
                out.append({**{f"{a}_{k}": v for a in got for k, v in got[a].items()}, "ratio": ratio,
                            "remote_run": f"{setting.replace('_', '')}-remote-{r}"})
        return out

    # evaluation throughput ----------------------------------------------
    async def throughput(self, run_id: str, checkpoint: str, requests: int) -> float:
        """cases/s of the running evaluators over ``requests`` requests of one checkpoint."""
        verdicts: dict[str, EvalVerdict] = {}

        async def on(v: EvalVerdict) -> None:
            verdicts[v.request_id] = v

        sub = await self.bus.subscribe(EvalVerdict, run_id, on)

        async def ask(i: int) -> EvalVerdict:
            req = EvalRequest(run_id=run_id, event_id=f"tp-{i}-{time.time_ns()}", step=i, checkpoint=checkpoint,
                              base_model="base", adapter=False, split="val", purpose="manual")
            await self.bus.publish(req)
            while req.event_id not in verdicts:
                await asyncio.sleep(0.02)
            return verdicts[req.event_id]

        await ask(0)  # every evaluator loads the model before the clock starts
        await ask(0)
        t0, cases = time.perf_counter(), 0
        for i in range(1, requests + 1):
            cases += (await ask(i)).cases
        await sub.unsubscribe()
        return cases / (time.perf_counter() - t0)

    # per-stage timings -----------------------------------------------------
    async def stages(self, run_ids: list[str]) -> dict[str, float]:
        """Medians over every evaluated snapshot/checkpoint of ``run_ids``, in seconds."""
        kv = await self.bus.key_value(SHARD_BUCKET)
        spans: dict[str, list[float]] = {}

        def add(name: str, seconds: float) -> None:
            spans.setdefault(name, []).append(seconds)

        for run_id in run_ids:
            evs = self.events[run_id]
            by = lambda cls: [e for e in evs if isinstance(e, cls)]  # noqa: E731
            for saved in by(CheckpointSaved):
                step = saved.step
                rec = next((e for e in by(CheckpointRecorded) if e.step == step), None)
                req = next((e for e in by(EvalRequest) if e.step == step), None)
                shards = sorted((e for e in by(EvalShard) if e.request.step == step), key=lambda e: e.shard)
                verdict = next((e for e in by(EvalVerdict) if e.step == step), None)
                fb = next((e for e in by(Feedback) if e.step == step), None)
                if not (rec and req and shards and verdict and fb):
                    continue
                results = [ShardResult.model_validate_json((await kv.get(f"{run_id}.{req.event_id}.{s.shard:04d}")).value)
                           for s in shards]
                t = lambda e: e.time.timestamp()  # noqa: E731
                add("saved -> catalogued (hash, KV, ckpt.recorded)", t(rec) - t(saved))
                add("catalogued -> eval.request", t(req) - t(rec))
                add("eval.request -> shards queued", t(shards[0]) - t(req))
                starts = [r.finished.timestamp() - r.seconds for r in results]
                add("shard queued -> taken by an evaluator", statistics.median(s - t(sh) for s, sh in zip(starts, shards)))
                add("model load (per shard)", statistics.median(r.load_seconds for r in results))
                add("generate (per shard)", statistics.median(r.generate_seconds for r in results))
                add("score (per shard)", statistics.median(r.score_seconds for r in results))
                add("last shard stored -> eval.verdict", t(verdict) - max(r.finished.timestamp() for r in results))
                add("eval.verdict -> feedback", t(fb) - t(verdict))
                applied = self.applied.times.get((run_id, step))
                if applied:
                    add("feedback -> applied at a step boundary", applied - t(fb))
                    add("TOTAL saved -> feedback applied", applied - t(saved))
                add("saved -> feedback published", t(fb) - t(saved))
        return {k: statistics.median(v) for k, v in spans.items()}

    # all ------------------------------------------------------------------
    async def run(self, server: NatsServer) -> dict:
        url = server.url
        self.bus = await Bus.connect(url, "bench")  # plays the trainer and announces the data
        ncpu = len(cores.my_cores())
        results: dict = {"cpus": ncpu}
        try:
            if "shared" in self.args.settings:
                await self.run_shared(url, ncpu, results)
            if ncpu >= 2 and "extra_core" in self.args.settings:
                print("\nsetting extra_core (an extra core for the evaluator): trainer on core 0 with 1 thread (both arms), "
                      "services and nats-server on the others",
                      flush=True)
                me = cores.my_cores()
                first = min(me)
                pin_process(os.getpid(), {first})
                pin_process(server.proc.pid, me - {first})
                torch.set_num_threads(1)
                await on_train_thread(torch.set_num_threads, 1)
                self.start_services(url, me - {first})
                results["extra_core"] = await self.rounds("extra_core")
                self.stop_services()
                pin_process(os.getpid(), me)
                pin_process(server.proc.pid, me)
        finally:
            self.stop_services()
            await self.bus.close()
        return results

    async def run_shared(self, url: str, ncpu: int, results: dict) -> None:
        print(f"\nsetting shared: trainer and services on all {ncpu} cores", flush=True)
        self.start_services(url, None)
        shared = await self.rounds("shared")
        stages = await self.stages([r["remote_run"] for r in shared])
        one = await self.throughput(shared[0]["remote_run"], f"checkpoints/checkpoint-{self.args.steps}", self.args.requests)
        self.stop_services()
        self.start_services(url, None, evaluators=2)
        two = await self.throughput(shared[0]["remote_run"], f"checkpoints/checkpoint-{self.args.steps}", self.args.requests)
        self.stop_services()
        results.update(shared=shared, stages=stages, eval_cases_per_s={"1": one, "2": two})


def report(res: dict, args) -> dict:
    out = {"cpus": res["cpus"], "rounds": args.rounds, "steps": args.steps, "eval_every": args.every,
           "cases": args.cases, "max_new_tokens": args.tokens}
    out["config"] = args.config.name
    print(f"\njob: {args.config.name} (SFT), {args.steps} steps, evaluation every {args.every} steps of {args.cases} val "
          f"cases x {args.tokens} new tokens, checkpoint every {args.save_steps} steps, {res['cpus']} CPU cores; "
          f"{args.rounds} paired rounds (+{args.warmup} warm-up), order alternating")
    for setting in ("shared", "extra_core"):
        rounds = res.get(setting)
        if not rounds:
            continue
        ratios = [r["ratio"] for r in rounds]
        share = statistics.median(r["inline_eval_s"] / r["inline_train_s"] for r in rounds)
        print(f"({setting}) training time remote/inline: {spread(ratios)}; inline {statistics.median(r['inline_train_s'] for r in rounds):.2f} s "
              f"(evaluating {share:.0%} of it), remote {statistics.median(r['remote_train_s'] for r in rounds):.2f} s")
        lo, hi = interval(ratios)
        print(f"    95% interval of the median ratio: {lo:.3f}-{hi:.3f}")
        out[f"remote_over_inline_{setting}"] = round(statistics.median(ratios), 4)
        out[f"remote_over_inline_{setting}_ci95"] = [round(lo, 4), round(hi, 4)]
        out[f"remote_over_inline_{setting}_rounds"] = [round(v, 4) for v in ratios]
        out[f"remote_over_inline_{setting}_min"] = round(min(ratios), 4)
        out[f"remote_over_inline_{setting}_max"] = round(max(ratios), 4)
        out[f"inline_eval_share_{setting}"] = round(share, 4)
    if "stages" not in res:  # --settings extra_core
        return out
    rates = res["eval_cases_per_s"]
    out["eval_scaling_1_to_2"] = round(rates["2"] / rates["1"], 4)
    print(f"evaluation throughput: 1 evaluator {rates['1']:.1f} cases/s, 2 evaluators {rates['2']:.1f} cases/s, "
          f"ratio {out['eval_scaling_1_to_2']:.2f}")
    print("snapshot saved -> feedback applied, per stage (medians over the shared remote rounds):")
    for name, seconds in res["stages"].items():
        print(f"    {name:48s} {seconds * 1000:8.1f} ms")
    total = res["stages"].get("TOTAL saved -> feedback applied", res["stages"].get("saved -> feedback published"))
    out["ckpt_to_feedback_median_s"] = round(total, 4) if total is not None else None
    out["stages_s"] = {k: round(v, 4) for k, v in res["stages"].items()}
    return out


def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ[cores.ENV_DIR] = str(tmp / "cores")  # this bench's own lease folder
        with NatsServer(tmp / "nats") as server:
            bench = Bench(tmp, args)
            res = asyncio.run(bench.run(server))
    write_figures(args.json, report(res, args))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "protocol-tiny.yaml",
                    help="the job (a phased one: its first phase); examples/protocol.yaml is the real model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=5, help="eval.every: evaluate every N steps")
    ap.add_argument("--save-steps", type=int, default=50, help="train.save_steps: resumable checkpoints")
    ap.add_argument("--cases", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--shard", type=int, default=50, help="cases per shard (and generation batch, both arms)")
    ap.add_argument("--requests", type=int, default=3, help="requests timed for the evaluation throughput")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds for the services to start")
    ap.add_argument("--settings", type=lambda v: v.split(","), default=["shared", "extra_core"],
                    help="which settings to measure (comma-separated): shared, extra_core")
    ap.add_argument("--json", type=Path, default=None)
    sys.exit(main(ap.parse_args()))
