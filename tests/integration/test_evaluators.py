"""Evaluators sharing one evaluation: shards on a JetStream work queue, one verdict per
request, and a shard of a killed evaluator finished by another. Real nats-server, real
models and generation."""

import asyncio
import re
from datetime import datetime, timezone

import pytest

from helpers import make_run, run_id_for, tiny_config
from helpers import wait_for
from tuneloop.events import DatasetReady, EvalRequest, EvalVerdict, derived_id
from tuneloop.storage import confine
from tuneloop.trainer import model as models

pytestmark = pytest.mark.integration


async def prepared_run(tmp_path, nats_url, bus, services, request, run_id=None, **eval_cfg):
    """A run with its data set announced and an (untrained) base model to evaluate."""
    run = run_id or run_id_for(request)
    cfg = tiny_config(tmp_path)
    cfg.data.max_rows, cfg.data.test_fraction = 2000, 0.1
    cfg.eval = cfg.eval.model_validate({**cfg.eval.model_dump(), **eval_cfg})
    storage = make_run(tmp_path, run, cfg)
    svc = services(storage, nats_url, run)
    svc.start("data-pipeline")
    for _ in range(300):
        ds = await bus.latest(DatasetReady, run)
        if ds:
            break
        await asyncio.sleep(0.1)
    rdir = storage / run
    models.build_tiny(confine(rdir, ds.splits["train"].path), rdir / "base", cfg.model.tiny, 0)
    verdicts: list[EvalVerdict] = []

    async def on_verdict(v):
        verdicts.append(v)

    await bus.follow(EvalVerdict, run, on_verdict)  # what the stream stored: duplicates would show
    return run, svc, verdicts


def request_for(run, max_cases):
    return EvalRequest(run_id=run, step=1, checkpoint="base", base_model="base", adapter=False, split="test",
                       purpose="manual", max_cases=max_cases)


async def test_two_evaluators_share_the_shards_and_publish_one_verdict(tmp_path, nats_url, bus, services, request):
    run, svc, verdicts = await prepared_run(tmp_path, nats_url, bus, services, request, shard_size=10,
                                            max_new_tokens=24)
    svc.start("evaluator")
    svc.start("evaluator")
    # Both pulling before the work arrives (a slow start would let one evaluator take every shard).
    await wait_for(lambda: svc.log("evaluator").count("evaluator serving run") == 2, timeout=120)
    await asyncio.sleep(2)
    await bus.publish(request_for(run, 120))
    await wait_for(lambda: verdicts, timeout=180)
    await asyncio.sleep(3)
    assert len(verdicts) == 1, verdicts
    v = verdicts[0]
    assert (v.cases, v.shards, v.split) == (120, 12, "test")
    assert len(v.workers) == 2, f"one evaluator did all the work: {v.workers}"
    assert sum(c["cases"] for c in v.by_category.values()) == 120
    assert 0.0 <= v.scores["protocol"] <= 1.0 and v.failures  # an untrained model fails, and says how


async def test_a_shard_of_a_killed_evaluator_is_finished_by_another(tmp_path, nats_url, bus, services, request,
                                                                    figures):
    run, svc, verdicts = await prepared_run(tmp_path, nats_url, bus, services, request, shard_size=24,
                                            max_new_tokens=48)
    first = svc.start("evaluator")
    await wait_for(lambda: "evaluator serving run" in svc.log("evaluator"), timeout=120)
    await asyncio.sleep(2)
    await bus.publish(request_for(run, 120))
    await wait_for(lambda: re.search(r"shard 2/5", svc.log("evaluator")), timeout=120)
    svc.kill(first)
    killed = datetime.now(timezone.utc)
    taken = re.findall(r"shard (\d)/5", svc.log("evaluator"))
    unfinished = taken[-1]  # the shard it was working on when it died: never acked
    assert not verdicts
    svc.start("evaluator")
    await wait_for(lambda: verdicts, timeout=180)
    await asyncio.sleep(3)
    taken_again = len(re.findall(rf"shard {unfinished}/5", svc.log("evaluator")))
    figures.update(verdicts=len(verdicts), cases=sum(v.cases for v in verdicts), shard_taken_times=taken_again,
                   kill_to_verdict_s=round((verdicts[0].time - killed).total_seconds(), 1))
    assert len(verdicts) == 1 and verdicts[0].cases == 120 and verdicts[0].shards == 5
    assert taken_again >= 2, "the shard was not redelivered"


async def test_the_longest_run_id_gets_every_shard_of_its_baseline_evaluation(tmp_path, nats_url, bus, services, request):
    """Derived ids once cut to 64 characters: every shard of a long run id's baseline request
    had the same id, JetStream kept one, and the verdict never came."""
    run = (run_id_for(request) + "-" + "x" * 64)[:64]
    run, svc, verdicts = await prepared_run(tmp_path, nats_url, bus, services, request, run_id=run, shard_size=5,
                                            max_new_tokens=8)
    svc.start("evaluator")
    await bus.publish(EvalRequest(run_id=run, event_id=derived_id("baseline", run), step=0, checkpoint=None,
                                  base_model="base", adapter=False, split="test", purpose="baseline", max_cases=20))
    await wait_for(lambda: verdicts, timeout=180)
    assert (verdicts[0].cases, verdicts[0].shards, verdicts[0].purpose) == (20, 4, "baseline")  # every shard scored
