"""nats-server stopped for 40 s in the middle of a run and started again on the same store.
The trainer never waits for it: it trains on through the outage, saves checkpoints, answers a
control, and keeps what it publishes until the broker is back (longer than any publish
timeout). Afterwards no control, checkpoint record, verdict or feedback is lost or applied
twice (counted from the stream)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest

from helpers import collect, every_checkpoint_judged, make_run, stored_when, tiny_config, wait_for
from tuneloop.bus import Bus
from tuneloop.tools.embedded import NatsServer
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, Control, ControlApplied, EvalVerdict, ExportDone,
                             Feedback, StepMetrics, TrainingFinished)

pytestmark = pytest.mark.reliability
OUTAGE_S = 40.0  # longer than a publish's 30 s of patience used to be: it failed the run


async def test_a_broker_outage_loses_and_duplicates_nothing(tmp_path, services, figures):
    server = NatsServer(tmp_path / "nats")
    url = server.start()
    try:
        run = f"outage-{int(time.time()) % 10**6}"
        cfg = tiny_config(tmp_path, max_steps=100000, save_steps=50, logging_steps=5)
        cfg.feedback.min_step = 10**6  # the run ends by the operator's stop, not by scores
        storage = make_run(tmp_path, run, cfg)
        svc = services(storage, url, run)
        for name in ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward"):
            svc.start(name)
        bus = await Bus.connect(url, "operator")
        try:
            steps, done = await collect(bus, StepMetrics, run), await collect(bus, ExportDone, run)
            finished = await collect(bus, TrainingFinished, run)
            await wait_for(lambda: any(s.step >= 10 for s in steps), timeout=180)
            # A control the trainer holds but answers only once the broker is gone: frozen, it
            # gets the control (the broker hands it over at once), the broker stops, it thaws.
            trainer = svc.procs["trainer"].pid
            os.kill(trainer, signal.SIGSTOP)
            before = Control(run_id=run, command="set-log-interval", value=2)
            await bus.publish(before)
            await asyncio.sleep(0.3)
            server.stop()  # the broker is gone; services and this client reconnect on their own
            down_wall, down = time.time(), time.monotonic()
            os.kill(trainer, signal.SIGCONT)
            during = Control(run_id=run, command="set-lr", value=0.002)
            sending = asyncio.create_task(bus.publish(during, retry_seconds=OUTAGE_S + 60))  # stored once it is back
            await asyncio.sleep(OUTAGE_S)
            server.start()
            up_wall, up = time.time(), time.monotonic()
            await sending
            await wait_for(lambda: any(s.time.timestamp() > up_wall for s in steps), timeout=120)
            figures["recovery_s"] = round(time.monotonic() - up, 2)  # broker back -> a step trained after it seen
            figures["outage_s"] = round(up - down, 1)
            after = Control(run_id=run, command="set-grad-clip", value=0.5)
            await bus.publish(after)
            stop = Control(run_id=run, command="stop")
            await bus.publish(stop)
            await wait_for(lambda: finished and done, timeout=300)
        finally:
            await bus.close()

        kinds = (StepMetrics, ControlApplied, CheckpointSaved, CheckpointRecorded, EvalVerdict, Feedback, TrainingFinished)
        got = await stored_when(url, run, kinds, every_checkpoint_judged)
        end = got[TrainingFinished][0]
        applied = Counter(a.control_id for a in got[ControlApplied])
        saved = sorted(e.step for e in got[CheckpointSaved] if not e.snapshot)
        recorded = sorted(e.step for e in got[CheckpointRecorded] if not e.path.startswith("snapshots"))
        periodic = sorted(v.step for v in got[EvalVerdict] if v.purpose == "periodic")
        feedback = sorted(f.step for f in got[Feedback])
        in_outage = lambda events: sum(down_wall < e.time.timestamp() < up_wall for e in events)  # noqa: E731
        sent = [before.event_id, during.event_id, after.event_id, stop.event_id]
        # Counted from what the stream holds: what training did while the broker was away, and
        # controls and checkpoints missing or handled twice.
        figures.update(
            steps_trained_during_outage=len({s.step for s in got[StepMetrics] if down_wall < s.time.timestamp() < up_wall}),
            checkpoints_saved_during_outage=in_outage(e for e in got[CheckpointSaved] if not e.snapshot),
            answers_during_outage=in_outage(got[ControlApplied]),
            controls_lost=sum(c not in applied for c in sent), duplicates_applied=sum(n - 1 for n in applied.values()),
            checkpoints_lost=len(set(saved) - set(recorded)) + len(set(saved) - set(periodic)),
            checkpoints=len(recorded), verdicts=len(periodic), steps=end.step)
        assert end.reason == "control" and end.step > 50, end
        assert applied == {c: 1 for c in sent}, applied
        assert figures["steps_trained_during_outage"] > 0 and figures["checkpoints_saved_during_outage"] > 0, figures
        assert figures["answers_during_outage"] >= 1, figures
        assert saved == recorded == periodic == feedback and len(set(saved)) == len(saved), (saved, recorded, periodic)
    finally:
        server.stop()  # also when an assertion failed: no broker left behind
