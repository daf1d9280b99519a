"""Population-based training, for real: two members of the tiny model on the sweep's own
nats-server, one with a learning rate that learns and one that cannot. The poor member is
copied over (a full-state fork of the other takes its place), the sweep is SIGKILLed once a
copy exists and started again, and the replay of its checks gives back the live copies."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import EXAMPLE_DATA, kv_records, own_server_env, protocol_task, readme_transcript, stored
from tuneloop.events import Control, RunForked, StepMetrics

pytestmark = pytest.mark.integration
TUNELOOP = [sys.executable, "-m", "tuneloop"]
STEPS, EVERY = 100, 20


def write_sweep(tmp_path: Path) -> Path:
    base = {
        "run": {"name": "base", "output_dir": "runs"},
        "task": protocol_task(),
        "data": {"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 600, "val_fraction": 0.05, "test_fraction": 0.05},
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "vocab_size": 300}},
        "train": {"max_steps": STEPS, "batch_size": 16, "logging_steps": 5, "save_steps": EVERY, "max_length": 96,
                  "lora": {"enabled": False}},
        "eval": {"max_cases": 16, "max_new_tokens": 24, "shard_size": 8},
        "feedback": {"target": 1.0, "patience": 10, "min_step": STEPS},  # every member trains its whole budget
    }
    sweep = {"name": "pb", "config": "base.yaml", "sampler": "pbt", "concurrency": 2, "evaluators": 2,
             "params": {"train.learning_rate": {"values": [0.003, 0.00001]}},
             "pbt": {"population": 2, "interval": 1, "quantile": 0.5, "resample_probability": 0.0}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


async def kv(url: str) -> tuple[dict[str, dict], dict]:
    from tuneloop.bus import Bus

    async with await Bus.connect(url, "test") as bus:
        bucket = await bus.key_value("tuneloop-sweeps")
        trials = await kv_records(bucket, ".trial-")
        log = (await kv_records(bucket, "pb.pbt")).get("pb.pbt", {"checks": []})
        return trials, log


def test_pbt_copies_the_poor_member_over_survives_a_kill_and_replays_exactly(tmp_path):
    sweep_file = write_sweep(tmp_path)
    runs = tmp_path / "runs"
    first = subprocess.Popen([*TUNELOOP, "sweep", str(sweep_file)], stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT, env=own_server_env(220), cwd=tmp_path)
    try:  # SIGKILL once the first copy is recorded: it must be made once, and trained, after the restart
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None:
            info = runs / "pb" / "sweep.json"
            if info.is_file() and (url := json.loads(info.read_text()).get("nats_url")):
                trials, _ = asyncio.run(kv(url))
                if any(t.get("forked_from") for t in trials.values()):
                    break
            time.sleep(1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.run([*TUNELOOP, "sweep", str(sweep_file)], capture_output=True, text=True, env=own_server_env(220),
                            cwd=tmp_path, timeout=1500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    summary = json.loads((runs / "pb" / "summary.json").read_text())
    trials = {t["number"]: t for t in summary["trials"]}
    copies = [t for t in trials.values() if t["forked_from"]]
    assert copies, second.stdout[-3000:]
    assert all(t["state"] != "running" for t in trials.values())
    assert len({t["run_id"] for t in trials.values()}) == len(trials)

    # Each copy took the place of a member that was in the bottom half, forked from the other
    # one at that one's latest verdict, and trained from there: its first step is the one after.
    store = runs / "pb" / "nats"
    log, events = asyncio.run(recorded(store, [t["run_id"] for t in trials.values()]))
    exploits = [c["exploit"] for c in log["checks"] if c["exploit"] and not c["refused"]]
    assert len(exploits) == len(copies)  # none made twice across the kill
    for e, copy in zip(exploits, sorted(copies, key=lambda t: t["number"])):
        replaced, donor = trials[e["trial"]], trials[e["donor"]]
        assert replaced["replaced_by"] == copy["number"] and copy["replaces"] == replaced["number"] and replaced["state"] == "pruned"
        assert copy["forked_from"] == {"trial": donor["number"], "run_id": donor["run_id"], "step": e["step"],
                                       "changed": e["changed"]}
        assert copy["start_step"] == e["step"] and e["step"] % EVERY == 0
        copy_cfg = yaml.safe_load((runs / copy["run_id"] / "config.yaml").read_text())
        assert copy_cfg["train"]["pause_every"] == EVERY and copy_cfg["train"]["learning_rate"] == copy["params"]["train.learning_rate"]
        run_info = json.loads((runs / copy["run_id"] / "run.json").read_text())
        assert run_info["forked_from"]["run"] == donor["run_id"] and run_info["forked_from"]["step"] == e["step"]
        steps = [ev.step for ev in events[copy["run_id"]][StepMetrics]]
        assert steps and min(steps) > e["step"] and min(steps) <= e["step"] + 5, steps[:5]
        assert any(ev.child == copy["run_id"] for ev in events[donor["run_id"]][RunForked])
        prunes = [ev for ev in events[replaced["run_id"]][Control] if ev.command == "prune"]
        assert prunes and "pbt" in str(prunes[0].value) and copy["run_id"] in str(prunes[0].value)
    # The member with the learning rate that cannot learn is the first one copied over.
    assert trials[exploits[0]["trial"]]["params"]["train.learning_rate"] == 0.00001
    best = summary["best"]
    assert best is not None and trials[best["trial"]]["state"] == "complete"
    assert "lineage" in second.stdout and "fork of" in second.stdout

    table = second.stdout[second.stdout.index("sweep pb:"):]
    readme_transcript("pbt-sweep", "$ tuneloop sweep sweep.yaml   # again, after the first one was killed\n" + table)

    # The sweep's own settings replay the live copies; copying every other verdict parts from them.
    replay = subprocess.run([*TUNELOOP, "replay", "pb", "--storage", str(runs), "--pbt", "interval=1|2"],
                            capture_output=True, text=True, env=own_server_env(220), cwd=tmp_path, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    rows = [line for line in replay.stdout.splitlines() if line.startswith("│ interval")]
    assert len(rows) == 2 and "│ yes" in rows[0] and "│ no" in rows[1], replay.stdout
    assert "past the recording" in replay.stdout
    readme_transcript("pbt-replay", f'$ tuneloop replay pb --pbt "interval=1|2"\n{replay.stdout}')
    refused = subprocess.run([*TUNELOOP, "replay", "pb", "--storage", str(runs), "--pruner", "median"],
                             capture_output=True, text=True, env=own_server_env(220), cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "PBT sweep" in refused.stderr


async def recorded(store: Path, run_ids: list[str]) -> tuple[dict, dict]:
    """The sweep's PBT log and each trial's events, from its store (its server is gone)."""
    from tuneloop.tools.embedded import NatsServer

    server = NatsServer(store)
    url = server.start()
    try:
        _, log = await kv(url)
        return log, {r: await stored(url, r, (StepMetrics, RunForked, Control)) for r in run_ids}
    finally:
        server.stop()
