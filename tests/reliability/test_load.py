"""Bursts at a live run: 20k metrics events, 1k controls at the trainer, 100 evaluation requests
at the evaluator. Nothing JetStream holds is dropped, every control and request is answered
exactly once, the services' memory stays bounded; latency percentiles are reported."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import pytest

from helpers import collect, make_run, stored, tiny_config, wait_for
from tuneloop import subjects
from tuneloop.events import Control, ControlApplied, ControlRejected, EvalRequest, EvalVerdict, StepMetrics

pytestmark = pytest.mark.reliability
METRICS, CONTROLS, EVALS = 20_000, 1_000, 100


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pct(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[int(q) - 1] * 1000, 1) if len(values) > 1 else 0.0


async def burst(publish, items, width: int = 200) -> list[float]:
    """Publish ``items`` ``width`` at a time; the seconds each publish took to be stored."""
    took: list[float] = []

    async def one(item):
        t = time.perf_counter()
        await publish(item)
        took.append(time.perf_counter() - t)

    for i in range(0, len(items), width):
        await asyncio.gather(*(one(x) for x in items[i:i + width]))
    return took


async def test_bursts_are_absorbed_without_loss_and_with_bounded_memory(tmp_path, nats_url, bus, services, figures):
    run = f"load-{int(time.time()) % 10**6}"
    cfg = tiny_config(tmp_path, max_steps=10**6, save_steps=10**6)
    cfg.feedback.min_step = 10**6
    cfg.eval.max_cases = 2
    storage = make_run(tmp_path, run, cfg)
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", "trainer", "evaluator", "checkpoint", "rl-reward"):
        svc.start(name)
    steps = await collect(bus, StepMetrics, run)
    await wait_for(lambda: steps, timeout=180)
    trainer, evaluator = svc.procs["trainer"].pid, svc.procs["evaluator"].pid
    mem0 = {"trainer": rss_mb(trainer), "evaluator": rss_mb(evaluator)}

    # 1. metrics: all stored, and a live watcher gets every one.
    watched = []

    async def watch(e):
        if e.max_steps == 0:
            watched.append(e)

    await bus.subscribe(StepMetrics, run, watch)
    fake = [StepMetrics(run_id=run, step=i, max_steps=0, loss=1.0) for i in range(METRICS)]
    t0 = time.perf_counter()
    took = await burst(bus.publish, fake)
    rate = METRICS / (time.perf_counter() - t0)
    # Every one reaches the live watcher (a publish retried after an ack timeout reaches it twice:
    # core NATS delivers each send; the stream stores it once, by its Nats-Msg-Id).
    await wait_for(lambda: len({e.step for e in watched}) == METRICS, timeout=60)
    info = await bus.js.stream_info(subjects.STREAM, subjects_filter=subjects.subject(run, StepMetrics.KIND))
    assert info.state.subjects[subjects.subject(run, StepMetrics.KIND)] >= METRICS
    figures.update(metrics=METRICS, metrics_per_s=round(rate), metrics_publish_p50_ms=pct(took, 50),
                   metrics_publish_p99_ms=pct(took, 99))

    # 2. controls at the trainer: each answered once, in order of arrival, at step boundaries.
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}

    async def answer(e):
        answered.setdefault(e.control_id, time.perf_counter())

    await bus.subscribe(ControlApplied, run, answer)
    await bus.subscribe(ControlRejected, run, answer)
    controls = [Control(run_id=run, command="set-log-interval", value=5 + i % 2) for i in range(CONTROLS)]

    async def send(c):
        sent[c.event_id] = time.perf_counter()
        await bus.publish(c)

    await burst(send, controls)
    await wait_for(lambda: len(answered) == CONTROLS, timeout=300)
    latency = [answered[k] - sent[k] for k in sent]
    kept = await stored(nats_url, run, [Control, ControlApplied, ControlRejected])
    once = Counter(a.control_id for a in kept[ControlApplied] + kept[ControlRejected])
    assert set(once) == set(sent) and set(once.values()) == {1}
    # In order of arrival: every control is valid, so each answer is a ControlApplied, and the
    # trainer published them in the order the stream took the controls in.
    assert not kept[ControlRejected]
    assert [a.control_id for a in kept[ControlApplied]] == [c.event_id for c in kept[Control]]
    figures.update(controls=CONTROLS, control_p50_ms=pct(latency, 50), control_p99_ms=pct(latency, 99))

    # 3. evaluation requests (the base model on two held-out cases each): one verdict per request.
    verdicts = await collect(bus, EvalVerdict, run)
    await bus.publish(EvalRequest(run_id=run, step=0, checkpoint=None, base_model="base", adapter=False,
                                  split="val", purpose="manual", max_cases=2))
    await wait_for(lambda: verdicts, timeout=120)  # warm: the model is loaded once, then reused
    mem0["evaluator"] = rss_mb(evaluator)
    verdicts.clear()
    asked: dict[str, float] = {}
    requests = [EvalRequest(run_id=run, step=i + 1, checkpoint=None, base_model="base", adapter=False, split="val",
                            purpose="manual", max_cases=2) for i in range(EVALS)]

    async def ask(r):
        asked[r.event_id] = time.perf_counter()
        await bus.publish(r)

    await burst(ask, requests, width=50)
    await wait_for(lambda: len({v.request_id for v in verdicts}) == EVALS, timeout=600)
    kept = await stored(nats_url, run, [EvalVerdict])
    assert Counter(v.request_id for v in kept[EvalVerdict] if v.step > 0 or v.request_id in asked) == \
        Counter(set(asked))
    figures.update(eval_requests=EVALS, eval_seconds_p50=round(statistics.median(v.seconds for v in verdicts), 2),
                   eval_seconds_max=round(max(v.seconds for v in verdicts), 2))

    mem1 = {"trainer": rss_mb(trainer), "evaluator": rss_mb(evaluator)}
    growth = {k: round(mem1[k] - mem0[k]) for k in mem0}
    figures.update(rss_growth_mb=growth)
    assert all(g < 150 for g in growth.values()), growth
    for name, p in svc.procs.items():
        assert p.poll() is None, f"{name} died"
