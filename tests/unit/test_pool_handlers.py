"""The trainer pool's handler on an in-memory bus (``FakeBus``): which queued runs a worker
trains and which it leaves. Training itself is replaced by a record of the runs handed to it;
real pools training real runs are in tests/integration/test_pools.py and test_sweep.py."""

import asyncio
from datetime import timedelta

import pytest

from fakebus import FakeBus
from tuneloop.events import RunQueued, TrainingFinished
from tuneloop.service import ServiceContext
from tuneloop.trainer.__main__ import Pool


def pool(tmp_path) -> tuple[Pool, FakeBus, list[str]]:
    bus, trained = FakeBus("trainer"), []

    async def train(run_id: str) -> None:
        assert not p.idle.is_set()  # busy while it trains: a stopping worker waits for it
        trained.append(run_id)
    p = Pool(ServiceContext("trainer", bus, "*", tmp_path), train)
    return p, bus, trained


def test_a_worker_trains_the_newest_request_of_a_run_once(tmp_path):
    p, bus, trained = pool(tmp_path)
    older, newer = RunQueued(run_id="a"), RunQueued(run_id="a", attempt=1)
    asyncio.run(bus.publish(older))
    asyncio.run(bus.publish(newer))
    asyncio.run(p.on_queued(older))  # superseded by the restart's request: void
    asyncio.run(p.on_queued(newer))
    assert trained == ["a"] and p.idle.is_set()


def test_a_finished_run_is_not_trained_again_but_an_interrupted_one_is(tmp_path):
    p, bus, trained = pool(tmp_path)
    for run, reason in (("done", "completed"), ("cut", "interrupted")):
        queued = RunQueued(run_id=run)
        asyncio.run(bus.publish(queued))
        asyncio.run(bus.publish(TrainingFinished(run_id=run, step=5, reason=reason,
                                                 time=queued.time + timedelta(seconds=1))))
        asyncio.run(p.on_queued(queued))
    assert trained == ["cut"]


def test_a_stopping_worker_leaves_the_run_to_the_next(tmp_path):
    p, bus, trained = pool(tmp_path)
    p.ctx.stop.set()
    with pytest.raises(asyncio.CancelledError):  # not acked: redelivered to whoever serves the queue next
        asyncio.run(p.on_queued(RunQueued(run_id="a")))
    assert trained == []
