"""rl-reward's feedback policy with two replicas, one killed and restarted, then both: the
feedback (when patience stops the run, which step is best) is what one undisturbed replica
decides. The policy's memory of the run is in JetStream KV, not in any process."""

from __future__ import annotations

import pytest

from helpers import collect, make_run, run_id_for, tiny_config, wait_for
from tuneloop.events import EvalVerdict, Feedback
from tuneloop.policy import PolicyState, decide

pytestmark = pytest.mark.reliability
# Best at step 50; three evaluations without improvement after it: patience 3 stops at step 80.
SCORES = [0.5, 0.6, 0.55, 0.58, 0.62, 0.6, 0.59, 0.61]


def verdicts(run: str) -> list[EvalVerdict]:
    return [EvalVerdict(run_id=run, request_id=f"req-{i}", step=10 * (i + 1), checkpoint=f"checkpoints/checkpoint-{10 * (i + 1)}",
                        split="val", purpose="periodic", cases=10, scores={"protocol": s, "correctness": s})
            for i, s in enumerate(SCORES)]


async def test_replicas_and_restarts_decide_as_one_undisturbed_replica(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, max_steps=1000)
    cfg.feedback.metric, cfg.feedback.target, cfg.feedback.patience, cfg.feedback.min_step = "protocol", 0.9, 3, 0
    storage = make_run(tmp_path, run, cfg)
    one = PolicyState()
    expected = {v.step: decide(cfg.feedback, one, v) for v in verdicts(run)}
    assert [f.action for f in expected.values()][-1] == "stop"  # the sequence does reach patience

    svc = services(storage, nats_url, run)
    replicas = [svc.start("rl-reward"), svc.start("rl-reward")]
    feedback = await collect(bus, Feedback, run)
    for i, v in enumerate(verdicts(run)):
        if i == 3:  # one replica dies and comes back
            svc.kill(replicas[0])
            replicas[0] = svc.start("rl-reward")
        if i == 5:  # both: no process remembers anything now
            for r in replicas:
                svc.kill(r)
            replicas = [svc.start("rl-reward"), svc.start("rl-reward")]
        await bus.publish(v)
        await wait_for(lambda v=v: any(f.step == v.step for f in feedback), timeout=120)

    got = {f.step: f for f in feedback}
    assert len(feedback) == len(expected), [f.step for f in feedback]  # one feedback per verdict
    for step, want in expected.items():
        assert (got[step].action, got[step].best_step, got[step].best_score) == \
            (want.action, want.best_step, want.best_score), (step, got[step], want)
