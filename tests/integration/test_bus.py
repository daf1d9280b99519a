"""The bus against a real nats-server: durable delivery, dead letters, request/reply."""

import asyncio
import json

import pytest

from helpers import collect, wait_for
from tuneloop import subjects
from tuneloop.bus import BusError
from tuneloop.events import Control, DeadLetter, Feedback

pytestmark = pytest.mark.integration


async def consumed(bus, cls, run: str, group: str, fail: bool = False, **options) -> list:
    """What a durable consumer of ``cls`` gets, in a list; with ``fail`` its handler raises."""
    got = []

    async def on(e):
        got.append(e)
        if fail:
            raise RuntimeError("boom")

    await bus.consume(cls, run, on, group=group, **options)
    return got


async def test_durable_event_reaches_a_consumer_that_starts_later_once(bus):
    ev = Feedback(run_id="bus-late", step=1, action="continue", reason="r", score=0.5)
    await bus.publish(ev)
    await bus.publish(ev)  # same event_id: JetStream keeps one
    got = await consumed(bus, Feedback, "bus-late", "late")
    await wait_for(lambda: got)
    await asyncio.sleep(0.5)
    assert [e.event_id for e in got] == [ev.event_id] and got[0].source == "test"


async def test_malformed_event_is_dead_lettered_and_the_consumer_goes_on(bus):
    run = "bus-dlq"
    dead = await collect(bus, DeadLetter, run)
    got = await consumed(bus, Control, run, "dlq-test")
    subj = subjects.subject(run, Control.KIND)
    await bus.js.publish(subj, b'{"run_id": "bus-dlq", "comand": "stop"}')
    await bus.js.publish(subj, b"\xff not json")
    good = Control(run_id=run, command="stop")
    await bus.publish(good)
    await wait_for(lambda: len(dead) == 2 and got)
    assert [e.event_id for e in got] == [good.event_id]
    assert "command: Field required" in dead[0].reason and "comand" in dead[0].payload
    assert dead[0].subject == subj and dead[0].service == "test"
    assert "invalid Control" in dead[1].reason


async def test_failing_handler_is_retried_then_dead_lettered(bus):
    run = "bus-retry"
    dead = await collect(bus, DeadLetter, run)
    calls = await consumed(bus, Control, run, "retry", fail=True, max_deliver=2)
    await bus.publish(Control(run_id=run, command="stop"))
    await wait_for(lambda: dead, timeout=20)
    assert len(calls) == 2 and "handler failed 2 times" in dead[0].reason


async def test_request_reply_with_timeout_and_error_answers(bus):
    from tuneloop.events import RewardReply, RewardRequest

    async def handler(req):
        return RewardReply(run_id=req.run_id, rewards=[float(len(c)) for c in req.completions])

    await bus.serve(RewardRequest, "bus-rr", handler, queue="q")
    reply = await bus.request(RewardRequest(run_id="bus-rr", completions=["ab", "c"]), RewardReply, timeout=5)
    assert reply.rewards == [2.0, 1.0]
    msg = await bus.nc.request(subjects.subject("bus-rr", "reward.score"), b'{"run_id": "bus-rr"}', timeout=5)
    assert "completions: Field required" in json.loads(msg.data)["error"]
    with pytest.raises(BusError, match="no service answers"):
        await bus.request(RewardRequest(run_id="bus-nobody", completions=["x"]), RewardReply, timeout=2)


async def test_a_dead_letter_that_cannot_be_stored_leaves_the_message_for_later_and_the_consumer_alive(
        bus, monkeypatch):
    run = "bus-dlq-fails"
    dead = await collect(bus, DeadLetter, run)
    got = []
    real, failures = bus.dead_letter, []

    async def dead_letter_once_failing(subj, reason, payload):  # as when the broker is away at that moment
        if not failures:
            failures.append(reason)
            raise BusError("could not publish: broker away")
        await real(subj, reason, payload)

    monkeypatch.setattr(bus, "dead_letter", dead_letter_once_failing)

    async def on(e):
        got.append(e)

    await bus.consume(Control, run, on, group="dlq-fails", ack_wait=2)
    await bus.js.publish(subjects.subject(run, Control.KIND), b"\xff not json")
    await wait_for(lambda: failures)
    good = Control(run_id=run, command="stop")
    await bus.publish(good)
    await wait_for(lambda: got, timeout=10)  # the consumer survived the failed dead letter
    await wait_for(lambda: dead, timeout=20)  # the message came back after its ack wait and was dead-lettered
    assert [e.event_id for e in got] == [good.event_id] and len(dead) == 1 and "invalid Control" in dead[0].reason


async def ended(call) -> None:
    """Await ``call``, failing if it has not returned in 30 s; unlike ``wait_for``, the timeout
    does not cancel it (a second cancellation would rescue the very hang under test)."""
    task = asyncio.ensure_future(call)
    await asyncio.wait({task}, timeout=30)
    assert task.done(), f"{call.__qualname__} still waits after 30 s"
    task.result()


async def stuck(handed: list):
    """A handler that can no longer run (nothing will ever answer it), and that swallows the
    first cancellation, as nats-py's fetch under Python 3.11 can (CPython gh-86296): a consumer
    stopped with one cancel would wait on it forever."""
    async def on(ev):
        handed.append(ev.event_id)
        try:
            await asyncio.Future()
        except asyncio.CancelledError:
            await asyncio.Future()
    return on


async def test_a_consumer_told_to_stop_ends_whatever_arrives_and_loses_nothing(bus):
    """Messages arrive while the consumer is told to stop, 40 times over, at every offset from
    the stop: each stop ends, and every message comes to the next consumer of the durable."""
    run, group, published, handed = "bus-stop-race", "stopper", [], []
    options = dict(group=group, ack_wait=2, max_deliver=1000)  # each stop sends the ones before back once more
    for i in range(40):
        task = await bus.consume(Control, run, await stuck(handed), concurrency=4, **options)

        async def publish(delay: float):
            await asyncio.sleep(delay)
            ev = Control(run_id=run, command="stop")
            published.append(ev.event_id)
            await bus.publish(ev)
        senders = [asyncio.create_task(publish(0.005 * k * (i % 7))) for k in range(3)]
        await asyncio.sleep(0.01 * (i % 5))
        await ended(bus.stop_consuming(task))
        assert task.done()
        await asyncio.gather(*senders)
    got = []

    async def keep(ev):
        got.append(ev.event_id)
    final = await bus.consume(Control, run, keep, concurrency=64, **options)
    await wait_for(lambda: set(got) >= set(published), timeout=60)
    await bus.stop_consuming(final)
    assert len(published) == 120 and set(got) == set(published)


async def test_a_finished_runs_link_answers_every_control_once_and_its_consumers_stop(bus):
    """The trainer's end of run (``BusLink.end``, then ``stop_consuming``) with controls landing
    all the while, 20 runs over: the end never waits, and every control is rejected as "training
    has finished", once, by the finished run or by whoever consumes its durable next."""
    from tuneloop.events import ControlRejected
    from tuneloop.trainer.link import BusLink, too_late

    loop = asyncio.get_running_loop()
    for i in range(20):
        run = f"bus-end-{i}"
        link = BusLink(bus, loop)  # nothing trains: no step boundary will come, as after the last one
        consumer = await bus.consume(Control, run, link.deliver, group="trainer", ack_wait=2, concurrency=64)
        controls = [Control(run_id=run, command="set-lr", value=1e-4) for _ in range(4)]

        async def send(k: int, ev: Control):
            await asyncio.sleep(0.004 * k * (i % 5))
            await bus.publish(ev)
        senders = [asyncio.create_task(send(k, ev)) for k, ev in enumerate(controls)]
        await asyncio.sleep(0.01 * (i % 3))
        await ended(link.end(too_late(bus, run, step=7)))
        await ended(bus.stop_consuming(consumer))
        await asyncio.gather(*senders)
        # What the stop sent back goes to the durable's next consumer: a run that has ended.
        after = BusLink(bus, loop)
        await after.end(too_late(bus, run, step=7))
        again = await bus.consume(Control, run, after.deliver, group="trainer", ack_wait=2, concurrency=64)
        async with asyncio.timeout(60):
            while await bus.pending(Control, run, "trainer"):
                await asyncio.sleep(0.1)
        await bus.stop_consuming(again)
        answers = await bus.history(ControlRejected, run)
        assert sorted(a.control_id for a in answers) == sorted(c.event_id for c in controls), i
        assert {a.reason for a in answers} == {"training has finished"} and {a.step for a in answers} == {7}


async def test_a_bus_used_as_a_context_closes_and_a_service_bus_keeps_to_its_topology(nats_url):
    from tuneloop.bus import Bus
    from tuneloop.topology import TopologyError

    async with await Bus.connect(nats_url, "data-pipeline") as bus:
        with pytest.raises(TopologyError, match="data-pipeline may not publish 'control'"):
            await bus.publish(Control(run_id="topo", command="stop"))
        with pytest.raises(TopologyError, match="data-pipeline may not consume 'control'"):
            await bus.consume(Control, "topo", lambda e: None)
        assert await bus.history(Control, "topo") == []  # nothing was sent
    assert bus.nc.is_closed
