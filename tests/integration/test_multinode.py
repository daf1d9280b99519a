"""Training across two nodes: two torchrun launchers, one process each, joined by torchrun's
static rendezvous (``--nnodes 2 --node-rank R --master-addr``), exactly the command and the
PET_* environment that compose's two-node profile and Kubernetes' PyTorchJob give the trainer
(``torchrun -m tuneloop.trainer``). Here both "nodes" are processes of this machine that share
the run folder, as the containers share the runs volume; gloo on CPU.

The run trains with the losses of one node running two processes (the same global batch),
every control lands on both at the same step, each checkpoint is written once, and after a
SIGKILL of either node the other one exits and both, started again, resume exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from helpers import make_run, run_id_for, tiny_config, wait_for
from test_trainer import collect, ctl, losses_by_step, resumed
from tuneloop.tools.embedded import free_ports
from tuneloop.events import CheckpointSaved, ControlApplied, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration
# A constant schedule: the two-node run trains until stopped (so a kill always lands mid-training,
# however fast the machine) and its steps still have the reference's learning rate.
TRAIN = dict(save_steps=8, logging_steps=1, lr_scheduler="constant")
REFERENCE_STEPS = 96


def start_node(svc, rank: int, port: int) -> subprocess.Popen:
    """One node: ``torchrun -m tuneloop.trainer`` with the PET_* variables a PyTorchJob sets."""
    env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "NATS_URL": svc.url,
           "TUNELOOP_RUN_ID": svc.run_id, "TUNELOOP_STORAGE": str(svc.storage), "TOKENIZERS_PARALLELISM": "false"}
    log = open(svc.storage / f"node{rank}.log", "ab")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "-m", "tuneloop.trainer",
                          "--parent-pid", str(os.getpid())],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    svc.procs[f"node{rank}"] = p
    svc.every.append(p)
    return p


async def two_nodes(tmp_path, nats_url, bus, services, run):
    storage = make_run(tmp_path, run, tiny_config(tmp_path, max_steps=100000, **TRAIN))
    events = {cls: await collect(bus, cls, run) for cls in (StepMetrics, CheckpointSaved, TrainingFinished)}
    svc = services(storage, nats_url, run)
    svc.start("data-pipeline")
    port = free_ports(1)[0]
    for rank in (0, 1):
        start_node(svc, rank, port)
    return svc, events, port


async def test_two_nodes_train_as_one_with_two_processes_and_resume_after_either_dies(tmp_path, nats_url, bus,
                                                                                   services, request):
    base = run_id_for(request)
    storage = make_run(tmp_path / "one", base + "a", tiny_config(tmp_path / "one", processes=2,
                                                                   max_steps=REFERENCE_STEPS, **TRAIN))
    one = services(storage, nats_url, base + "a")
    ref = {cls: await collect(bus, cls, base + "a") for cls in (StepMetrics, TrainingFinished)}
    one.start("data-pipeline")
    one.start("trainer")
    await wait_for(lambda: ref[TrainingFinished], timeout=300)
    expected = losses_by_step(ref[StepMetrics])
    assert sorted(expected) == list(range(1, REFERENCE_STEPS + 1)) and ref[TrainingFinished][0].processes == 2

    # Two nodes, steered: a control lands on both ranks at the same step.
    run = base + "b"
    svc, ev, port = await two_nodes(tmp_path / "two", nats_url, bus, services, run)
    steps, saved, done = ev[StepMetrics], ev[CheckpointSaved], ev[TrainingFinished]
    await wait_for(lambda: steps, timeout=240)
    clip = await ctl(nats_url, bus, run, "set-grad-clip", 1.0)  # the config's own value: losses unchanged
    assert isinstance(clip, ControlApplied)
    await wait_for(lambda: any(c.step > clip.step for c in saved if not c.snapshot), timeout=240)
    assert re.search(r"2 ranks agree at step \d+: .*'controls': 1", svc.log("node0")), svc.log("node0")[-3000:]

    # SIGKILL of the second node: the first one exits; both started again resume exactly.
    svc.kill("node1")
    first = svc.procs["node0"]
    await wait_for(lambda: first.poll() is not None, timeout=180)
    restart = datetime.now(timezone.utc)
    for rank in (0, 1):
        start_node(svc, rank, port)
    await wait_for(lambda: "resuming from" in svc.log("node0") and len(resumed(svc.log("node0"), steps, restart)[1]) >= 8,
                   timeout=300)
    stop = await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: any(d.reason == "control" for d in done), timeout=120)  # the first node said "error"
    ckpt, after = resumed(svc.log("node0"), steps, restart)
    assert ckpt >= 8 and [s.step for s in after][:8] == list(range(ckpt + 1, ckpt + 9)), (ckpt, [s.step for s in after])
    assert done[-1].step == stop.step and done[-1].processes == 2, done
    assert stop.step <= REFERENCE_STEPS, "ran past the reference: raise REFERENCE_STEPS"
    losses = losses_by_step(steps)  # the steps trained again overwrite the lost ones
    assert sorted(losses) == list(range(1, stop.step + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    # Each checkpoint announced once, and written in one folder of the shared run folder.
    written = [c.step for c in saved if not c.snapshot]
    assert written and len(written) == len(set(written)), written
    rdir = svc.storage / run
    assert len([p for p in rdir.rglob(f"checkpoint-{written[-1]}") if p.is_dir()]) == 1
