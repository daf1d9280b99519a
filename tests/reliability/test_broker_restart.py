"""nats-server stopped for 10 s in the middle of a run and started again on the same store:
training goes on, and no control, checkpoint record, verdict or feedback is lost or applied
twice (counted from the stream afterwards)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from helpers import collect, make_run, stored, tiny_config, wait_for
from tuneloop.bus import Bus
from tuneloop.embedded import NatsServer
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, Control, ControlApplied, EvalVerdict, ExportDone,
                             Feedback, StepMetrics, TrainingFinished)

pytestmark = pytest.mark.reliability
OUTAGE_S = 10.0


async def test_a_broker_outage_loses_and_duplicates_nothing(tmp_path, services, figures):
    server = NatsServer(tmp_path / "nats")
    url = server.start()
    try:
        run = f"outage-{int(time.time()) % 10**6}"
        cfg = tiny_config(tmp_path, max_steps=160, save_steps=20, logging_steps=5)
        cfg.feedback.min_step = 10**6  # train the whole budget: the run's end must not depend on scores
        storage = make_run(tmp_path, run, cfg)
        svc = services(storage, url, run)
        for name in ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward"):
            svc.start(name)
        bus = await Bus.connect(url, "operator")
        try:
            steps, done = await collect(bus, StepMetrics, run), await collect(bus, ExportDone, run)
            await wait_for(lambda: any(s.step >= 10 for s in steps), timeout=180)
            before = Control(run_id=run, command="set-log-interval", value=2)
            await bus.publish(before)

            server.stop()  # the broker is gone; services and this client reconnect on their own
            down = time.monotonic()
            during = Control(run_id=run, command="set-lr", value=0.002)
            sending = asyncio.create_task(bus.publish(during, retry_seconds=60))  # stored once the broker is back
            await asyncio.sleep(OUTAGE_S)
            server.start()
            up_wall, up = time.time(), time.monotonic()
            await sending
            await wait_for(lambda: any(s.time.timestamp() > up_wall for s in steps), timeout=120)
            figures["recovery_s"] = round(time.monotonic() - up, 2)  # broker back -> the next training step seen
            figures["outage_s"] = round(up - down, 1)
            after = Control(run_id=run, command="set-grad-clip", value=0.5)
            await bus.publish(after)
            await wait_for(lambda: done, timeout=300)
        finally:
            await bus.close()

        got = await stored(url, run, (ControlApplied, CheckpointSaved, CheckpointRecorded, EvalVerdict, Feedback,
                                      TrainingFinished))
        finished = got[TrainingFinished][0]
        assert (finished.reason, finished.step) == ("completed", 160)
        applied = Counter(a.control_id for a in got[ControlApplied])
        assert applied == {before.event_id: 1, during.event_id: 1, after.event_id: 1}, applied
        saved = sorted(e.step for e in got[CheckpointSaved])
        recorded = sorted(e.step for e in got[CheckpointRecorded])
        periodic = sorted(v.step for v in got[EvalVerdict] if v.purpose == "periodic")
        expected = list(range(20, 161, 20))
        assert saved == recorded == periodic == expected, (saved, recorded, periodic)
        assert sorted(f.step for f in got[Feedback]) == expected
        figures.update(events_lost=0, duplicates_applied=0, checkpoints=len(recorded), verdicts=len(periodic))
    finally:
        server.stop()  # also when an assertion failed: no broker left behind
