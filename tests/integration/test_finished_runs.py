"""A finished embedded run stays readable after its nats-server is gone: ``audit`` and
``watch`` read a private server started on a copy of the run's stored stream, and that
store itself is left exactly as the run left it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import start_job, tiny_config
from tuneloop.config import dump_config
from tuneloop.tools.embedded import answers

TUNELOOP = [sys.executable, "-m", "tuneloop"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_audit_and_watch_read_a_finished_embedded_run_from_its_stored_stream(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=100000, save_steps=40)
    dump_config(cfg, tmp_path / "job.yaml")
    storage, run = tmp_path / "runs", "done-run"
    job = start_job(tmp_path / "job.yaml", run)
    stop = subprocess.run([*TUNELOOP, "ctl", run, "stop", "--storage", str(storage)], capture_output=True, text=True,
                          timeout=120)
    assert stop.returncode == 0 and "applied stop at step" in stop.stdout, stop.stdout + stop.stderr
    stopped_at = int(stop.stdout.split(" at step ")[1].split(":")[0])
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]

    info = json.loads((storage / run / "run.json").read_text())
    assert info["state"] == "finished" and not answers(info["nats_url"])  # its server is gone
    store = Path(info["nats_store"])
    before = digest(store / "jetstream")

    t0 = time.monotonic()
    audit = subprocess.run([*TUNELOOP, "audit", run, "--storage", str(storage)], capture_output=True, text=True,
                           timeout=60)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "stored stream" in audit.stderr and time.monotonic() - t0 < 30  # no waiting on the dead URL
    lines = [ln for ln in audit.stdout.splitlines() if ln.strip()]
    assert any(ln.split()[2] == "control" and "'stop'" in ln for ln in lines), audit.stdout
    assert any(ln.split()[2] == "control.applied" and f"'step': {stopped_at}" in ln for ln in lines), audit.stdout

    watch = subprocess.run([*TUNELOOP, "watch", run, "--storage", str(storage)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "160"})
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"finished at step {stopped_at}" in watch.stdout and "stop" in watch.stdout, watch.stdout[-3000:]

    assert digest(store / "jetstream") == before  # read from a copy: the run's own store is untouched
