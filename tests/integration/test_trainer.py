"""The trainer service steered and restarted over a real nats-server, with real TRL training."""

import asyncio
import re
from datetime import datetime, timezone

import pytest

from helpers import make_run, run_id_for, tiny_config
from helpers import collect, wait_for
from tuneloop.tools.client import send_control
from tuneloop import subjects
from tuneloop.events import (CheckpointSaved, Control, ControlApplied, ControlRejected, DatasetReady, StepMetrics,
                             TrainingFinished)

pytestmark = pytest.mark.integration


async def start_training(tmp_path, nats_url, bus, services, run, with_services=(), cfg=None, **train):
    """data-pipeline and the trainer (and ``with_services``) on a run of ``cfg`` (by default the
    tiny config with ``train``); the events they publish, collected by kind."""
    storage = make_run(tmp_path, run, cfg or tiny_config(tmp_path, **train))
    events = {cls: await collect(bus, cls, run) for cls in (StepMetrics, CheckpointSaved, TrainingFinished, DatasetReady)}
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", *with_services):
        svc.start(name)
    svc.start("trainer")
    return svc, events


async def ctl(nats_url, bus, run, command, value=None):
    return await send_control(nats_url, run, command, value, bus=bus, timeout=60)


async def test_pause_holds_the_run_and_every_control_is_answered(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, max_steps=100000)
    steps, saved, done = ev[StepMetrics], ev[CheckpointSaved], ev[TrainingFinished]
    await wait_for(lambda: steps, timeout=120)

    paused = await ctl(nats_url, bus, run, "pause")
    assert isinstance(paused, ControlApplied) and paused.new is True
    again = await ctl(nats_url, bus, run, "pause")
    assert isinstance(again, ControlRejected) and again.reason == "already paused"
    n = len(steps)
    await asyncio.sleep(5)
    trained = [s for s in steps[n:] if not s.paused]
    assert not trained, "training went on while paused"
    assert any(s.paused and s.step == paused.step for s in steps[n:]), "no paused heartbeat"

    interval = await ctl(nats_url, bus, run, "set-save-interval", 7)   # applied while paused
    assert isinstance(interval, ControlApplied) and interval.step == paused.step
    resumed = await ctl(nats_url, bus, run, "resume")
    assert isinstance(resumed, ControlApplied) and resumed.step == paused.step
    await wait_for(lambda: any(s.step > paused.step + 2 and not s.paused for s in steps), timeout=60)
    await wait_for(lambda: any(c.step % 7 == 0 and c.step > paused.step for c in saved), timeout=60)

    now = await ctl(nats_url, bus, run, "checkpoint")
    assert isinstance(now, ControlApplied)
    await wait_for(lambda: any(c.step == now.step for c in saved), timeout=60)
    assert isinstance(await ctl(nats_url, bus, run, "set-grad-clip", 0), ControlRejected)

    # The trainer's durable consumer of controls deleted on the server (an administrator, a
    # broker that lost its store): the trainer creates it again and keeps answering.
    durable = subjects.durable_name("trainer", run, Control.KIND)
    await bus.js.delete_consumer(subjects.STREAM, durable)
    clip = await ctl(nats_url, bus, run, "set-grad-clip", 0.5)
    assert isinstance(clip, ControlApplied) and clip.new == 0.5, clip
    assert "is gone from the server: creating it again" in svc.log("trainer")
    stop = await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: done, timeout=60)
    assert done[0].step == stop.step and done[0].reason == "control"


def losses_by_step(steps):
    out = {}
    for s in steps:
        if s.loss is not None:
            out[s.step] = s.loss  # after a restart the replayed step overwrites the lost one
    return out


def resumed(log: str, steps, since: datetime) -> tuple[int, list]:
    """The checkpoint step the restarted trainer resumed from (its log), and the steps it
    published after ``since`` (the restart), in the order published."""
    line = [ln for ln in log.splitlines() if "resuming from" in ln][-1]
    step = int(re.search(r"checkpoint-(\d+)", line).group(1))
    return step, sorted((s for s in steps if s.time >= since and s.loss is not None), key=lambda s: s.time)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
async def test_sigkill_and_restart_resumes_exactly(tmp_path, nats_url, bus, services, request, figures, optimizer):
    """Weights, optimizer state (momentum, moments, factored second moments), schedule and data
    position all come back: losses after the restart equal those of an uninterrupted run."""
    common = dict(max_steps=30, save_steps=10, logging_steps=1, lr_scheduler="cosine", warmup_steps=3,
                  optimizer=optimizer, learning_rate=3e-3 if optimizer != "sgd" else 0.3)
    base = run_id_for(request)
    ref_svc, ref = await start_training(tmp_path / "a", nats_url, bus, services, base + "a", **common)
    await wait_for(lambda: ref[TrainingFinished], timeout=180)
    expected = losses_by_step(ref[StepMetrics])
    assert sorted(expected) == list(range(1, 31))

    run = base + "b"
    svc, ev = await start_training(tmp_path / "b", nats_url, bus, services, run, **common)
    await wait_for(lambda: any(c.step == 20 for c in ev[CheckpointSaved]), timeout=180)
    svc.kill("trainer")
    killed_at = max(s.step for s in ev[StepMetrics])
    restart = datetime.now(timezone.utc)
    svc.start("trainer")
    await wait_for(lambda: ev[TrainingFinished], timeout=180)
    # Resumed, not restarted from step 0 (which, seeded alike, would give the same losses): the
    # first step after the restart is the one after the checkpoint, with the reference's loss.
    ckpt, after = resumed(svc.log("trainer"), ev[StepMetrics], restart)
    figures.update(killed_at_step=killed_at, resumed_from=ckpt, first_step_after_restart=after[0].step if after else None,
                   max_loss_difference=max((abs(s.loss - expected[s.step]) for s in after), default=None))
    assert ckpt >= 20 and after[0].step == ckpt + 1, (ckpt, [s.step for s in after[:3]])
    assert [s.step for s in after] == list(range(ckpt + 1, 31))
    for s in after:
        assert s.loss == pytest.approx(expected[s.step], rel=1e-5, abs=1e-6), (s.step, killed_at)
    assert ev[TrainingFinished][0].step == 30


async def test_set_lr_survives_a_restart(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, max_steps=100000, save_steps=5,
                                   learning_rate=3e-3)
    await wait_for(lambda: ev[StepMetrics], timeout=120)
    applied = await ctl(nats_url, bus, run, "set-lr", 5e-4)
    assert isinstance(applied, ControlApplied)
    await wait_for(lambda: any(c.step > applied.step for c in ev[CheckpointSaved]), timeout=60)
    svc.kill("trainer")
    n = len(ev[StepMetrics])
    svc.start("trainer")
    await wait_for(lambda: len([s for s in ev[StepMetrics][n:] if s.loss is not None]) >= 3, timeout=120)
    after = [s.learning_rate for s in ev[StepMetrics][n:] if s.loss is not None]
    assert after and all(lr == pytest.approx(5e-4) for lr in after), after
    await ctl(nats_url, bus, run, "stop")


async def test_what_was_answered_applied_holds_after_a_crash_before_the_next_checkpoint(
        tmp_path, nats_url, bus, services, request):
    """"Applied" means durable: the trainer records a control before answering it, so a kill
    right after the answer (no checkpoint since, none at all here) does not undo it."""
    run = run_id_for(request)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, max_steps=100000, save_steps=100000,
                                   learning_rate=3e-3)
    answers = await collect(bus, ControlApplied, run)
    await wait_for(lambda: ev[StepMetrics], timeout=120)
    applied = await ctl(nats_url, bus, run, "set-lr", 5e-4)
    assert isinstance(applied, ControlApplied)
    svc.kill("trainer")  # at once: the next checkpoint is 100000 steps away
    assert not ev[CheckpointSaved]
    n = len(ev[StepMetrics])
    svc.start("trainer")

    def restarted() -> list[StepMetrics]:
        """The new process's metrics: from where the step count goes back (metrics the killed one
        published before the kill may still be arriving first)."""
        steps = ev[StepMetrics]
        j = next((i for i in range(n, len(steps)) if steps[i].step <= steps[i - 1].step), None)
        return [] if j is None else [s for s in steps[j:] if s.loss is not None]

    await wait_for(lambda: len(restarted()) >= 3, timeout=120)
    after = restarted()
    assert after[0].step <= 5  # it started over (no checkpoint) ...
    assert all(s.learning_rate == pytest.approx(5e-4) for s in after), after  # ... with the lr it was told
    assert [a.control_id for a in answers].count(applied.control_id) == 1  # applied once, not again
    await ctl(nats_url, bus, run, "stop")


async def test_sigterm_interrupts_and_a_restart_finishes_with_throughput_and_memory(tmp_path, nats_url, bus, services,
                                                                                   request):
    """SIGTERM (a pod evicted, a sweep gone) is no end: the trainer saves, says ``interrupted``
    and goes on when started again; the last TrainingFinished carries what the summary shows.
    Gradient checkpointing and the batch-size finder are on: on CPU nothing runs out of memory,
    so the finder keeps the configured batch."""
    run = run_id_for(request)
    # Steps too many to finish before the signal lands, however fast the machine: the restart
    # then gets a reachable end (the run's config, edited as an operator would between the two).
    train = dict(save_steps=1000, logging_steps=2, gradient_checkpointing=True, auto_batch_size=True)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, max_steps=100000, **train)
    steps, saved, done = ev[StepMetrics], ev[CheckpointSaved], ev[TrainingFinished]
    await wait_for(lambda: any(s.step >= 6 for s in steps), timeout=120)
    svc.procs["trainer"].terminate()
    await wait_for(lambda: done, timeout=60)
    first = done[0]
    assert first.reason == "interrupted" and any(c.step == first.step for c in saved), first
    svc.procs["trainer"].wait(30)
    end = first.step + 20
    make_run(tmp_path, run, tiny_config(tmp_path, max_steps=end, **train))
    svc.start("trainer")
    await wait_for(lambda: len(done) == 2, timeout=180)
    last = done[1]
    assert (last.reason, last.step) == ("completed", end) and "resuming from" in svc.log("trainer")
    assert last.batch_size == 8 and last.tokens_per_second > 0 and last.peak_memory_mb > 50, last
