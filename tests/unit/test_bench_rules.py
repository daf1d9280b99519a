"""The benches' baselines decide as tuneloop does where the bench says they do: the TRL callback
arm of bench/compute_to_target.py and the Optuna arm of bench/sweep.py stop on the very rule of tuneloop's feedback policy."""

import random
import sys

from helpers import REPO

from tuneloop.config import load_config
from tuneloop.events import EvalVerdict
from tuneloop.policy import PolicyState, decide

sys.path.insert(0, str(REPO / "bench"))
import inloop  # noqa: E402  (a bench module, beside its common.py)


def test_the_callback_arm_stops_where_the_feedback_policy_stops():
    cfg = load_config(REPO / "examples" / "protocol.yaml")
    rng = random.Random(0)
    stops = set()
    for trial in range(200):
        callback, state, every = inloop.TargetStop(cfg, []), PolicyState(), cfg.train.save_steps
        for step in range(every, cfg.train.max_steps + 1, every):
            value = round(rng.uniform(0.3, 0.75), 2)
            verdict = EvalVerdict(run_id="r", request_id=f"q{trial}-{step}", step=step, checkpoint=f"c{step}",
                                  split="val", purpose="periodic", cases=48, scores={cfg.feedback.metric: value})
            policy_stops = decide(cfg.feedback, state, verdict).action == "stop"
            assert callback.stop(step, value) == policy_stops, (trial, step)
            assert (callback.best_step, callback.best_score) == (state.best_step, state.best_score)
            if policy_stops:
                stops.add(callback.stopped_by)
                break
    assert stops == {"target", "patience"}  # both halves of the rule were exercised
