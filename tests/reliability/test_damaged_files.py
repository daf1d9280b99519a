"""Damaged files on disk: a truncated checkpoint is noticed against the checkpoint service's
manifest, named, moved aside (not deleted) and the run resumes from the one before; exporting
it is refused with the reason; nothing that was intact changes."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time

import pytest
import yaml

from helpers import collect, make_run, tiny_config, wait_for
from tuneloop.events import CheckpointRecorded, TrainingFinished

pytestmark = pytest.mark.reliability


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


async def test_a_truncated_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
        tmp_path, nats_url, bus, services, figures):
    run = f"damaged-{int(time.time()) % 10**6}"
    cfg = tiny_config(tmp_path, max_steps=40, save_steps=20)
    cfg.feedback.min_step = 10**6
    storage = make_run(tmp_path, run, cfg)
    ckpts = storage / run / "checkpoints"
    svc = services(storage, nats_url, run)
    recorded, finished = await collect(bus, CheckpointRecorded, run), await collect(bus, TrainingFinished, run)
    for name in ("data-pipeline", "trainer", "checkpoint"):
        svc.start(name)
    await wait_for(lambda: finished and len(recorded) >= 2, timeout=240)
    svc.procs["trainer"].wait(60)

    weights = next((ckpts / "checkpoint-40").glob("*.safetensors"))
    truncated = weights.stat().st_size // 2
    weights.write_bytes(weights.read_bytes()[:truncated])  # as a disk that filled up leaves it
    intact = digest(ckpts / "checkpoint-20")

    refused = subprocess.run([sys.executable, "-m", "tuneloop", "export", run, "--step", "40", "--storage",
                              str(storage)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 4 and weights.name in refused.stderr and "changed, added or missing" in refused.stderr

    config = storage / run / "config.yaml"  # the operator extends the run and restarts the trainer
    raw = yaml.safe_load(config.read_text())
    raw["train"]["max_steps"] = 60
    config.write_text(yaml.safe_dump(raw))
    finished.clear()
    t0 = time.monotonic()
    svc.start("trainer")
    await wait_for(lambda: finished, timeout=240)
    log = svc.log("trainer")
    aside = sorted(p.name for p in ckpts.iterdir() if p.name.endswith(".corrupt"))
    resumed = re.findall(r"(?<!not )resuming from \S*checkpoint-(\d+)", log)
    figures.update(detected="not resuming from" in log, moved_aside=", ".join(aside),
                   resumed_from=int(resumed[-1]) if resumed else None, restart_to_finish_s=round(time.monotonic() - t0, 1))
    assert f"not resuming from {ckpts / 'checkpoint-40'}: {weights.name} changed, added or missing" in log
    assert "moved aside to checkpoint-40.corrupt" in log
    assert (finished[0].reason, finished[0].step) == ("completed", 60)
    assert (ckpts / "checkpoint-40.corrupt" / weights.name).stat().st_size == truncated  # kept as found
    assert digest(ckpts / "checkpoint-20") == intact  # what it resumed from is unchanged
    assert {p.name for p in ckpts.iterdir()} >= {"checkpoint-20", "checkpoint-40", "checkpoint-40.corrupt", "checkpoint-60"}
    listing = subprocess.run([sys.executable, "-m", "tuneloop", "checkpoints", run, "--storage", str(storage),
                              "--nats-url", nats_url], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "moved aside as damaged: checkpoint-40.corrupt" in listing.stdout, listing.stdout
    assert figures["resumed_from"] == 20
