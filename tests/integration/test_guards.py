"""Guarded interventions over a real nats-server, with real training and real verdicts.

An embedded run (`tuneloop run`: every service) is steered from the command line as an
operator would: an absurd learning rate under a guard is rolled back to its savepoint by the
next verdict, and training from there gives exactly the losses of a run that never had it; a
harmless one is confirmed. `watch` (in a pseudo-terminal), `audit` and the report show both.
Then the same guard on two training processes: both ranks roll back at the same step to the
same weights. And rl-reward's feedback policy forgets the verdicts of discarded checkpoints."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from helpers import collect, make_run, readme_transcript, run_id_for, start_job, tiny_config, wait_for
from test_operator_tools import Terminal
from test_trainer import ctl, losses_by_step
from tuneloop.config import dump_config
from tuneloop.events import (CheckpointSaved, ControlApplied, ControlConfirmed, ControlRolledBack, EvalVerdict,
                             Feedback, StepMetrics, TrainingFinished, derived_id)

pytestmark = pytest.mark.integration
TUNELOOP = [sys.executable, "-m", "tuneloop"]
COMMON = dict(max_steps=100000, save_steps=20, logging_steps=1, learning_rate=3e-3)  # stopped by a control
ABSURD = "8"  # the learning rate that wrecks the tiny model within a few steps
GUARD = "loss<5.55"  # the tiny model's mean loss: ~5.52 around step 20 at 3e-3, then lower; ~5.6 once wrecked


def config(tmp, **train):
    cfg = tiny_config(tmp, **{**COMMON, **train})
    # The feedback policy never stops these runs: they end when the test says so.
    return cfg.model_copy(update={"feedback": cfg.feedback.model_copy(update={"min_step": 10**6})})


def ctl_cli(run: str, storage, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, "ctl", run, *args, "--storage", str(storage)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory, nats_url):
    tmp = tmp_path_factory.mktemp("guards")
    run = f"guard-{int(time.time() * 1000) % 10**8}"
    dump_config(config(tmp), tmp / "run.yaml")
    storage = tmp / "runs"

    async def drive():
        from tuneloop.bus import Bus

        bus = await Bus.connect(nats_url, "test")
        ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, ControlRolledBack, ControlConfirmed,
                                                             TrainingFinished)}
        job = await asyncio.to_thread(start_job, tmp / "run.yaml", run, "--nats-url", nats_url)
        term = Terminal([*TUNELOOP, "watch", run, "--storage", str(storage)])
        await asyncio.to_thread(term.wait_for, f"run {run}", "loss", timeout=60)
        await wait_for(lambda: len(ev[StepMetrics]) >= 12, timeout=120)  # past the first, steepest steps
        absurd = await asyncio.to_thread(ctl_cli, run, storage, "set-lr", ABSURD, "--guard", GUARD, "--within", "1")
        await wait_for(lambda: ev[ControlRolledBack], timeout=180)
        back = ev[ControlRolledBack][0]
        on_screen = await asyncio.to_thread(term.wait_for, "ROLLED BACK", timeout=60)
        # Training from the savepoint again, well past where the first verdict came from.
        await wait_for(lambda: any(s.time > back.time and s.step >= back.savepoint_step + 30 for s in ev[StepMetrics]),
                       timeout=180)
        harmless = await asyncio.to_thread(ctl_cli, run, storage, "set-lr", "2e-3", "--guard", GUARD)
        await wait_for(lambda: ev[ControlConfirmed], timeout=180)
        confirmed_screen = await asyncio.to_thread(term.wait_for, "confirmed at step", timeout=60)
        stop = await ctl(nats_url, bus, run, "stop")
        out, _ = await asyncio.to_thread(job.communicate, timeout=600)
        code = await asyncio.to_thread(term.exit_code)
        await bus.close()
        return {"absurd": absurd, "harmless": harmless, "stop": stop, "job": (job.returncode, out), "ev": ev,
                "rolled_screen": on_screen, "confirmed_screen": confirmed_screen, "watch_exit": code}

    result = asyncio.run(drive())
    return {"run": run, "storage": storage, "tmp": tmp, "url": nats_url, **result}


def applied_step(cli: subprocess.CompletedProcess) -> int:
    assert cli.returncode == 0, cli.stdout + cli.stderr
    return int(re.search(r"at step (\d+):", cli.stdout).group(1))


def test_an_absurd_set_lr_is_rolled_back_and_training_goes_on_as_if_it_never_came(guarded_run, tmp_path, figures):
    r = guarded_run
    assert r["job"][0] == 0, r["job"][1][-3000:]
    print(r["absurd"].stdout)
    at = applied_step(r["absurd"])
    assert f"guarded by '{GUARD}' over the next 1 verdict(s), savepoint at step {at}" in r["absurd"].stdout
    [back] = r["ev"][ControlRolledBack]
    assert back.command == "set-lr" and back.value == float(ABSURD) and back.savepoint_step == at
    assert back.verdict_step > at and back.step >= back.verdict_step and back.discarded_steps == [at + 1, back.step]
    assert not (back.metrics["loss"] < 5.55), back.metrics  # what broke it: the diverged loss
    # After the rollback: the savepoint's learning rate again, and from the savepoint on, exactly the
    # losses of a run that never had the control (the same config, trained without any).
    after = sorted((s for s in r["ev"][StepMetrics] if s.time > back.time and s.loss is not None), key=lambda s: s.time)
    harmless_at = applied_step(r["harmless"])
    compared = [s for s in after if s.step <= harmless_at]
    assert compared[0].step == at + 1, [s.step for s in compared[:3]]
    assert all(s.learning_rate < 3.1e-3 for s in compared)
    expected = asyncio.run(reference_losses(r["tmp"], r["url"], last=compared[-1].step))
    figures.update(savepoint_step=at, rolled_back_at=back.step, discarded_steps=back.step - at,
                   steps_compared=len(compared),
                   max_loss_difference=max(abs(s.loss - expected[s.step]) for s in compared))
    for s in compared:
        assert s.loss == pytest.approx(expected[s.step], rel=1e-5, abs=1e-6), s.step
    # The discarded checkpoints are gone from disk and from what can be exported.
    ckpts = {p.name for p in (r["storage"] / r["run"] / "checkpoints").iterdir()}
    assert f"checkpoint-{at}" in ckpts


async def reference_losses(tmp, url, last: int) -> dict[int, float]:
    """The same run with no control at all (trainer and data-pipeline), up to step ``last``."""
    from tuneloop.bus import Bus
    from helpers import Services

    run = f"guardref-{int(time.time() * 1000) % 10**8}"
    storage = make_run(tmp / "ref", run, config(tmp / "ref"))
    bus = await Bus.connect(url, "test")
    steps = await collect(bus, StepMetrics, run)
    svc = Services(storage, url, run)
    try:
        svc.start("data-pipeline")
        svc.start("trainer")
        await wait_for(lambda: any(s.step >= last for s in steps), timeout=300)
        await ctl(url, bus, run, "stop")
    finally:
        svc.stop()
        await bus.close()
    return losses_by_step(steps)


def test_a_harmless_guarded_set_lr_is_confirmed(guarded_run):
    r = guarded_run
    at = applied_step(r["harmless"])
    [ok] = r["ev"][ControlConfirmed]
    assert ok.command == "set-lr" and ok.guard == GUARD and ok.savepoint_step == at and ok.verdict_steps[0] > at
    kept = [s for s in r["ev"][StepMetrics] if s.step > at and s.time > ok.time and s.loss is not None]
    assert kept and all(s.learning_rate <= 2e-3 * 1.0001 for s in kept)  # still in force after its confirmation
    assert r["ev"][TrainingFinished][-1].reason == "control"


def test_watch_audit_and_report_show_the_rollback_and_the_confirmation(guarded_run, tmp_path):
    r = guarded_run
    [back], [ok] = r["ev"][ControlRolledBack], r["ev"][ControlConfirmed]
    print(r["rolled_screen"])
    assert f"ROLLED BACK at step {back.step} to step {back.savepoint_step}" in r["rolled_screen"]
    assert f"confirmed at step {ok.step}: guard '{GUARD}' held" in r["confirmed_screen"]
    assert r["watch_exit"] == 0

    audit = subprocess.run([*TUNELOOP, "audit", r["run"], "--nats-url", r["url"]], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "400"})
    kinds = [ln.split()[2] for ln in audit.stdout.splitlines() if ln[:2] == "20"]
    print(audit.stdout)
    assert kinds.index("control.rolled_back") < kinds.index("control.confirmed"), kinds
    assert f"'savepoint_step': {back.savepoint_step}" in audit.stdout and f"'guard': '{GUARD}'" in audit.stdout

    run = r["run"]
    guard_lines = [ln for ln in audit.stdout.splitlines() if re.search(r"applied|rolled_back|confirmed", ln)]
    readme_transcript("guard-transcript", "\n".join([
        f"$ tuneloop ctl {run} set-lr {ABSURD} --guard '{GUARD}' --within 1", r["absurd"].stdout.rstrip(),
        f"$ tuneloop watch {run}    # in another terminal, once the verdict came", r["rolled_screen"].rstrip(),
        f"$ tuneloop ctl {run} set-lr 2e-3 --guard '{GUARD}'", r["harmless"].stdout.rstrip(),
        f'$ tuneloop audit {run} | grep -E "applied|rolled_back|confirmed"', *guard_lines]))

    rdir = r["storage"] / r["run"]
    drawn = json.loads(Image.open(rdir / "report.png").text["Description"])  # written by the runner at the end
    assert drawn["rolled_back"] == [[back.savepoint_step, back.step, "set-lr"]]
    page = html.unescape((rdir / "report.html").read_text())
    assert f"rolled back at step {back.step} to the savepoint at step {back.savepoint_step}" in page
    assert f"confirmed at step {ok.step}" in page


async def test_two_processes_roll_back_together_to_the_same_weights(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    storage = make_run(tmp_path, run, config(tmp_path, processes=2))
    ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, CheckpointSaved, ControlRolledBack, TrainingFinished)}
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", "checkpoint", "evaluator", "rl-reward", "trainer"):
        svc.start(name)
    await wait_for(lambda: len(ev[StepMetrics]) >= 12, timeout=240)
    applied = await ctl_guarded(nats_url, bus, run)
    assert isinstance(applied, ControlApplied) and applied.savepoint_step == applied.step
    await wait_for(lambda: ev[ControlRolledBack], timeout=240)
    back = ev[ControlRolledBack][0]
    # The next checkpoint after the rollback: the ranks compare weights there too.
    await wait_for(lambda: any(c.time > back.time for c in ev[CheckpointSaved]), timeout=240)
    await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: ev[TrainingFinished], timeout=120)
    log = svc.log("trainer")
    rolled = re.findall(r"rank (\d) rolls back set-lr .* from step (\d+) to the savepoint, step (\d+)", log)
    assert sorted(rolled) == [("0", str(back.step), str(back.savepoint_step)),
                              ("1", str(back.step), str(back.savepoint_step))], rolled
    resumed = dict(re.findall(r"rank (\d) resumed from the savepoint at step \d+: weights checksum ([-0-9.e]+)", log))
    assert set(resumed) == {"0", "1"} and resumed["0"] == resumed["1"], resumed
    saved = re.search(rf"2 ranks agree at step {back.savepoint_step}: .*'weights': ([-0-9.e]+)", log).group(1)
    assert resumed["0"] == saved, (resumed, saved)  # the savepoint's weights, not the discarded ones
    agreed = re.findall(r"2 ranks agree at step (\d+): .*'rolled_back': 1", log)
    assert agreed, "no checkpoint after the rollback where the ranks compared their weights"
    assert ev[TrainingFinished][0].processes == 2


async def ctl_guarded(url, bus, run):
    from tuneloop.tools.client import send_control

    return await send_control(url, run, "set-lr", float(ABSURD), bus=bus, timeout=120, guard=GUARD, within=1)


async def test_rl_reward_forgets_the_verdicts_of_discarded_checkpoints(tmp_path, nats_url, bus, services, request):
    """The feedback policy's memory is in KV, across replicas: after `control.rolled_back` the
    service decides as if the discarded checkpoints' verdicts never came (late ones included),
    where the same verdicts without the rollback stop the run on patience."""
    run = run_id_for(request)
    cfg = config(tmp_path)
    cfg.feedback.metric, cfg.feedback.target, cfg.feedback.patience, cfg.feedback.min_step = "protocol", 0.9, 2, 0
    storage = make_run(tmp_path, run, cfg)
    feedback = await collect(bus, Feedback, run)
    svc = services(storage, nats_url, run)
    svc.start("rl-reward")

    def verdict(step, score, saved):
        return EvalVerdict(run_id=run, request_id=derived_id("eval", saved), step=step, checkpoint=f"checkpoint-{step}",
                           split="val", purpose="periodic", cases=8, scores={"protocol": score, "correctness": 0.0})

    async def send(v):
        await bus.publish(v)
        await wait_for(lambda: any(f.verdict_id == v.event_id for f in feedback), timeout=60)

    await send(verdict(10, 0.5, "s10"))
    await send(verdict(20, 0.4, "s20"))  # one evaluation without improvement: patience 2 is half spent
    await bus.publish(ControlRolledBack(run_id=run, control_id="c1", command="set-lr", value=8.0, guard="loss<5",
                                        step=25, savepoint_step=10, discarded_steps=[11, 25], verdict_step=20,
                                        discarded_saves=["s20", "s30"]))
    await wait_for(lambda: "rollback to step 10" in svc.log("rl-reward"), timeout=60)
    await bus.publish(verdict(30, 0.3, "s30"))  # late, of a discarded checkpoint
    again = verdict(20, 0.45, "s20-again")
    await send(again)
    got = {f.verdict_id: f for f in feedback}
    assert len(got) == 3, [(f.step, f.action) for f in feedback]  # nothing for the late, discarded verdict
    assert got[again.event_id].action == "continue" and got[again.event_id].best_step == 10
    log = svc.log("rl-reward")
    assert "rollback to step 10: 2 discarded checkpoint(s) forgotten; best 0.500 at step 10, 0 evaluation(s) since" in log
    assert "verdict of step 30 is of a checkpoint a rollback discarded: not counted" in log
