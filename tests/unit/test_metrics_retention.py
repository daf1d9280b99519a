"""A pool serves run after run: the series of a run that went idle leave its registry, so their
count comes back to where it was however many runs it served, and a run still active keeps its
own. Token throughput is a counter (its rate() is the dashboard's throughput)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from tuneloop import exporter, metrics
from tuneloop.events import CheckpointRecorded, DatasetReady, EvalVerdict, SplitInfo, StepMetrics


def series() -> int:
    return sum(len(m.samples) for m in REGISTRY.collect() if m.name.startswith("tuneloop_"))


def a_run_passes(run: str) -> None:
    """What one run moves in a process: events in and out, and the metrics they speak for."""
    for e in (StepMetrics(run_id=run, step=5, max_steps=10, loss=1.0, learning_rate=1e-3, tokens=640),
              StepMetrics(run_id=run, step=10, max_steps=10, loss=0.5, learning_rate=1e-3, tokens=600),
              EvalVerdict(run_id=run, request_id="r", checkpoint="checkpoints/checkpoint-10", step=10, split="val",
                          purpose="periodic", scores={"protocol": 0.5}, cases=8,
                          by_category={"math": {"protocol": 0.5, "cases": 8}}, seconds=1.0),
              DatasetReady(run_id=run, dataset_id="d", fingerprint="f", chat_template="base",
                           splits={"train": SplitInfo(path="data/train.jsonl", rows=10, categories={"math": 10})}),
              CheckpointRecorded(run_id=run, step=10, path="checkpoints/checkpoint-10", sha256="0" * 64, bytes=10)):
        exporter.count_event(run, e.KIND, "out")
        metrics.observe(e)
    metrics.EVAL_CASES.labels(run).inc(8)


def test_the_series_of_idle_runs_are_forgotten_and_the_count_comes_back(monkeypatch):
    monkeypatch.setattr(exporter, "LAST_EVENT", {})
    start = series()
    for i in range(5):
        a_run_passes(f"retention-{i}")
    grown = series()
    assert grown > start  # each run added its own series
    now = max(exporter.LAST_EVENT.values())
    exporter.LAST_EVENT["retention-4"] = now + 1000  # still active
    forgotten = exporter.forget_idle(900, now=now + 1000)
    assert sorted(forgotten) == [f"retention-{i}" for i in range(4)]
    assert series() == start + (grown - start) // 5  # only the active run's series are left
    exporter.forget("retention-4")
    assert series() == start


def test_tokens_are_counted_and_their_rate_is_the_throughput():
    before = REGISTRY.get_sample_value("tuneloop_train_tokens_total", {"run_id": "tokens"}) or 0
    for step, tokens in ((5, 640), (10, 600), (15, None)):
        metrics.observe(StepMetrics(run_id="tokens", step=step, max_steps=20, tokens=tokens))
    assert REGISTRY.get_sample_value("tuneloop_train_tokens_total", {"run_id": "tokens"}) - before == 1240
    exporter.forget("tokens")
