"""A real sweep: 4 trials of the tiny model, 2 at a time, on the sweep's own nats-server; the
sweep process is SIGKILLed mid-way and started again."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import EXAMPLE_DATA, kv_records, own_server_env, processes_mentioning, protocol_task, stored
from tuneloop.events import Control, ControlApplied, EvalVerdict, TrainingFinished

pytestmark = pytest.mark.integration
TUNELOOP = [sys.executable, "-m", "tuneloop"]


STEPS = 150


def write_sweep(tmp_path: Path) -> Path:
    """Two learning rates that learn the protocol in about 60 steps (feedback stops them at the
    target) and two that cannot: the grid's order puts the slow ones last, so they run when two
    trials have completed and the median pruner has something to compare with."""
    base = {
        "run": {"name": "base", "output_dir": "runs"},
        "task": protocol_task(),
        "data": {"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 600, "val_fraction": 0.05, "test_fraction": 0.05},
        "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "vocab_size": 300}},
        "train": {"max_steps": STEPS, "batch_size": 16, "logging_steps": 5, "save_steps": 20, "max_length": 96,
                  "lora": {"enabled": False}},
        "eval": {"max_cases": 16, "max_new_tokens": 24, "shard_size": 8},
        "feedback": {"metric": "protocol", "target": 1.0, "patience": 10},
    }
    sweep = {
        "name": "sw", "config": "base.yaml",
        "params": {"train.learning_rate": {"values": [0.003, 0.00001]}, "train.weight_decay": {"values": [0.0, 0.1]}},
        "concurrency": 2, "evaluators": 2, "pruner": {"kind": "median", "startup_trials": 2},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


async def records(url: str) -> dict[str, dict]:
    from tuneloop.bus import Bus

    bus = await Bus.connect(url, "test")
    try:
        kv = await bus.key_value("tuneloop-sweeps")
        return await kv_records(kv, ".trial-")
    finally:
        await bus.close()


def early(record: dict) -> bool:
    """Running, with a checkpoint (a verdict on one is in) and most of its steps ahead."""
    return record["state"] == "running" and bool(record["values"]) and max(map(int, record["values"])) <= STEPS // 2


def test_sweep_prunes_shares_evaluators_and_survives_a_kill(tmp_path):
    sweep_file = write_sweep(tmp_path)
    runs = tmp_path / "runs"
    first = subprocess.Popen([*TUNELOOP, "sweep", str(sweep_file)], stdout=open(tmp_path / "first.log", "w"),
                             stderr=subprocess.STDOUT, env=own_server_env(), cwd=tmp_path)
    try:  # kill the sweep once a trial has finished and another is early in training (a slow trial's
        # window is a second or two: from its first verdict to the prune that the second one brings)
        deadline = time.time() + 400
        before: dict = {}
        while time.time() < deadline and first.poll() is None:
            time.sleep(0.25)
            info = runs / "sw" / "sweep.json"
            if info.exists():
                try:
                    before = asyncio.run(asyncio.wait_for(records(json.loads(info.read_text())["nats_url"]), 10))
                except Exception:  # the sweep's server not up yet (or gone: the sweep ended)
                    continue
                states = [r["state"] for r in before.values()]
                if "complete" in states and any(early(r) for r in before.values()):
                    break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert "complete" in [r["state"] for r in before.values()], "no trial finished in time"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished_before = {r["run_id"]: r for r in before.values() if r["state"] != "running"}
    cut_short = [r["run_id"] for r in before.values() if early(r)]

    second = subprocess.run([*TUNELOOP, "sweep", str(sweep_file)], capture_output=True, text=True, timeout=600,
                            env=own_server_env(), cwd=tmp_path)
    out = second.stdout
    assert second.returncode == 0, out[-4000:] + second.stderr[-2000:]
    continued = re.search(r"continuing: (\d+) finished", out)
    assert continued and int(continued.group(1)) >= len(finished_before), out[:2000]
    summary = json.loads((runs / "sw" / "summary.json").read_text())
    trials = {t["run_id"]: t for t in summary["trials"]}
    assert sorted(trials) == ["sw-t00", "sw-t01", "sw-t02", "sw-t03"]
    assert all(t["state"] in ("complete", "pruned") for t in trials.values()), trials

    # Finished trials were not run again: same record, one training in their trainer log.
    for run_id, rec in finished_before.items():
        assert trials[run_id]["value"] == rec["value"] and trials[run_id]["steps"] == rec["steps"]
        log = (runs / run_id / "logs" / "trainer.log").read_text()
        assert log.count("training finished") == 1 and "resuming from" not in log
    # A trial cut short by the kill went on from its checkpoint.
    assert cut_short and all("resuming from" in (runs / r / "logs" / "trainer.log").read_text() for r in cut_short)

    from tuneloop.tools.embedded import NatsServer

    server = NatsServer(runs / "sw" / "nats")  # the sweep stopped its server; read what the store kept
    url = server.start()
    try:
        events = {run_id: asyncio.run(stored(url, run_id, [EvalVerdict, Control, ControlApplied, TrainingFinished]))
                  for run_id in trials}
    finally:
        server.stop()

    # At least one trial was pruned by a control event, and its checkpoints released.
    pruned = [r for r, t in trials.items() if t["state"] == "pruned"]
    assert pruned, trials
    for run_id in pruned:
        control = [c for c in events[run_id][Control] if c.command == "prune"]
        applied = [a for a in events[run_id][ControlApplied] if a.command == "prune"]
        assert control and control[0].operator == "sweep sw" and "fell behind" in control[0].value
        assert f"at step {trials[run_id]['judged_at']} fell behind" in control[0].value  # the decision, recorded
        assert applied and applied[0].control_id == control[0].event_id and trials[run_id]["pruned_at"] == applied[0].step
        assert events[run_id][TrainingFinished][-1].reason == "pruned"
        assert not list((runs / run_id / "checkpoints").glob("checkpoint-*")) and trials[run_id]["released_bytes"] > 0
        assert trials[run_id]["steps"] < STEPS

    # The trials shared the evaluator pool: one evaluator process scored shards of several trials.
    workers: dict[str, set] = {}
    for run_id, ev in events.items():
        for v in ev[EvalVerdict]:
            for w in v.workers:
                workers.setdefault(w, set()).add(run_id)
    assert any(len(runs_scored) >= 2 for runs_scored in workers.values()), workers
    assert not any((runs / r / "logs" / "evaluator.log").exists() for r in trials)  # no trial had its own
    # ... and the trainer pool: a worker process trained several trials, one after another.
    taken: dict[str, set] = {}
    for r in trials:
        for pid in re.findall(r"worker (\d+) takes run", (runs / r / "logs" / "trainer.log").read_text()):
            taken.setdefault(pid, set()).add(r)
    assert any(len(rs) >= 2 for rs in taken.values()), taken

    # The best trial is the one whose exported model has the best test verdict.
    finals = {r: max(v.scores["protocol"] for v in ev[EvalVerdict] if v.purpose == "final" and v.split == "test")
              for r, ev in events.items() if trials[r]["state"] == "complete"}
    top = max(finals.values())
    assert summary["best"]["value"] == top and finals[summary["best"]["run_id"]] == top
    assert summary["best"]["run_id"] == min(r for r, v in finals.items() if v == top)  # ties: the earlier trial
    assert (runs / "sw" / "best.yaml").exists() and (runs / "sw" / "best" / "merged" / "config.json").exists()
    assert processes_mentioning(str(tmp_path)) == [], "processes left behind"
    replay_the_pruner(tmp_path, trials, summary)


def replay_the_pruner(tmp_path, trials, summary):
    """``tuneloop replay SWEEP``: the recorded verdicts through the same pruner code give back the
    live prune decisions; without a pruner nothing is pruned and the winner survives; the CLI
    prints it all from the sweep's stored stream (its server is gone)."""
    from tuneloop.tools.embedded import NatsServer
    from tuneloop.events import CheckpointsReleased, ExportDone
    from tuneloop.tools.sweep import backtest
    from tuneloop.tools.sweep.search import TrialRecord
    from tuneloop.tools.sweep.spec import Pruner, load_sweep

    server = NatsServer(tmp_path / "runs" / "sw" / "nats")
    url = server.start()
    try:
        events = {r: asyncio.run(stored(url, r, [EvalVerdict, Control, TrainingFinished, ExportDone,
                                                 CheckpointsReleased])) for r in trials}
    finally:
        server.stop()
    spec, _ = load_sweep(tmp_path / "sweep.yaml")
    records = [TrialRecord.model_validate(t) for t in summary["trials"]]
    flat = {r: [e for evs in by_kind.values() for e in evs] for r, by_kind in events.items()}
    traces = backtest.traces(records, flat, "protocol")
    live = backtest.live_prunes(traces)
    assert live and set(live) == {r.number for r in records if r.state == "pruned"}
    own, none, eager = backtest.compare(spec, records, traces, [spec.pruner, Pruner(kind="none"),
                                                                Pruner(kind="median", startup_trials=1)])
    assert own.same_as_live and {n: f.pruned_at for n, f in own.replay.fates.items() if f.pruned_at} == live
    assert own.winner_survives and own.replay.winner() == summary["best"]["trial"] and own.steps_saved == 0
    assert not none.replay.pruned and none.winner_survives and none.unknown  # pruned trials: past the recording
    assert set(eager.replay.pruned) >= set(live)  # judging after one completed trial prunes at least as much
    out = subprocess.run([*TUNELOOP, "replay", "sw", "--pruner", "median|none", "--startup-trials", "2"],
                         capture_output=True, text=True, timeout=120, env=own_server_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    print(out.stdout)  # the README's transcript
    text = " ".join(out.stdout.split())
    assert "replay of sweep sw: 4 trials" in text and "does not answer: reading the run's stored stream" in out.stderr
    prunes = ", ".join(f"{n}@{s}" for n, s in sorted(live.items()))
    rows = {line.split("│")[1].split()[0]: [c.strip() for c in line.split("│")[1:-1]]
            for line in out.stdout.splitlines() if line.startswith("│ ") and "warm-up" in line}
    assert f"pruned {prunes};" in text
    assert rows["median"][1] == prunes and rows["median"][-1] == "yes", out.stdout  # the live prunes, again
    assert rows["none"][1] == "none" and rows["none"][2] == "yes" and rows["none"][-1] == "no", out.stdout



async def test_a_sweep_whose_base_config_changed_is_refused_naming_the_change(tmp_path, bus):
    from tuneloop.tools.sweep.driver import Store, SweepMismatch
    from tuneloop.tools.sweep.spec import load_sweep

    path = write_sweep(tmp_path)
    spec, base = load_sweep(path)
    spec = spec.model_copy(update={"name": f"edited-{int(time.time() * 1000) % 10**8}"})
    await Store.open(bus, spec, base)
    await Store.open(bus, spec, base)  # a restart with nothing changed continues
    edited = base.model_copy(deep=True)
    edited.train.batch_size = 4
    with pytest.raises(SweepMismatch, match="base config .* changed since the sweep started .*train.batch_size"):
        await Store.open(bus, spec, edited)


def test_an_asha_sweep_stops_a_trial_below_a_rungs_cut_off(tmp_path):
    """``scheduler: asha`` through the real sweep: one trial at a time, the learning one first,
    then one that cannot learn; the second is stopped by a prune control at a rung (20, 30, 45:
    read at the verdicts of steps 20, 40, 60, where the first reached the target at the latest),
    named by its policy, and the first completes as the best."""
    path = write_sweep(tmp_path)
    sweep = yaml.safe_load(path.read_text())
    sweep.update(name="asha", concurrency=1, evaluators=1, scheduler="asha", asha={"min_steps": 20, "reduction_factor": 1.5},
                 params={"train.learning_rate": {"values": [0.003, 0.00001]}})
    del sweep["pruner"]
    path.write_text(yaml.safe_dump(sweep))
    done = subprocess.run([*TUNELOOP, "sweep", str(path)], capture_output=True, text=True, timeout=600,
                          env=own_server_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "successive halving from step 20 by 1.5" in " ".join(done.stdout.split())  # rich wraps lines
    summary = json.loads((tmp_path / "runs" / "asha" / "summary.json").read_text())
    first, second = sorted(summary["trials"], key=lambda t: t["number"])
    assert first["state"] == "complete" and summary["best"]["run_id"] == first["run_id"]
    assert second["state"] == "pruned" and second["judged_at"] in (20, 40, 60) and second["steps"] < STEPS, second
    from tuneloop.tools.embedded import NatsServer

    server = NatsServer(tmp_path / "runs" / "asha" / "nats")
    url = server.start()
    try:
        [control] = [c for c in asyncio.run(stored(url, second["run_id"], [Control]))[Control] if c.command == "prune"]
    finally:
        server.stop()
    assert control.policy == "asha" and re.search(r"below rung \d+'s cut-off", control.value), control
