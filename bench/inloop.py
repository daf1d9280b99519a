"""The baselines' in-loop evaluation: what a competent TRL user writes instead of tuneloop's
remote evaluators and feedback policy, shared by every bench that needs one.

Every ``every`` steps it generates the val cases with the evaluator's own batched, greedy,
``no_grad`` generation, scores them with the evaluator's scorer, and stops on the rule of
tuneloop's feedback (``feedback.target`` at or after ``feedback.min_step``, or
``feedback.patience`` evaluations without a gain; tests/unit/test_bench_rules.py holds it to
``policy.decide``). ``report`` hands each value to whoever else judges it (an Optuna pruner).
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from tuneloop.evaluator.generate import generate
from tuneloop.evaluator.suite import score
from tuneloop.task import Judge


def judge_of(cfg) -> Judge:
    """The run's task, as the evaluator judges by it (one per config: its functions imported once)."""
    key = (cfg.task.model_dump_json(), cfg.base_dir)
    if key not in _JUDGES:
        _JUDGES[key] = Judge(cfg.task, cfg.base_dir)
    return _JUDGES[key]


_JUDGES: dict = {}


def evaluate(model, tokenizer, cases, cfg) -> dict[str, float]:
    """The cases' scores, generated as tuneloop's evaluator does (left padding, eval mode)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    outputs, counts = generate(model, tokenizer, [c.prompt for c in cases], cfg.eval.max_new_tokens, cfg.eval.batch_size)
    model.train(was_training)
    tokenizer.padding_side = side
    return score(cases, outputs, counts, judge_of(cfg)).scores


class TargetStop(TrainerCallback):
    """Score val every ``every`` steps (default: every checkpoint, as tuneloop evaluates), stop on
    the feedback's rule; with ``keep_best`` the trainable weights of the best evaluation are kept
    in memory (``best_state``), as tuneloop exports its best checkpoint."""

    def __init__(self, cfg, cases, every: int | None = None, report=None, keep_best: bool = False):
        self.cfg, self.cases, self.report, self.keep_best = cfg, cases, report, keep_best
        self.every = every or cfg.eval.every or cfg.train.save_steps
        self.evaluations, self.seconds = 0, 0.0
        self.best_score, self.best_step, self.since_best, self.stopped_by = -1.0, None, 0, "max_steps"
        self.best_state: dict | None = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every:
            return
        t0 = time.perf_counter()
        value = evaluate(model, processing_class, self.cases, self.cfg)[self.cfg.feedback.metric]
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        better = value > self.best_score
        if self.stop(state.global_step, value):  # never unset it: at max_steps TRL's own flow set it
            control.should_training_stop = True
        if better and self.keep_best:
            self.best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        if self.report:
            self.report(state.global_step, value)  # may raise (a pruned trial ends here)

    def stop(self, step: int, value: float) -> bool:
        """The feedback's rule: the target at or after ``min_step``, or ``patience`` without a gain."""
        fb = self.cfg.feedback
        if value > self.best_score:
            self.best_score, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        if step >= fb.min_step and (value >= fb.target or self.since_best >= fb.patience):
            self.stopped_by = "target" if value >= fb.target else "patience"
            return True
        return False

    def restore_best(self, model) -> None:
        """Put the best evaluation's weights back (``keep_best``), to score the trial's result."""
        if self.best_state:
            params = dict(model.named_parameters())
            for k, v in self.best_state.items():
                params[k].data.copy_(v)
