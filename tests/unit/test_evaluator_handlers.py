"""The evaluator's handlers on an in-memory bus (``FakeBus``): a request is planned into
shards, a pruned run's work is skipped, and the verdict is published once every shard's counts
are in the bucket, by whichever replica stores the last one. Generation is replaced by canned
counts here (``score``); the real model and real nats-server are in
tests/integration/test_evaluators.py."""

import asyncio

import pytest

from fakebus import FakeBus, FakeKV
from helpers import make_run, tiny_config
from tuneloop.evaluator.__main__ import EvaluatorService
from tuneloop.evaluator.suite import ShardResult
from tuneloop.events import DatasetReady, EvalRequest, EvalShard, EvalVerdict, SplitInfo, TrainingFinished
from tuneloop.service import ServiceContext


class Canned(EvaluatorService):
    """Every shard's cases answered in the protocol, half of them correctly."""

    def score(self, sh: EvalShard) -> ShardResult:
        n = sh.end - sh.start
        return ShardResult(shard=sh.shard, cases={"math": n}, sums={"math": {"protocol": [n, n], "correctness": [n, n / 2]}},
                           worker=f"w{id(self)}")


@pytest.fixture
def replicas(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.eval.max_cases, cfg.eval.shard_size = 10, 4
    storage, bus, kv = make_run(tmp_path, "r", cfg), FakeBus("evaluator"), FakeKV()
    asyncio.run(bus.publish(DatasetReady(run_id="r", dataset_id="d", fingerprint="f", chat_template="t", splits={
        "val": SplitInfo(path="data/val.jsonl", rows=30), "test": SplitInfo(path="data/test.jsonl", rows=0)})))
    return [Canned(ServiceContext("evaluator", bus, "r", storage), kv) for _ in range(2)], bus


def request(split: str = "val") -> EvalRequest:
    return EvalRequest(run_id="r", step=10, checkpoint="checkpoints/checkpoint-10", base_model="base", adapter=True,
                       split=split, purpose="periodic")


def test_a_request_is_planned_into_shards_and_scored_into_one_verdict(replicas):
    (a, b), bus = replicas
    req = request()
    asyncio.run(a.on_request(req))
    shards = bus.of(EvalShard)
    assert [(s.start, s.end) for s in shards] == [(0, 4), (4, 8), (8, 10)] and {s.shards for s in shards} == {3}
    asyncio.run(b.on_shard(shards[0]))
    asyncio.run(a.on_shard(shards[2]))
    assert bus.of(EvalVerdict) == []  # shard 1 is still out
    asyncio.run(b.on_shard(shards[1]))
    [verdict] = bus.of(EvalVerdict)
    assert (verdict.request_id, verdict.cases, verdict.shards) == (req.event_id, 10, 3)
    assert verdict.scores["protocol"] == 1.0 and verdict.scores["correctness"] == 0.5
    asyncio.run(a.on_shard(shards[1]))  # redelivered: the same verdict again, stored once by its id
    assert len({v.event_id for v in bus.of(EvalVerdict)}) == 1


def test_a_split_without_rows_and_a_run_without_data_are_errors_and_a_pruned_run_is_skipped(replicas, tmp_path):
    (a, _), bus = replicas
    with pytest.raises(ValueError, match="data set d has no 'test' rows to evaluate on"):
        asyncio.run(a.on_request(request("test")))
    asyncio.run(bus.publish(TrainingFinished(run_id="r", step=10, reason="pruned")))
    asyncio.run(a.on_request(request()))
    assert bus.of(EvalShard) == []
    other = Canned(ServiceContext("evaluator", bus, "x", tmp_path / "runs"), FakeKV())
    with pytest.raises(RuntimeError, match="run x has no data set yet"):
        asyncio.run(other.on_request(request().model_copy(update={"run_id": "x"})))


class Scored(EvaluatorService):
    """Each case scored by a fixed list (its row in the split): protocol 1.0 or 0.0."""

    def __init__(self, *a, by_row, **k):
        super().__init__(*a, **k)
        self.by_row = by_row

    def score(self, sh: EvalShard) -> ShardResult:
        xs = [self.by_row[r] for r in sh.rows]
        return ShardResult(shard=sh.shard, cases={"math": len(xs)}, sums={"math": {"protocol": [len(xs), sum(xs)]}},
                           values={"protocol": xs}, worker=f"w{id(self)}")


def sequential_replicas(tmp_path, by_row, **feedback):
    cfg = tiny_config(tmp_path)
    cfg.eval.max_cases, cfg.eval.shard_size = 30, 6
    cfg.feedback = cfg.feedback.model_copy(update={"metric": "protocol", "target": 0.9, "confidence": 0.8, **feedback})
    storage, bus, kv = make_run(tmp_path, "r", cfg), FakeBus("evaluator"), FakeKV()
    asyncio.run(bus.publish(DatasetReady(run_id="r", dataset_id="d", fingerprint="f", chat_template="t", splits={
        "val": SplitInfo(path="data/val.jsonl", rows=40)})))
    return [Scored(ServiceContext("evaluator", bus, "r", storage), kv, by_row=by_row) for _ in range(2)], bus


def test_a_sequential_verdict_ends_once_its_decision_is_settled_and_skips_the_rest(tmp_path):
    """Every answer wrong, no best yet: after the first shard the bound says the target is not
    reached, the verdict says so on 6 of 30 cases and the queued shards are skipped; the cases
    come from the whole split in a shuffled order, the same for every request of the run."""
    (a, b), bus = sequential_replicas(tmp_path, [0.0] * 40)
    asyncio.run(a.on_request(request()))
    shards = bus.of(EvalShard)
    rows = [r for s in shards for r in s.rows]
    assert len(shards) == 5 and len(set(rows)) == 30 and rows != sorted(rows) and max(rows) >= 30
    asyncio.run(b.on_shard(shards[0]))
    [v] = bus.of(EvalVerdict)
    assert (v.cases, v.planned, v.shards) == (6, 30, 1) and v.ended.startswith("settled: target not reached")
    assert v.bounds["protocol"][0] == 0.0 and v.bounds["protocol"][1] < 0.9 and v.confidence == 0.8
    for sh in shards[1:]:
        asyncio.run(a.on_shard(sh))
    assert len(bus.of(EvalVerdict)) == 1  # nothing scored after it
    asyncio.run(a.on_request(request().model_copy(update={"event_id": "again"})))
    assert [r for s in bus.of(EvalShard)[5:] for r in s.rows] == rows  # the run's order


def test_a_reached_target_is_confirmed_on_the_whole_split_before_it_stops_the_run(tmp_path):
    """Every answer right, target 0.7: the first shard's bound already clears it, but a stop is
    for good, so the verdict scores all 30 cases and its bound is of all of them."""
    (a, b), bus = sequential_replicas(tmp_path, [1.0] * 40, target=0.7)
    asyncio.run(a.on_request(request()))
    shards = bus.of(EvalShard)
    asyncio.run(b.on_shard(shards[0]))
    assert not bus.of(EvalVerdict)  # settled on 6 cases, yet not ended
    for sh in shards[1:]:
        asyncio.run(b.on_shard(sh))
    [v] = bus.of(EvalVerdict)
    assert (v.cases, v.planned, v.shards) == (30, 30, 5) and v.ended == "all 30 cases scored", v.ended
    assert v.bounds["protocol"][0] >= 0.7


def test_a_close_decision_scores_on_while_more_cases_could_settle_it_and_a_final_verdict_scores_all(tmp_path):
    """0.9 against a target of 0.7: the first shard cannot tell, more cases can, so scoring
    goes on past it. Exactly at the target (half right, target 0.5) not even the whole split
    would tell: the verdict ends unsettled after the first shard. A final verdict scores all
    and still reports its bound."""
    (a, b), bus = sequential_replicas(tmp_path, ([1.0] * 9 + [0.0]) * 4, target=0.7)
    asyncio.run(a.on_request(request()))
    for sh in bus.of(EvalShard):
        asyncio.run(b.on_shard(sh))
    [v] = bus.of(EvalVerdict)
    assert v.cases > 6 and v.planned == 30, v.ended  # past the first shard
    (a, b), bus = sequential_replicas(tmp_path / "even", [1.0, 0.0] * 20, target=0.5)
    asyncio.run(a.on_request(request()))
    for sh in bus.of(EvalShard):
        asyncio.run(b.on_shard(sh))
    [v] = bus.of(EvalVerdict)
    assert v.cases == 6 and v.ended.startswith("unsettled, and the whole split would not settle it"), v.ended
    lo, hi = v.bounds["protocol"]
    assert lo < 0.5 < hi
    (a, b), bus = sequential_replicas(tmp_path / "final", [0.0] * 40)
    asyncio.run(a.on_request(request().model_copy(update={"purpose": "final"})))
    shards = bus.of(EvalShard)
    assert all(s.rows is None for s in shards)  # the split's first rows, as before
    for sh in shards:
        asyncio.run(b.on_shard(sh.model_copy(update={"rows": list(range(sh.start, sh.end))})))
    [v] = bus.of(EvalVerdict)
    assert v.cases == 30 and v.ended == "all 30 cases scored" and v.bounds["protocol"][1] < 0.15


def test_cases_are_read_by_range_or_by_rows_and_all_of_them_costs_nothing_extra(tmp_path):
    """``end`` may be "every case" (10**9): the range is not materialised (a set of it took the
    benchmark's scorer to 24 GB and the OOM killer); rows come back in the order asked."""
    import json
    import resource

    from tuneloop.evaluator.__main__ import load_cases

    split = tmp_path / "test.jsonl"
    split.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(10)) + "\n\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert [c.prompt for c in load_cases(split, 0, 10**9)] == [f"p{i}" for i in range(10)]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no billion-entry set
    assert [c.prompt for c in load_cases(split, 3, 6)] == ["p3", "p4", "p5"]
    assert [c.prompt for c in load_cases(split, 0, 0, rows=[7, 2, 9])] == ["p7", "p2", "p9"]
