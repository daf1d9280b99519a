"""`tuneloop fork` on real runs of the tiny model: a fork with no change continues the parent's
losses exactly, a changed learning rate diverges from the first update after the fork, a
weights-only fork restarts the optimizer on the parent's weights (another LoRA rank), and the
parent is left as it was. Lineage in run.json, summary.json, `tuneloop runs` and the audit trail."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from PIL import Image

from helpers import TUNELOOP_CLI, tiny_config
from tuneloop.config import dump_config
from tuneloop.events import StepMetrics
from tuneloop.storage import RunDir, load_run_config
from tuneloop.tools.report import read_timeline

pytestmark = pytest.mark.integration
PARENT = "parent"


def losses(storage, run: str) -> dict[int, float]:
    events = read_timeline(storage / run / "timeline.jsonl")
    return {e.step: e.loss for e in events if isinstance(e, StepMetrics) and e.loss is not None}


def digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def tuneloop(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP_CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fork")
    cfg = tiny_config(tmp, max_steps=20, save_steps=10, logging_steps=1)
    dump_config(cfg, tmp / "parent.yaml")
    # `run --set` changes the file's settings: 30 steps whatever the verdicts say
    done = tuneloop("run", str(tmp / "parent.yaml"), "--run-id", PARENT, "--set", "train.max_steps=30",
                    "--set", f"feedback.min_step={10**6}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    storage = tmp / "runs"
    ran = load_run_config(storage, PARENT)
    assert (ran.train.max_steps, ran.feedback.min_step) == (30, 10**6)
    return storage, losses(storage, PARENT)


def fork(storage, *args: str) -> subprocess.CompletedProcess:
    return tuneloop("fork", PARENT, "--storage", str(storage), *args)


def test_a_fork_with_no_change_continues_the_parents_losses_and_leaves_the_parent_as_it_was(parent):
    storage, before = parent
    checkpoints = digest(RunDir(storage / PARENT).checkpoints)
    out = fork(storage, "--at", "10", "--name", "same")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    child = losses(storage, "same")
    assert sorted(child) == list(range(11, 31)), sorted(child)
    for step in child:
        assert child[step] == pytest.approx(before[step], rel=1e-5, abs=1e-6), step
    assert digest(RunDir(storage / PARENT).checkpoints) == checkpoints and losses(storage, PARENT) == before
    lineage = {"run": PARENT, "step": 10, "weights_only": False, "changed": {}, "checkpoint": "checkpoints/checkpoint-10"}
    assert json.loads((storage / "same" / "run.json").read_text())["forked_from"] == lineage
    assert json.loads((storage / "same" / "summary.json").read_text())["forked_from"] == lineage
    assert any(f["run"] == "same" for f in json.loads((storage / PARENT / "run.json").read_text())["forks"])
    runs = tuneloop("runs", "--storage", str(storage), timeout=60)
    names = [n for ln in runs.stdout.splitlines() if ln.count("│") > 3 and (n := ln.split("│")[1].strip())]
    assert names.index("└ same") == names.index(PARENT) + 1, runs.stdout
    audit = tuneloop("audit", "same", "--storage", str(storage), timeout=120)
    assert "run.forked" in audit.stdout and "'parent': 'parent'" in audit.stdout, audit.stdout + audit.stderr
    # the parent finished before it was forked (its server is gone): its audit trail has the fork too
    audit = tuneloop("audit", PARENT, "--storage", str(storage), timeout=120)
    assert "run.forked" in audit.stdout and "'child': 'same'" in audit.stdout, audit.stdout + audit.stderr
    drawn = json.loads(Image.open(storage / "same" / "report.png").text["Description"])  # the runner's report
    assert drawn["parent"] == [PARENT, 10] and drawn["steps"] == [11, 30]


def test_a_changed_learning_rate_diverges_from_the_first_update_after_the_fork(parent):
    storage, before = parent
    out = fork(storage, "--at", "10", "--set", "train.learning_rate=0.05", "--name", "fast")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    child = losses(storage, "fast")
    # Step 11's loss is measured on the fork's weights; the first update with the new rate shows at step 12.
    assert child[11] == pytest.approx(before[11], rel=1e-5, abs=1e-6)
    assert abs(child[12] - before[12]) > 1e-4, (child[12], before[12])
    applied = json.loads(RunDir(storage / "fast").applied.read_text())["applied"]
    assert [(a["command"], a["value"], a["step"]) for a in applied][-1] == ("set-lr", 0.05, 10)


def test_weights_only_restarts_the_optimizer_on_the_parents_weights_with_another_lora_rank(parent):
    storage, before = parent
    out = fork(storage, "--at", "30", "--weights-only", "--set", "train.lora.r=4", "--set", "train.max_steps=5",
               "--name", "small")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    child = losses(storage, "small")
    assert sorted(child) == [1, 2, 3, 4, 5]  # a new run: its own steps from 1, a fresh optimizer and schedule
    assert child[1] < before[1] - 0.1, (child[1], before[1])  # it starts from trained weights, not the base
    cfg = json.loads((storage / "small" / "summary.json").read_text())
    assert cfg["forked_from"]["weights_only"] is True and cfg["forked_from"]["changed"]["train.lora.r"] == 4


def test_forks_that_cannot_be_made_are_refused_with_the_reason(parent):
    storage, _ = parent
    for args, why, code in ((("--at", "999"), "no complete checkpoint at step 999 (it has: 10, 20, 30)", 5),  # not found
                            (("--set", "train.lora.r=4"), "a full-state fork continues the parent's optimizer", 4),  # refused
                            (("--set", "nonsense"), "expected KEY=VALUE", 2)):  # usage
        out = fork(storage, *args)
        assert out.returncode == code and why in " ".join(out.stderr.split()), (args, out.stdout, out.stderr)
    missing = tuneloop("fork", "nope", "--storage", str(storage), timeout=60)
    assert missing.returncode == 5 and "no run 'nope'" in missing.stderr


def test_the_export_has_a_model_card_and_loads_from_a_copy_on_another_path(parent, tmp_path):
    """The run's exported adapter carries a model card (huggingface_hub reads it back) with its
    verdicts (val at the exported step, then the exported model's own test verdict), data and
    settings; copied elsewhere, tuneloop's loader finds its base and gives the same model."""
    import shutil

    import torch
    from huggingface_hub import ModelCard

    from tuneloop.export import load_exported

    storage, _ = parent
    adapter = storage / PARENT / "export" / "adapter"
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "tuneloop" in card.data.tags and "sft" in card.data.tags
    text = " ".join(card.text.split())
    assert "| val | periodic |" in text and "| test | final |" in text, card.text  # the export's own test verdict
    assert "protocol.jsonl" in text and "max_steps: 30" in text and "Made with tuneloop" in text
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, copy)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(load_exported(copy)(ids).logits, load_exported(adapter)(ids).logits)
        merged = load_exported(storage / PARENT / "export" / "merged")
        assert torch.allclose(merged(ids).logits, load_exported(copy)(ids).logits, atol=1e-4)
