"""DPO and GRPO through the trainer service, with real TRL, over a real nats-server.

GRPO's rewards come from the rl-reward service (request/reply, queue group): the test
watches the requests on the bus and checks that training fails clearly without the service.
"""

import math

import pytest

from helpers import run_id_for
from helpers import wait_for
from test_trainer import start_training
from tuneloop.events import DatasetReady, RewardRequest, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration


async def test_dpo_starts_at_ln2_and_learns_the_preferred_answers(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    _, ev = await start_training(tmp_path, nats_url, bus, services, run, method="dpo", max_steps=12, learning_rate=5e-3)
    await wait_for(lambda: ev[TrainingFinished], timeout=180)
    done = ev[TrainingFinished][0]
    assert done.reason == "completed" and done.step == 12, done
    losses = {s.step: s.loss for s in ev[StepMetrics] if s.loss is not None}
    assert all(s.method == "dpo" for s in ev[StepMetrics])
    # Policy == reference at step 1, so the DPO loss is exactly -log(sigmoid(0)) = ln 2; then it falls.
    assert losses[1] == pytest.approx(math.log(2), abs=1e-3)
    assert losses[12] < losses[1] - 0.05, losses


async def test_grpo_gets_its_rewards_from_the_rl_reward_service_on_two_processes(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    asked: list[RewardRequest] = []

    async def on_request(req):
        asked.append(req)

    await bus.subscribe(RewardRequest, run, on_request)  # sees every request the trainer sends (it never answers)
    svc, ev = await start_training(tmp_path, nats_url, bus, services, run, with_services=("rl-reward",), method="grpo",
                                   max_steps=3, batch_size=4, processes=2,
                                   grpo={"num_generations": 4, "max_completion_length": 8,
                                         "rewards": {"protocol": 1.0, "similarity": 0.5}})
    await wait_for(lambda: ev[TrainingFinished], timeout=240)
    done = ev[TrainingFinished][0]
    assert done.reason == "completed" and done.step == 3 and done.processes == 2, done
    rewarded = [s for s in ev[StepMetrics] if s.loss is not None]
    assert rewarded and all(s.method == "grpo" and s.reward is not None for s in rewarded)
    # One request per generation batch, gathered from both ranks: 2 x 4 completions, with the configured weights.
    assert len(asked) == 3 and all(len(r.completions) == 8 for r in asked)
    assert asked[0].weights == {"protocol": 1.0, "similarity": 0.5}
    assert all(len(r.prompts) == len(r.columns) == 8 for r in asked)  # what a reward function by import path reads


async def test_grpo_without_a_reward_service_fails_with_the_reason(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    _, ev = await start_training(tmp_path, nats_url, bus, services, run, method="grpo", max_steps=2, batch_size=4,
                                 grpo={"num_generations": 4, "max_completion_length": 4, "reward_timeout": 2})
    await wait_for(lambda: ev[TrainingFinished], timeout=180)
    done = ev[TrainingFinished][0]
    assert done.reason == "error" and "rl-reward could not score" in done.detail and "no service answers" in done.detail


async def test_sft_learns_every_assistant_turn_of_a_multi_turn_file(tmp_path, nats_url, bus, services, request):
    """A ShareGPT file of three-turn chats: data-pipeline makes each assistant turn a completion
    (the chat before it the prompt), the trainer learns them all: its loss falls."""
    import json

    from helpers import tiny_config

    run = run_id_for(request)
    words = ["kano", "mizo", "tesa", "lupa", "rimo", "sela", "voka", "dune"]
    chats = [{"conversations": [turn for k in range(3) for turn in (
        {"from": "human", "value": f"Say {words[(i + k) % 8]}{i} twice."},
        {"from": "gpt", "value": f"{words[(i + k) % 8]}{i} {words[(i + k) % 8]}{i}"})], "n": i} for i in range(64)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    cfg = tiny_config(tmp_path, max_steps=60, learning_rate=1e-2, logging_steps=1, lora={"enabled": False})
    cfg = cfg.with_overrides({"data.sources": [{"path": str(data), "format": "sharegpt"}],
                              "data.quality": {"max_violation_rate": 1.0}, "data.augment": {"enabled": False}})
    _, ev = await start_training(tmp_path, nats_url, bus, services, run, cfg=cfg)
    await wait_for(lambda: ev[TrainingFinished], timeout=300)
    assert ev[TrainingFinished][0].reason == "completed", ev[TrainingFinished][0]
    ready = ev[DatasetReady][0]
    chats_in_train = 64 - ready.splits["val"].rows - ready.splits["test"].rows
    assert ready.splits["train"].rows == 3 * chats_in_train  # every assistant turn, once
    losses = {s.step: s.loss for s in ev[StepMetrics] if s.loss is not None}
    assert losses[60] < losses[1] * 0.7, losses
