"""The training thread's view of the bus.

Training is synchronous and runs in a worker thread; the bus lives on the service's asyncio
loop. ``BusLink`` crosses between them: the loop side puts arriving control and feedback
events into an inbox, and the callback drains it at each step boundary. A control is only
acked on the bus once the training thread has applied (or rejected) it, so a trainer that
dies before the boundary gets it again after a restart.

Events go the other way through an outbox that the loop empties every ``FLUSH_S``: waking
the loop from the training thread at every step costs more than the step itself on a fast
GPU (measured: -13% tokens/s at 18 ms steps), so the training thread never wakes it for them.
What has piled up goes out as one batch (``Bus.publish_batch``: sent together, acks awaited
together), so the loop, nats-server and every watcher wake once per flush, not once per
event: on cores the training keeps busy, each wake-up preempts a training thread. Checkpoint
announcements and control answers are flushed at once.

The training thread never waits for the broker. While it is away (a restart, an outage of
minutes), the outbox keeps what training produces, in order, and the loop retries each event
until JetStream has stored it. The outbox holds at most ``OUTBOX_MAX`` events (a few MB);
when it is full, the training thread waits at its next publish until the broker is back:
memory stays bounded and nothing is dropped. A control is acknowledged on the bus only once
its answer is stored (``publish(..., then=done)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
from collections.abc import Awaitable, Callable

from tuneloop.bus import Bus
from tuneloop.events import (
    Control, ControlRejected, DataSwitch, DatasetReady, Event, ProposalDecision, ProposalResolved, RewardReply, RewardRequest,
)

log = logging.getLogger(__name__)
FLUSH_S = 0.5
BATCH_MAX = 256  # events published in one batch
OUTBOX_MAX = 10_000  # events; a train.step event is ~0.4 kB: ~4 MB at most


class BusLink:
    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop):
        self.bus = bus
        self.loop = loop
        self.inbox: queue.Queue[tuple[Event, Callable[[], None]]] = queue.Queue()
        self.stopping = threading.Event()  # set by SIGTERM: save and stop at the next boundary
        self.datasets: dict[str, DatasetReady] = {}  # every data set announced for the run, for set-data
        # What the checkpoint service recorded (run-relative path -> sha256): resume checks against it.
        self.recorded: dict[str, str] = {}
        self.outbox: queue.Queue[tuple[Event, Callable[[], None] | None]] = queue.Queue(OUTBOX_MAX)
        self._pump: asyncio.Task | None = None
        self._flushing = asyncio.Lock()  # one flush at a time: events leave in the order queued
        self._late: Callable[[Event], Awaitable[None]] | None = None  # set when the run has ended

    # loop side -----------------------------------------------------------
    def start(self) -> None:
        self._pump = self.loop.create_task(self._pump_outbox())

    async def close(self) -> None:
        """Stop the pump after publishing whatever the training thread left in the outbox."""
        if self._pump:
            self._pump.cancel()
        await self.flush()

    async def _pump_outbox(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        async with self._flushing:
            await self._drain()

    async def _drain(self) -> None:
        while True:
            batch = []
            with contextlib.suppress(queue.Empty):
                while len(batch) < BATCH_MAX:
                    batch.append(self.outbox.get_nowait())
            if not batch:
                return
            # retried until stored, however long the broker is away (the outbox is bounded)
            errors = await self.bus.publish_batch([e for e, _ in batch], retry_seconds=math.inf)
            for (event, then), error in zip(batch, errors):
                if error is not None:  # refused for good (permissions, the bus closing): logged, not retried
                    log.warning("publish %s failed: %r", event.KIND, error)
                if then:
                    then()

    async def end(self, answer: Callable[[Event], Awaitable[None]]) -> None:
        """Training has ended: ``answer`` what waits in the inbox, and from now on whatever
        ``deliver`` is handed, instead of leaving its handler (and its consumer, which cannot
        stop while a handler runs) waiting for a step boundary that will never come."""
        self._late = answer
        for event, done in self.drain():
            await answer(event)
            done()

    async def remember_dataset(self, event: DatasetReady) -> None:
        self.datasets[event.dataset_id] = event

    async def deliver(self, event: Event) -> None:
        """Bus handler: hand ``event`` to the training thread; return once it was handled.
        After the run's end (``end``) no step boundary will come: it is answered at once.
        Adaptive data's ``data.switch`` is taken as the ``set-data`` control it stands for."""
        if isinstance(event, DataSwitch):
            event = event.as_control()
        if self._late is not None:
            await self._late(event)
            return
        done = self.loop.create_future()
        self.inbox.put((event, lambda: self.loop.call_soon_threadsafe(_resolve, done)))
        await done

    # training-thread side -------------------------------------------------
    def drain(self) -> list[tuple[Event, Callable[[], None]]]:
        items = []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def wait(self, timeout: float) -> list[tuple[Event, Callable[[], None]]]:
        """Block up to ``timeout`` for at least one event (used while paused), then drain."""
        try:
            first = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        return [first, *self.drain()]

    def publish(self, event: Event, *, now: bool = False, then: Callable[[], None] | None = None) -> None:
        """Publish from the training thread: queued for the pump, in order; with ``now``, the
        loop is woken to send it at once. The training thread goes on either way; ``then`` is
        called once JetStream stored the event (e.g. to acknowledge the control it answers)."""
        try:
            self.outbox.put_nowait((event, then))
        except queue.Full:
            log.warning("the broker has not taken events for a while: %d queued; training waits for it", OUTBOX_MAX)
            self.outbox.put((event, then))
        if now or then:
            asyncio.run_coroutine_threadsafe(self.flush(), self.loop)

    def score(self, request: RewardRequest, timeout: float = 60.0) -> RewardReply:
        """Ask the rl-reward service (any member of its queue group) to score completions."""
        return asyncio.run_coroutine_threadsafe(
            self.bus.request(request, RewardReply, timeout=timeout), self.loop).result(timeout + 5)


class FollowerLink:
    """What ranks other than 0 have instead of the bus: nothing arrives, nothing is sent.

    Their events come from rank 0's broadcast at each step boundary (see ``SteeringCallback``).
    """

    def __init__(self):
        self.stopping = threading.Event()
        self.datasets: dict[str, DatasetReady] = {}

    def drain(self) -> list:
        return []

    def wait(self, timeout: float) -> list:
        return []

    def publish(self, event: Event, *, now: bool = False, then: Callable[[], None] | None = None) -> None:
        if then:
            then()


def too_late(bus: Bus, run_id: str, step: int) -> Callable[[Event], Awaitable[None]]:
    """How a finished run answers what reaches it: a control is rejected and a proposal's
    decision resolved as "training has finished", so the operator is not left waiting;
    feedback needs no answer. The answer's id comes from the event's, so an event delivered
    again (its consumer stopped before the ack) is answered once in the stream."""
    async def answer(event: Event) -> None:
        answer_id = f"{event.event_id[:59]}.late"
        if isinstance(event, Control):
            await bus.publish(ControlRejected(event_id=answer_id, run_id=run_id, control_id=event.event_id,
                                              command=event.command, step=step, reason="training has finished"))
        elif isinstance(event, ProposalDecision):
            await bus.publish(ProposalResolved(event_id=answer_id, run_id=run_id, proposal_id=event.proposal_id,
                                               command="", outcome="unknown", applied=False, step=step,
                                               by=event.operator, decision_id=event.event_id,
                                               reason="training has finished"))
    return answer


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)

