"""Pools instead of processes per run: one trainer worker (``--run-id '*'``) takes queued runs
one after another, and trains each exactly as a trainer of its own would (tokenizing a train
set it has seen before only once)."""

import re
import subprocess

import pytest

from helpers import TUNELOOP_CLI, collect, make_run, run_id_for, tiny_config, wait_for
from tuneloop.events import DeadLetter, RunQueued, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration


async def test_one_worker_trains_queued_runs_in_turn_with_the_losses_of_a_run_of_its_own(
        tmp_path, nats_url, bus, services, request):
    base = run_id_for(request)[:40]
    pooled, alone = [f"{base}-a", f"{base}-b"], f"{base}-c"
    cfg = tiny_config(tmp_path, max_steps=12, save_steps=6)
    for run in (*pooled, alone):
        storage = make_run(tmp_path, run, cfg)
    steps = {run: await collect(bus, StepMetrics, run) for run in (*pooled, alone)}
    done = {run: await collect(bus, TrainingFinished, run) for run in (*pooled, alone)}

    pool = services(storage, nats_url, "*")
    worker = pool.start("trainer")
    pool.start("data-pipeline")
    for run in pooled:
        await bus.publish(RunQueued(run_id=run, event_id=f"queued-{run}-0"))
    own = services(storage, nats_url, alone)  # the same config, a trainer of its own
    own.start("data-pipeline")
    own.start("trainer")
    await wait_for(lambda: all(done.values()), timeout=300)

    assert all(done[r][0].reason == "completed" and done[r][0].step == 12 for r in done), done
    takes = [re.findall(r"worker (\d+) takes run (\S+)", (storage / r / "logs" / "trainer.log").read_text()) for r in pooled]
    assert takes == [[(str(worker.pid), pooled[0])], [(str(worker.pid), pooled[1])]]  # one worker, two runs
    assert worker.poll() is None  # and it waits for the next one
    losses = {r: [(s.step, s.loss) for s in steps[r] if s.loss is not None] for r in steps}
    assert len(losses[alone]) == 12
    assert losses[pooled[0]] == losses[alone] and losses[pooled[1]] == losses[alone]  # same seed, same losses
    # ... although the second run used the train set the worker had tokenized for the first
    logs = [(storage / r / "logs" / "trainer.log").read_text() for r in pooled]
    assert "not tokenized again" not in logs[0] and "not tokenized again" in logs[1]
    for r in pooled:  # each run's checkpoints are its own, resumable
        assert (storage / r / "checkpoints" / "checkpoint-6" / "optimizer.pt").is_file()


async def test_a_queued_run_whose_data_is_broken_is_dead_lettered_and_the_pools_go_on(
        tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)[:40]
    bad, good = f"{run}-bad", f"{run}-ok"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": "not a list"}\n')
    cfg = tiny_config(tmp_path, max_steps=4)
    storage = make_run(tmp_path, good, cfg)
    bad_cfg = cfg.model_copy(deep=True)
    bad_cfg.data.sources[0].path = str(broken)
    make_run(tmp_path, bad, bad_cfg)
    dead = await collect(bus, DeadLetter, bad)
    done = await collect(bus, TrainingFinished, good)
    pool = services(storage, nats_url, "*")
    pool.start("data-pipeline")
    pool.start("trainer")
    await bus.publish(RunQueued(run_id=bad, event_id=f"queued-{bad}-0"))
    # the good one as an operator queues a run: `tuneloop queue CONFIG --run-id ID`
    cfg_file = tmp_path / "good.yaml"
    cfg_file.write_text((storage / good / "config.yaml").read_text())
    queued = subprocess.run([*TUNELOOP_CLI, "queue", str(cfg_file), "--run-id", good, "--nats-url", nats_url,
                             "--storage", str(storage)], capture_output=True, text=True, timeout=120)
    assert queued.returncode == 0 and f"queued run {good}" in queued.stdout, queued.stdout + queued.stderr
    await wait_for(lambda: dead and done, timeout=240)
    assert dead[0].subject.endswith(".run.queued") and "broken.jsonl" in dead[0].reason, dead[0]
    assert done[0].reason == "completed"
