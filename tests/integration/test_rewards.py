"""The rl-reward service over request/reply: per-item errors, whole-request errors, and a
service that keeps answering after bad requests. Real nats-server, real service processes."""

import asyncio

import pytest

from helpers import make_run, run_id_for, tiny_config, wait_for
from tuneloop import subjects
from tuneloop.bus import BusError
from tuneloop.events import RewardReply, RewardRequest

pytestmark = pytest.mark.integration

GOOD = '{"task": "math", "answer": "4"}'


async def ask(bus, req, timeout=30):
    for _ in range(100):  # the service may still be starting
        try:
            return await bus.request(req, RewardReply, timeout=timeout)
        except BusError as e:
            if "no service answers" not in str(e):
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("rl-reward never answered")


async def test_malformed_completions_get_per_item_errors_and_the_service_survives(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    storage = make_run(tmp_path, run, tiny_config(tmp_path))
    svc = services(storage, nats_url, run)
    svc.start("rl-reward")
    svc.start("rl-reward")  # two replicas in one queue group: each request answered once

    reply = await ask(bus, RewardRequest(run_id=run, completions=[GOOD, "{not json", "", GOOD],
                                         references=["4", "4", "4", None], categories=["math"] * 4,
                                         weights={"protocol": 1.0, "correctness": 1.0}))
    assert reply.rewards[:3] == [1.0, 0.0, 0.0] and reply.rewards[3] is None
    assert reply.errors[:3] == [None, None, None] and "correctness needs a reference" in reply.errors[3]

    with pytest.raises(BusError, match="unknown reward function.*'vibes'"):
        await ask(bus, RewardRequest(run_id=run, completions=[GOOD], weights={"vibes": 1.0}))
    raw = await bus.nc.request(subjects.subject(run, RewardRequest.KIND), b'{"run_id": "' + run.encode() + b'", "completions": 7}', timeout=10)
    assert b"completions" in raw.data and b"error" in raw.data  # an error reply naming the field

    again = await ask(bus, RewardRequest(run_id=run, completions=[GOOD], categories=["math"]))
    assert again.rewards == [1.0]
    # Answered once: of the two replicas in the queue group, one replies to each request.
    replies = []

    async def got(msg):
        replies.append(msg)

    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox, cb=got)
    req = RewardRequest(run_id=run, completions=[GOOD], categories=["math"])
    for _ in range(5):
        await bus.nc.publish(subjects.subject(run, RewardRequest.KIND), req.model_dump_json().encode(), reply=inbox)
    await wait_for(lambda: len(replies) >= 5, timeout=60)
    await asyncio.sleep(1.0)  # a second answer to any of them would come about as fast as the first
    await sub.unsubscribe()
    assert len(replies) == 5 and all(b'"rewards":[1.0]' in m.data.replace(b" ", b"") for m in replies), replies
    assert all(p.poll() is None for p in svc.every), "a bad request took a replica down"
