"""rl-reward's handlers on an in-memory bus (``FakeBus``): verdicts into feedback, the policy's
state shared by replicas through the KV bucket, a rollback's discarded verdicts forgotten, and
reward requests scored item by item. The service against a real nats-server is in
tests/integration/test_rewards.py and the end-to-end tests."""

import asyncio

import pytest

from fakebus import FakeBus, FakeKV
from helpers import make_run, tiny_config
from tuneloop.events import ControlRolledBack, EvalVerdict, Feedback, RewardRequest, derived_id
from tuneloop.rl_reward.__main__ import RewardService
from tuneloop.service import ServiceContext


@pytest.fixture
def replicas(tmp_path):
    """Two replicas of the service on one run and one policy bucket, as deployed."""
    cfg = tiny_config(tmp_path)
    cfg.feedback.patience, cfg.feedback.target = 2, 0.95
    storage, kv, bus = make_run(tmp_path, "r", cfg), FakeKV(), FakeBus("rl-reward")
    return [RewardService(ServiceContext("rl-reward", bus, "r", storage), kv) for _ in range(2)], bus


def verdict(step: int, score: float, purpose: str = "periodic", saved: str | None = None) -> EvalVerdict:
    return EvalVerdict(run_id="r", request_id=derived_id("eval", saved or f"saved-{step}"), step=step,
                       checkpoint=f"checkpoints/checkpoint-{step}", split="val", purpose=purpose, cases=8,
                       scores={"protocol": score, "correctness": score / 2},
                       by_category={"math": {"protocol": 0.5}, "prose": {"protocol": 1.0}})


def test_a_periodic_verdict_becomes_feedback_and_others_do_not(replicas):
    (svc, _), bus = replicas
    for purpose in ("baseline", "final", "manual"):
        asyncio.run(svc.on_verdict(verdict(10, 0.5, purpose)))
    assert bus.of(Feedback) == []
    asyncio.run(svc.on_verdict(verdict(10, 0.5)))
    [fb] = bus.of(Feedback)
    assert (fb.step, fb.action, fb.score, fb.weak_categories) == (10, "continue", 0.5, ["math"])


def test_replicas_count_patience_as_one_and_a_redelivered_verdict_is_decided_once(replicas):
    (a, b), bus = replicas
    first = verdict(10, 0.6)
    asyncio.run(a.on_verdict(first))
    asyncio.run(b.on_verdict(first))  # redelivered, to the other replica: the same decision again
    asyncio.run(b.on_verdict(verdict(20, 0.5)))
    asyncio.run(a.on_verdict(verdict(30, 0.4)))
    decided = bus.of(Feedback)
    assert decided[0].event_id == decided[1].event_id  # JetStream stores it once
    assert [f.action for f in decided] == ["continue", "continue", "continue", "stop"]
    assert "no improvement for 2 evaluations (best 0.600 at step 10)" in decided[-1].reason


def test_a_rollback_forgets_the_verdicts_of_the_checkpoints_it_discarded(replicas):
    (svc, _), bus = replicas
    asyncio.run(svc.on_verdict(verdict(10, 0.6)))
    asyncio.run(svc.on_verdict(verdict(20, 0.5)))  # one without improvement
    asyncio.run(svc.on_rolled_back(ControlRolledBack(run_id="r", control_id="c", command="set-lr", guard="protocol>=0.9",
                                                     step=25, savepoint_step=10, verdict_step=20,
                                                     discarded_saves=["saved-20"])))
    state, _ = asyncio.run(svc.load_state("r"))
    assert (state.best_step, state.since_best) == (10, 0)
    asyncio.run(svc.on_verdict(verdict(20, 0.5)))  # late, of the discarded checkpoint: not counted
    asyncio.run(svc.on_verdict(verdict(30, 0.55)))  # the first without improvement since the savepoint
    assert [f.action for f in bus.of(Feedback)] == ["continue", "continue", "continue"]


def test_a_reward_request_is_scored_item_by_item(replicas):
    (svc, _), _ = replicas
    req = RewardRequest(run_id="r", completions=['{"task": "math", "answer": "4"}', '{"task": "math", "answer": "5"}',
                                                 "not the protocol"], references=["4", "4", None],
                        categories=["math"] * 3, weights={"correctness": 1.0, "exact": 1.0})
    reply = asyncio.run(svc.on_reward(req))
    assert reply.rewards[:2] == [1.0, 0.0] and reply.errors[:2] == [None, None]
    assert reply.rewards[2] is None and "item 2: exact needs a reference answer" in reply.errors[2]
    with pytest.raises(ValueError, match=r"unknown reward function\(s\) \['nope'\]"):
        asyncio.run(svc.on_reward(RewardRequest(run_id="r", completions=["x"], weights={"nope": 1.0})))
