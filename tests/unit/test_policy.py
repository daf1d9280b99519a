"""The feedback policy: stop on target or patience, duplicates ignored."""

from tuneloop.config import FeedbackSection
from tuneloop.events import EvalVerdict
from tuneloop.policy import PolicyState, decide


def verdict(step, score, vid=None):
    return EvalVerdict(run_id="r", request_id="q", step=step, checkpoint=f"c{step}", split="val", purpose="periodic",
                       cases=10, scores={"protocol": score, "correctness": 0.0},
                       by_category={"math": {"protocol": score}, "upper": {"protocol": 1.0}}, **({"event_id": vid} if vid else {}))


def test_policy_stops_on_target_or_patience_and_ignores_duplicates():
    cfg = FeedbackSection(metric="protocol", target=0.9, patience=2, min_step=10)
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



def test_a_rollback_rewinds_the_policy_to_the_verdicts_that_remain():
    """Patience counted on discarded training must not stop the run: after ``rewind`` the
    policy decides as if the discarded checkpoints' verdicts never came, late ones included."""
    from tuneloop.events import ControlRolledBack, derived_id
    from tuneloop.policy import rewind
    from tuneloop.tools.backtest import run_policy

    cfg = FeedbackSection(metric="protocol", target=0.9, patience=2, min_step=0)

    def v(step, score, saved):  # the verdict of the checkpoint whose ckpt.saved is ``saved``
        return EvalVerdict(run_id="r", request_id=derived_id("eval", saved), step=step, checkpoint=f"c{step}",
                           split="val", purpose="periodic", cases=10, scores={"protocol": score})

    kept, discarded, late = v(10, 0.5, "save-10"), v(20, 0.4, "save-20"), v(30, 0.3, "save-30")
    again = v(20, 0.45, "save-20-again")  # step 20 trained again after the rollback
    untouched = PolicyState()
    for x in (kept, discarded):
        decide(cfg, untouched, x)
    assert decide(cfg, untouched, again).action == "stop"  # what the rollback must prevent

    st = PolicyState()
    for x in (kept, discarded):
        decide(cfg, st, x)
    st = rewind(st, [derived_id("eval", s) for s in ("save-20", "save-30")])
    assert (st.best_step, st.since_best, list(st.decided)) == (10, 0, [kept.event_id])
    assert decide(cfg, st, late) is None  # a discarded checkpoint's verdict arriving late
    assert decide(cfg, st, again).action == "continue" and st.since_best == 1
    # `tuneloop replay` rewinds at a recorded rollback the same way.
    rolled = ControlRolledBack(run_id="r", control_id="c", command="set-lr", guard="loss<1", step=25,
                               savepoint_step=10, verdict_step=20, discarded_saves=["save-20", "save-30"])
    replayed = run_policy(cfg, [kept, discarded, rolled, late, again])
    assert [(d.step, d.action) for d in replayed.decisions] == [(10, "continue"), (20, "continue"), (20, "continue")]
    assert run_policy(cfg, [kept, discarded, late, again]).stop_at == 30  # without the rollback: stopped


def test_a_lower_is_better_metric_stops_at_or_below_its_target_and_names_no_weak_categories():
    cfg = FeedbackSection(metric="eval_loss", target=0.5, patience=2)
    st = PolicyState()

    def v(step, loss):
        return EvalVerdict(run_id="r", request_id=f"q{step}", step=step, checkpoint=f"c{step}", split="val",
                           purpose="periodic", cases=10, scores={"exact": 0.1, "eval_loss": loss},
                           by_category={"default": {"eval_loss": loss}})

    fb = decide(cfg, st, v(10, 1.2))
    assert fb.action == "continue" and fb.reason == "eval_loss 1.200 > target 0.500" and fb.weak_categories == []
    assert decide(cfg, st, v(20, 0.9)).best_step == 20  # lower is better
    assert decide(cfg, st, v(30, 1.0)).action == "continue"
    fb = decide(cfg, st, v(40, 0.95))
    assert fb.action == "stop" and "no improvement for 2" in fb.reason and fb.best_score == 0.9
    fb = decide(cfg, PolicyState(), v(50, 0.45))
    assert fb.action == "stop" and fb.reason == "target reached: eval_loss 0.450 <= 0.500"


def bounded(step, score, lo, hi, by_category=None):
    return EvalVerdict(run_id="r", request_id=f"q{step}", step=step, checkpoint=f"c{step}", split="val",
                       purpose="periodic", cases=48, scores={"correctness": score}, bounds={"correctness": [lo, hi]},
                       confidence=0.8, by_category=by_category or {})


def test_with_bounds_the_target_needs_the_lower_bound_and_patience_only_sure_losses():
    """Noise-aware decisions: a score at the target whose bound reaches below it does not stop
    the run; a verdict whose bound spans the best neither resets nor counts patience; one whose
    upper bound is at or below the best's score counts."""
    cfg = FeedbackSection(metric="correctness", target=0.7, patience=2, confidence=0.8)
    st = PolicyState()
    fb = decide(cfg, st, bounded(10, 0.72, 0.55, 0.85))
    assert fb.action == "continue" and "not yet sure" in fb.reason and st.best_bound == 0.55
    fb = decide(cfg, st, bounded(20, 0.66, 0.50, 0.80))  # spans the best: not a loss
    assert fb.action == "continue" and st.since_best == 0 and st.best_step == 10
    decide(cfg, st, bounded(30, 0.60, 0.45, 0.75))  # still spans 0.72
    decide(cfg, st, bounded(40, 0.50, 0.35, 0.70))  # surely below 0.72: one
    assert st.since_best == 1
    fb = decide(cfg, st, bounded(50, 0.52, 0.38, 0.71))
    assert fb.action == "stop" and "no improvement for 2" in fb.reason
    fb = decide(cfg, PolicyState(), bounded(60, 0.9, 0.71, 0.97))
    assert fb.action == "stop" and fb.reason.startswith("target reached") and "[0.710, 0.970]" in fb.reason
    # A new best needs its lower bound above the best's: a lucky mean on a few cases is not one.
    st = PolicyState()
    decide(cfg, st, bounded(10, 0.6, 0.5, 0.7))
    decide(cfg, st, bounded(20, 0.8, 0.45, 0.95))
    assert st.best_step == 10


def test_a_sequential_verdict_is_settled_only_when_every_decision_it_is_for_is():
    from tuneloop.events import Decision
    from tuneloop.policy import settled

    d = Decision(metric="correctness", confidence=0.8, target=0.7, best_score=0.5, best_bound=0.4, early_end=True)
    assert settled(d, {"correctness": [0.45, 0.65]}, 0.55) == (
        "settled: target not reached and better than the best (correctness in [0.450, 0.650])")
    assert settled(d, {"correctness": [0.30, 0.48]}, 0.4).startswith("settled: target not reached and no better")
    assert settled(d, {"correctness": [0.35, 0.65]}, 0.5) is None  # spans the best
    assert settled(d, {"correctness": [0.60, 0.80]}, 0.7) is None  # spans the target
    assert settled(d.model_copy(update={"target": None, "best_bound": None}), {"correctness": [0.0, 1.0]}, 0.5) \
        == "settled: nothing to decide (correctness in [0.000, 1.000])"


def test_only_a_decision_that_keeps_training_ends_a_verdict_early():
    """Not reached, or no better: the prefix is enough. Reached: scored on (a stop is for good),
    the same for a loss, whose target is reached at or below it."""
    from tuneloop.events import Decision
    from tuneloop.policy import ends_early

    d = Decision(metric="correctness", confidence=0.8, target=0.7, early_end=True)
    assert ends_early(d, {"correctness": [0.1, 0.5]}, 0.3, 16, 96).startswith("settled: target not reached")
    assert ends_early(d, {"correctness": [0.72, 0.98]}, 0.9, 16, 96) is None
    loss = Decision(metric="eval_loss", confidence=0.8, target=0.5, early_end=True)
    assert ends_early(loss, {"eval_loss": [0.3, 0.45]}, 0.4, 16, 96) is None
    assert ends_early(loss, {"eval_loss": [0.9, 1.4]}, 1.1, 16, 96).startswith("settled: target not reached")


def test_weak_categories_are_those_below_the_others():
    """Relative weakness: every category under 0.9 still names the weakest; equal ones none."""
    from tuneloop.policy import weak_categories

    cats = {"a": {"correctness": 0.3}, "b": {"correctness": 0.6}, "c": {"correctness": 0.62}}
    assert weak_categories(cats, "correctness", 0.05) == ["a"]
    assert weak_categories({k: {"correctness": 0.4} for k in "abc"}, "correctness", 0.05) == []
    assert weak_categories({"a": {"eval_loss": 2.0}, "b": {"eval_loss": 1.0}}, "eval_loss", 0.05) == ["a"]
    cfg = FeedbackSection(metric="correctness", target=0.95, patience=5)
    fb = decide(cfg, PolicyState(), bounded(10, 0.5, 0.4, 0.6, cats))
    assert fb.weak_categories == ["a"]


def test_a_decision_the_whole_split_would_not_settle_ends_the_verdict_unsettled():
    """Hovering at the target: 16 of 96 cases at 0.6 against a target of 0.6; even a bound
    narrowed to 96 cases would span it, so the rest is not scored. Far from it, scoring goes on."""
    from tuneloop.events import Decision
    from tuneloop.policy import beyond_reach

    d = Decision(metric="correctness", confidence=0.8, target=0.6, early_end=True)
    said = beyond_reach(d, {"correctness": [0.35, 0.82]}, 0.6, 16, 96)
    assert said.startswith("unsettled, and the whole split would not settle it")
    assert beyond_reach(d, {"correctness": [0.15, 0.62]}, 0.38, 16, 96) is None  # 96 cases may settle it
    assert beyond_reach(d, {"correctness": [0.35, 0.82]}, 0.6, 96, 96) is None  # nothing left to score
