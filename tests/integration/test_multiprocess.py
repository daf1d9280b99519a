"""Two training processes (torchrun, gloo on CPU) steered over a real nats-server.

Rank 0 reads the bus and broadcasts; at every checkpoint the ranks compare step, lr, controls
applied and a checksum of the weights, and the run fails if they differ.
"""

import re
from datetime import datetime, timezone

import pytest

from helpers import run_id_for
from helpers import wait_for
from test_trainer import ctl, losses_by_step, resumed, start_training
from tuneloop.events import CheckpointSaved, ControlApplied, ControlRejected, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration


async def test_two_processes_obey_every_control_on_every_rank(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, max_steps=100000, processes=2)
    steps, saved, done = ev[StepMetrics], ev[CheckpointSaved], ev[TrainingFinished]
    await wait_for(lambda: steps, timeout=180)

    paused = await ctl(nats_url, bus, run, "pause")
    assert isinstance(paused, ControlApplied)
    assert isinstance(await ctl(nats_url, bus, run, "pause"), ControlRejected)
    lr = await ctl(nats_url, bus, run, "set-lr", 7e-4)
    assert isinstance(lr, ControlApplied) and lr.step == paused.step
    assert isinstance(await ctl(nats_url, bus, run, "resume"), ControlApplied)
    now = await ctl(nats_url, bus, run, "checkpoint")
    await wait_for(lambda: any(c.step == now.step for c in saved), timeout=60)
    stop = await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: done, timeout=60)

    assert done[0].processes == 2 and done[0].reason == "control" and done[0].step == stop.step
    log = svc.log("trainer")
    assert "trainer[1]" in log, "rank 1 did not train"
    # Both ranks applied the same controls (pause, set-lr, resume, checkpoint; then stop) and hold the
    # same weights at both checkpoints.
    agreed = re.findall(r"2 ranks agree at step (\d+): .*'lr': ([0-9.e-]+), 'controls': (\d+)", log)
    assert (str(now.step), "0.0007", "4") in agreed, agreed
    assert (str(stop.step), "0.0007", "5") in agreed, agreed
    after = [(s.step, s.learning_rate) for s in steps if s.step > lr.step and s.loss is not None]
    assert after and all(v == pytest.approx(7e-4) for _, v in after), (lr.step, after)


async def test_two_processes_resume_exactly_after_sigkill(tmp_path, nats_url, bus, services, request):
    common = dict(max_steps=16, save_steps=8, logging_steps=1, lr_scheduler="cosine", warmup_steps=2, processes=2)
    base = run_id_for(request)
    _, ref = await start_training(tmp_path / "a", nats_url, bus, services, base + "a", **common)
    await wait_for(lambda: ref[TrainingFinished], timeout=240)
    expected = losses_by_step(ref[StepMetrics])
    assert sorted(expected) == list(range(1, 17)) and ref[TrainingFinished][0].processes == 2

    svc, ev = await start_training(tmp_path / "b", nats_url, bus, services, base + "b", **common)
    await wait_for(lambda: any(c.step == 8 for c in ev[CheckpointSaved]), timeout=240)
    svc.kill("trainer")  # torchrun and both ranks, at once
    restart = datetime.now(timezone.utc)
    svc.start("trainer", "--processes", "2")
    await wait_for(lambda: ev[TrainingFinished], timeout=240)
    ckpt, after = resumed(svc.log("trainer"), ev[StepMetrics], restart)  # not from step 0
    assert ckpt >= 8 and [s.step for s in after] == list(range(ckpt + 1, 17)), (ckpt, [s.step for s in after])
    for s in after:
        assert s.loss == pytest.approx(expected[s.step], rel=1e-5, abs=1e-6), s.step
    assert ev[TrainingFinished][0].step == 16 and ev[TrainingFinished][0].processes == 2
