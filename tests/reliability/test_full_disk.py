"""The run's volume fills up while a checkpoint is written: a real tmpfs of a few MiB mounted
as the run's folder (root is needed to mount it; elsewhere the test is skipped, saying so).
The trainer stops with the reason and where it can resume, the half-written checkpoint is
never announced, catalogued or evaluated (and its folder is removed), the last complete one
still verifies against its record, and once there is room again the run resumes from it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from helpers import collect, make_run, tiny_config, wait_for
from tuneloop.checkpoints import folder, verify
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, ControlApplied, EvalRequest, StepMetrics,
                             TrainingFinished)
from tuneloop.tools.client import send_control

pytestmark = pytest.mark.reliability


def mount_tmpfs(where, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test needs root")


def fill(where, leave: int) -> int:
    """Fill the volume of ``where`` but ``leave`` bytes (room for the applied-controls file, not
    for a checkpoint); returns how many bytes the filler took. Unbuffered: a write that found no
    room leaves nothing behind to fail again on close."""
    fd, total = os.open(where / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 0
    try:
        for size in (1 << 16, 4096, 512, 1):  # blocks, then the tail a block did not fit
            while True:
                try:
                    total += os.write(fd, b"\0" * size)
                except OSError:
                    break
        os.ftruncate(fd, total - leave)
    finally:
        os.close(fd)
    return total - leave


async def test_a_full_disk_stops_training_with_the_reason_and_the_run_resumes_from_its_last_checkpoint(
        tmp_path, nats_url, bus, services, figures):
    run = f"full-disk-{int(time.time()) % 10**6}"
    # pause_every: the trainer holds after step 10's checkpoint while the disk fills (as a PBT member
    # waits at its barrier), so that the next write is step 20's checkpoint however fast it trains
    cfg = tiny_config(tmp_path, max_steps=60, save_steps=10, logging_steps=1, pause_every=10)
    cfg.feedback.min_step = 10**6  # nothing but the disk stops it
    storage = make_run(tmp_path, run, cfg)  # the config, written aside; the run's folder becomes the tmpfs
    rdir = storage / run
    config = (rdir / "config.yaml").read_text()
    mount_tmpfs(rdir, "16m")
    svc = services(storage, nats_url, run)  # their logs beside the run's folder, not on its volume
    try:
        (rdir / "config.yaml").write_text(config)
        saved, recorded = await collect(bus, CheckpointSaved, run), await collect(bus, CheckpointRecorded, run)
        requests, done = await collect(bus, EvalRequest, run), await collect(bus, TrainingFinished, run)
        steps = await collect(bus, StepMetrics, run)
        for name in ("data-pipeline", "checkpoint", "trainer"):
            svc.start(name)
        await wait_for(lambda: any(r.step == 10 for r in recorded) and any(s.paused for s in steps), timeout=240)
        filled = fill(rdir, leave=12 * 1024)
        assert isinstance(await send_control(nats_url, run, "resume", bus=bus, timeout=60), ControlApplied)
        await wait_for(lambda: done, timeout=240)
        [finished] = done
        detail = finished.detail
        assert finished.reason == "error" and detail.startswith("disk full: no space left on the volume of"), detail
        assert "the last complete checkpoint is checkpoint-10" in detail and "start the run again" in detail, detail
        assert finished.step == 20  # it failed writing step 20's checkpoint
        assert {s.step for s in saved} == {10} and {r.step for r in recorded} == {10}  # nothing half written announced
        assert all(r.step == 10 for r in requests if r.checkpoint)  # ... nor evaluated
        ckpts = rdir / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-10"], list(ckpts.iterdir())
        assert verify(folder(ckpts, 10), next(r.sha256 for r in recorded if r.step == 10)) is None
        assert svc.procs["trainer"].wait(60) == 1  # the trainer of one run exits failed, saying why (above)

        # Room again: the same run started again resumes from checkpoint 10 and trains on.
        (rdir / "filler").unlink()
        svc.start("trainer")
        await wait_for(lambda: any(s.step == 20 for s in saved), timeout=240)  # trained on past 10
        assert "resuming from" in svc.log("trainer") and "checkpoint-10" in svc.log("trainer").split("resuming from")[-1]
        figures.update(filler_bytes=filled, stopped_at=finished.step, half_written_announced=0,
                       resumed_from=10)
    finally:
        svc.stop()
        subprocess.run(["umount", "-l", str(rdir)], capture_output=True)
        if os.path.ismount(rdir):
            pytest.fail(f"{rdir} is still mounted")
