"""Real service processes talking over a real nats-server."""

import asyncio

import pytest

from helpers import make_run, run_id_for, tiny_config
from helpers import collect, wait_for
from tuneloop import subjects
from tuneloop.tools.client import ExportRefused, request_merged_export, send_control
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, ControlApplied, ControlRejected, DeadLetter,
                             EvalRequest, StepMetrics, TrainingFinished)

pytestmark = pytest.mark.integration


async def test_checkpoint_service_acts_on_trainer_events_and_survives_bad_ones(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    storage = make_run(tmp_path, run, tiny_config(tmp_path))
    for step in (10, 20):
        ck = storage / run / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "adapter_model.safetensors").write_bytes(b"weights" * step)
    recorded = await collect(bus, CheckpointRecorded, run)
    requests = await collect(bus, EvalRequest, run)
    dead = await collect(bus, DeadLetter, run)
    services(storage, nats_url, run).start("checkpoint")

    saved = lambda step, path: CheckpointSaved(run_id=run, step=step, path=path, base_model="base", adapter=True)
    await bus.publish(saved(10, "checkpoints/checkpoint-10"))
    await wait_for(lambda: recorded and requests, timeout=30)
    assert recorded[0].step == 10 and recorded[0].bytes == 70 and len(recorded[0].sha256) == 64
    assert requests[0].checkpoint == "checkpoints/checkpoint-10" and requests[0].split == "val"

    await bus.js.publish(subjects.subject(run, "ckpt.saved"), b'{"run_id": "%s", "step": "ten"}' % run.encode())
    await bus.publish(saved(11, "../../etc"))
    await bus.publish(saved(20, "checkpoints/checkpoint-20"))
    await wait_for(lambda: len(dead) == 2 and len(recorded) == 2, timeout=30)
    assert "step: Input should be a valid integer" in dead[0].reason and dead[0].service == "checkpoint"
    assert "leaves the run directory" in dead[1].reason
    assert [r.step for r in recorded] == [10, 20]
    assert not (storage / run / "checkpoints" / "checkpoint-11").exists()

    # A merged export of a run that exported nothing yet is refused, saying so; the service goes on.
    with pytest.raises(ExportRefused, match=f"run {run} has no exported adapter to merge"):
        await request_merged_export(nats_url, run, bus=bus, timeout=30)
    await bus.publish(saved(30, "checkpoints/checkpoint-20"))
    await wait_for(lambda: len(recorded) == 3, timeout=30)


async def test_controls_are_applied_at_a_step_boundary_and_acknowledged(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, max_steps=100000, learning_rate=3e-3)
    storage = make_run(tmp_path, run, cfg)
    steps = await collect(bus, StepMetrics, run)
    done = await collect(bus, TrainingFinished, run)
    saved = await collect(bus, CheckpointSaved, run)
    svc = services(storage, nats_url, run)
    svc.start("data-pipeline")
    svc.start("trainer")
    await wait_for(lambda: steps, timeout=120)

    applied = await send_control(nats_url, run, "set-lr", 0.001, bus=bus, timeout=60)
    assert isinstance(applied, ControlApplied), applied
    assert (applied.old, applied.new) == (3e-3, 1e-3) and applied.step >= 1
    await wait_for(lambda: any(s.step > applied.step + 1 for s in steps), timeout=60)
    later = [s for s in steps if s.step > applied.step + 1]
    assert later[0].learning_rate == pytest.approx(1e-3)

    for command, value, why in [("set-lr", -1.0, "must be in"), ("warp-speed", None, "unknown command"),
                                ("set-lr", "fast", "needs a number")]:
        answer = await send_control(nats_url, run, command, value, bus=bus, timeout=60)
        assert isinstance(answer, ControlRejected) and why in answer.reason, answer

    stopped = await send_control(nats_url, run, "stop", bus=bus, timeout=60)
    assert isinstance(stopped, ControlApplied) and stopped.step >= applied.step
    await wait_for(lambda: done, timeout=60)
    assert done[0].reason == "control" and done[0].step == stopped.step
    assert saved and saved[-1].step == stopped.step and saved[-1].is_final
    assert (storage / run / saved[-1].path / "adapter_model.safetensors").is_file()
    await asyncio.to_thread(svc.procs["trainer"].wait, 30)
    assert svc.procs["trainer"].returncode == 0, svc.log("trainer")[-2000:]
