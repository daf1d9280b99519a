"""Evaluation off the training loop made cheap: weights-only snapshots on their own cadence
(eval.every), and the trainer giving cores to an evaluator while it works (tuneloop.cores)."""

import os
import subprocess
import sys

import pytest

from helpers import collect, make_run, run_id_for, tiny_config, wait_for
from tuneloop.events import CheckpointRecorded, CheckpointSaved, EvalRequest, EvalVerdict, ExportDone

pytestmark = pytest.mark.integration


async def test_snapshots_are_evaluated_apart_from_resumable_checkpoints(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, max_steps=30, save_steps=15)
    cfg.eval.every = 10
    storage = make_run(tmp_path, run, cfg)
    saved, recorded = await collect(bus, CheckpointSaved, run), await collect(bus, CheckpointRecorded, run)
    requests, verdicts = await collect(bus, EvalRequest, run), await collect(bus, EvalVerdict, run)
    exported = await collect(bus, ExportDone, run)
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", "checkpoint", "evaluator", "rl-reward", "trainer"):
        svc.start(name)
    await wait_for(lambda: exported, timeout=300)

    kinds = {(s.step, s.snapshot, s.evaluate, s.is_final) for s in saved}
    assert kinds == {(10, True, True, False), (15, False, False, False), (20, True, True, False), (30, False, True, True)}
    assert sorted(r.step for r in requests if r.purpose == "periodic") == [10, 20, 30]  # not 15: resume only
    size = {r.step: r.bytes for r in recorded}
    assert size[10] < size[15] / 2, "a snapshot should hold the weights alone, not the optimizer state"
    rdir = storage / run
    assert (rdir / "checkpoints" / "checkpoint-15" / "optimizer.pt").is_file()

    periodic = [v for v in verdicts if v.purpose == "periodic"]
    top = max(periodic, key=lambda v: (v.scores["protocol"], v.step))
    assert exported[0].step == top.step                    # a snapshot can win the export
    assert (rdir / exported[0].adapter_path / "adapter_model.safetensors").is_file()
    left = lambda: {int(p.name[5:]) for p in (rdir / "snapshots").glob("step-*")}  # noqa: E731
    await wait_for(lambda: left() <= {top.step}, timeout=30)  # outscored snapshots released


HOLD = """
import sys, time
from pathlib import Path
from tuneloop.cores import CoreBudget
with CoreBudget(Path(sys.argv[1])).borrow(1):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="sharing cores needs two of them")
def test_the_trainer_trains_on_fewer_threads_while_an_evaluator_works(tmp_path):
    """Real TRL training with the trainer's core-sharing callback: an evaluator's lease (a real
    process) from step 3 to step 8 takes one thread from the steps in between, and only those."""
    import torch
    from transformers import TrainerCallback

    from tuneloop.cores import CoreBudget
    from tuneloop.data_pipeline.prepare import prepare
    from tuneloop.events import DatasetReady, SplitInfo
    from tuneloop.trainer import recipe
    from tuneloop.trainer.threads import CoreShareCallback

    folder = tmp_path / "cores"
    cfg = tiny_config(tmp_path, max_steps=12)
    rdir = tmp_path / "run"
    p = prepare(cfg, rdir / "data", rdir)
    ds = DatasetReady(run_id="r", dataset_id=p.fingerprint[:16], fingerprint=p.fingerprint, chat_template="tuneloop",
                      splits={k: SplitInfo(path=path, rows=n, categories=c) for k, (path, n, c) in p.splits.items()})
    threads: dict[int, int] = {}
    holder: list[subprocess.Popen] = []

    class Evaluator(TrainerCallback):  # before the core-sharing callback: it sees the lease at once
        def on_step_begin(self, args, state, control, **kwargs):
            threads[state.global_step + 1] = torch.get_num_threads()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                holder.append(subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True))
                assert holder[0].stdout.readline().strip() == "held"
            if state.global_step == 8:
                holder[0].kill()
                holder[0].wait()

    full = torch.get_num_threads()
    try:
        trainer = recipe.build_trainer(cfg, rdir, ds, [Evaluator(), CoreShareCallback(CoreBudget(folder))])
        trainer.train()
    finally:
        for h in holder:
            h.kill()
        torch.set_num_threads(full)
    assert [threads[s] for s in range(1, 13)] == [full] * 3 + [max(1, full - 1)] * 5 + [full] * 4
