"""The feedback policy: stop on target or patience, duplicates ignored."""

from tuneloop.config import FeedbackSection
from tuneloop.events import EvalVerdict
from tuneloop.policy import PolicyState, decide


def verdict(step, score, vid=None):
    return EvalVerdict(run_id="r", request_id="q", step=step, checkpoint=f"c{step}", split="val", purpose="periodic",
                       cases=10, scores={"protocol": score, "correctness": 0.0},
                       by_category={"math": {"protocol": score}, "upper": {"protocol": 1.0}}, **({"event_id": vid} if vid else {}))


def test_policy_stops_on_target_or_patience_and_ignores_duplicates():
    cfg = FeedbackSection(target=0.9, patience=2, min_step=10)
    st = PolicyState()
    assert decide(cfg, st, verdict(5, 0.95)).action == "continue"  # before min_step
    st = PolicyState()
    first = verdict(10, 0.5, "v1")
    fb = decide(cfg, st, first)
    assert fb.action == "continue" and fb.weak_categories == ["math"]
    assert decide(cfg, st, first) is None
    assert decide(cfg, st, verdict(20, 0.4)).action == "continue"
    fb = decide(cfg, st, verdict(30, 0.45))
    assert fb.action == "stop" and "no improvement for 2" in fb.reason and fb.best_step == 10
    fb = decide(cfg, PolicyState(), verdict(40, 0.92))
    assert fb.action == "stop" and fb.reason.startswith("target reached")
