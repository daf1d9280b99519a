"""Services killed mid-work: an rl-reward replica that hangs mid-request and is then killed (its
peer takes over; GRPO's losses equal an undisturbed run's), and the checkpoint service killed
while checkpoints arrive (restarted, it records every checkpoint exactly once).
The trainer (SIGKILL + exact resume) and an evaluator killed mid-shard (redelivery) are covered
in tests/integration (test_trainer.py, test_multiprocess.py, test_evaluators.py)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from helpers import collect, make_run, stored, tiny_config, wait_for
from tuneloop.events import CheckpointRecorded, CheckpointSaved, ControlApplied, ExportDone, StepMetrics, TrainingFinished
from tuneloop.tools.client import send_control

pytestmark = pytest.mark.reliability
GRPO = {"num_generations": 4, "max_completion_length": 12, "rewards": {"protocol": 1.0, "correctness": 1.0}}


async def grpo_run(tmp_path, nats_url, bus, services, run: str, disturb=None) -> tuple[list, TrainingFinished, object]:
    """24 GRPO steps; a disturbed run holds itself after step 12's checkpoint (``pause_every``),
    so the disturbance lands mid-run however fast the machine trains."""
    storage = make_run(tmp_path / run, run, tiny_config(tmp_path / run, method="grpo", max_steps=24, batch_size=8,
                                                         logging_steps=1, save_steps=12, grpo=GRPO,
                                                         pause_every=12 if disturb else None))
    svc = services(storage, nats_url, run)
    steps, done = await collect(bus, StepMetrics, run), await collect(bus, TrainingFinished, run)
    svc.start("rl-reward")
    svc.start("data-pipeline")
    svc.start("trainer")
    if disturb:
        await disturb(svc, steps)
    await wait_for(lambda: done, timeout=300)
    return steps, done[0], svc


async def test_a_reward_replica_that_hangs_and_dies_mid_request_is_replaced_by_its_peer(tmp_path, nats_url, bus,
                                                                                       services, figures):
    stamp = int(time.time()) % 10**6
    base_steps, base_done, _ = await grpo_run(tmp_path, nats_url, bus, services, f"reward-calm-{stamp}")

    async def freeze_then_kill(svc, steps):
        """While the run is held at step 12, the only replica is frozen; after the resume the
        trainer's next request goes to it and hangs. Once the trainer has asked again, a peer
        starts and the frozen replica is killed."""
        await wait_for(lambda: any(s.paused and s.step == 12 for s in steps), timeout=180)
        frozen = svc.procs["rl-reward"]
        os.kill(frozen.pid, signal.SIGSTOP)  # holds whatever request it gets: "mid-request"
        assert isinstance(await send_control(nats_url, svc.run_id, "resume", bus=bus, timeout=60), ControlApplied)
        await wait_for(lambda: "asking again" in svc.log("trainer"), timeout=120)
        svc.start("rl-reward")
        os.kill(frozen.pid, signal.SIGKILL)
        frozen.wait()

    t0 = time.monotonic()
    steps, done, svc = await grpo_run(tmp_path, nats_url, bus, services, f"reward-kill-{stamp}", freeze_then_kill)
    assert (done.reason, done.step) == ("completed", 24) and (base_done.reason, base_done.step) == ("completed", 24)
    losses = {s.step: s.loss for s in steps if s.loss is not None and not s.paused}
    base = {s.step: s.loss for s in base_steps if s.loss is not None}
    same = losses.keys() == base.keys() and all(abs(losses[k] - base[k]) <= 1e-4 * max(1.0, abs(base[k])) for k in base)
    figures.update(retried_requests=svc.log("trainer").count("asking again"), steps_lost=len(base.keys() - losses.keys()),
                   run_seconds=round(time.monotonic() - t0, 1), same_losses_as_undisturbed=same)
    assert same, (losses, base)


async def test_the_checkpoint_service_killed_while_checkpoints_arrive_records_each_once(tmp_path, nats_url, bus,
                                                                                     services, figures):
    run = f"ckpt-kill-{int(time.time()) % 10**6}"
    cfg = tiny_config(tmp_path, max_steps=120, save_steps=10)
    cfg.feedback.min_step = 10**6  # train the whole budget
    storage = make_run(tmp_path, run, cfg)
    svc = services(storage, nats_url, run)
    saved, recorded = await collect(bus, CheckpointSaved, run), await collect(bus, CheckpointRecorded, run)
    exported = await collect(bus, ExportDone, run)
    for name in ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward"):
        svc.start(name)
    kills, expected = 0, set(range(10, 121, 10))
    for at in (20, 50, 80):  # three times, each right after a checkpoint was announced
        await wait_for(lambda: any(s.step >= at for s in saved), timeout=240)
        svc.kill("checkpoint")
        kills += 1
        down = time.monotonic()
        svc.start("checkpoint")
        n = len(recorded)
        # The restarted service records the next checkpoint; or, on a machine that trained to the
        # end before the kill, there is none left and every one is recorded already.
        await wait_for(lambda: len(recorded) > n or expected <= {r.step for r in recorded}, timeout=120)
        if len(recorded) > n:
            figures.setdefault("recovery_s", []).append(round(time.monotonic() - down, 2))
    await wait_for(lambda: exported, timeout=300)
    steps = Counter(r.step for r in (await stored(nats_url, run, [CheckpointRecorded]))[CheckpointRecorded])
    manifests = sorted(p.parent.name for p in (storage / run / "checkpoints").glob("*/tuneloop-manifest.json"))
    figures.update(kills=kills, checkpoints=len(steps), records_lost=len(expected - set(steps)),
                   records_duplicated=sum(n - 1 for n in steps.values()), manifests=len(manifests))
    assert sorted(steps) == sorted(expected) and set(steps.values()) == {1}, steps
    assert len(manifests) == 12, manifests
