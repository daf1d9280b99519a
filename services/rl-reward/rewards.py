"""A run's rewards: its task's metrics and the user's reward functions. Pure: no bus.

A reward is named in ``train.grpo.rewards`` with its weight:

- a metric of the task (``tuneloop.task``), ``exact``, or ``similarity`` (partial credit: how
  close the answer is to the reference, 0 when the format metric fails), scored per completion;
- a function by import path, ``package.module:function``, with TRL's reward signature
  ``(prompts, completions, **columns) -> list[float]``: a reward written for TRL's
  GRPOTrainer plugs in unchanged. It is called once per batch with the prompts, the
  completions (as message lists for a conversational data set, as TRL passes them) and the
  columns ``reference``, ``category`` and the data set's own.

One completion's failure (a metric it cannot be scored on, a function that raised, returned
something else than numbers, or ran past ``task.function_timeout_s``) is that completion's
error, never the batch's.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable

from tuneloop.events import RewardRequest
from tuneloop.task import EXACT, Judge, TaskSection, call_with_timeout, check_reward_function, import_function

SIMILARITY = "similarity"


class Rewards:
    """The reward functions of one run's task, imported once."""

    def __init__(self, task: TaskSection, base_dir: str):
        self.task = task
        self.judge = Judge(task, base_dir)
        self.functions: dict[str, Callable] = {}

    def check_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The weights to use (empty: the task's first metric); unknown names are a whole-request error."""
        weights = weights or {self.task.default_metric(): 1.0}
        unknown = sorted(n for n in weights if ":" not in n and n not in self.task.reward_names())
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; known: {self.task.reward_names()} or "
                             "package.module:function")
        if any(w < 0 for w in weights.values()) or not sum(weights.values()):
            raise ValueError(f"reward weights must be >= 0 and not all 0, got {weights}")
        for name in weights:
            if ":" in name and name not in self.functions:
                fn = import_function(name, self.judge.python_path)
                check_reward_function(fn, name)
                self.functions[name] = fn
        return weights

    def score(self, req: RewardRequest, parts: dict[str, list[float]] | None = None
              ) -> tuple[list[float | None], list[str | None]]:
        """(reward, error) per completion: the weighted mean of the named rewards."""
        weights = {n: w for n, w in self.check_weights(req.weights).items() if w}
        n = len(req.completions)
        refs = _padded(req.references, n)
        cats = _padded(req.categories, n)
        columns = [json.loads(c) if c else {} for c in _padded(req.columns, n)]
        prompts = _padded(req.prompts, n)
        values: dict[str, list[float | None]] = {}
        errors: list[str | None] = [None] * n
        metrics = [m for m in weights if ":" not in m]
        if metrics:
            per_item = [self._metrics(metrics, req.completions[i], prompts[i], refs[i], cats[i], columns[i])
                        for i in range(n)]
            for m in metrics:
                values[m] = [None if isinstance(x, str) else x[m] for x in per_item]
            for i, x in enumerate(per_item):
                if isinstance(x, str):
                    errors[i] = f"item {i}: {x}"
        for name in (w for w in weights if ":" in w):
            got, why = self._function(name, req, prompts, refs, cats, columns)
            values[name] = got
            for i, g in enumerate(got):
                if g is None and errors[i] is None:
                    errors[i] = f"item {i}: {why or name + ' gave no reward'}"
        total = sum(weights.values())
        out: list[float | None] = []
        for i in range(n):
            if errors[i] is not None:
                out.append(None)
                continue
            out.append(sum(weights[k] * values[k][i] for k in weights) / total)
            if parts is not None:
                for k in weights:
                    parts.setdefault(k, []).append(values[k][i])
        return out, errors

    def _metrics(self, names: list[str], completion: str, prompt, reference, category, columns) -> dict | str:
        """The item's score on each metric in ``names``, or why it has none."""
        if reference is None and (EXACT in names or SIMILARITY in names):
            return f"{EXACT if EXACT in names else SIMILARITY} needs a reference answer"
        declared = [m for m in names if m in self.task.metrics]
        fmt = self.task.format_metric
        want = [*declared, *([fmt] if SIMILARITY in names and fmt else []), *([EXACT] if EXACT in names else [])]
        v = self.judge.judge(completion, prompt=_user(prompt), reference=reference,
                             fields={**columns, "category": category}, only=want)
        unscored = [m for m in declared if m not in v.scores]
        if unscored:
            return f"{unscored[0]} needs a reference answer"
        out = {m: v.scores[m] for m in declared}
        if EXACT in names:
            out[EXACT] = v.scores.get(EXACT, 0.0)
        if SIMILARITY in names:
            answer = self.task.answer_of(completion)
            ok = answer is not None and (fmt is None or v.scores.get(fmt, 0.0) >= 1.0)
            out[SIMILARITY] = difflib.SequenceMatcher(None, answer, str(reference)).ratio() if ok else 0.0
        return out

    def _function(self, name: str, req: RewardRequest, prompts, refs, cats, columns
                  ) -> tuple[list[float | None], str | None]:
        """A user's reward function on the whole batch: one value (or None) per completion, and why none."""
        n = len(req.completions)
        completions = [[{"role": "assistant", "content": c}] for c in req.completions] if req.conversational \
            else list(req.completions)
        keys = sorted({k for c in columns for k in c} - {"prompts", "completions"})
        kwargs = {"prompts": list(prompts), "completions": completions, "reference": list(refs),
                  "category": list(cats), **{k: [c.get(k) for c in columns] for k in keys}}
        got, error = call_with_timeout(self.functions[name], kwargs, self.task.function_timeout_s)
        if error:
            return [None] * n, f"{name} {error}"
        try:
            values = list(got)
        except TypeError:
            return [None] * n, f"{name} returned {type(got).__name__}, not a list of floats"
        if len(values) != n:
            return [None] * n, f"{name} returned {len(values)} rewards for {n} completions"
        out: list[float | None] = []
        why = None
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                out.append(None)
                why = why or f"{name} returned {v!r}, not a number"
            else:
                out.append(float(v))
        return out, why


def _padded(values: list, n: int) -> list:
    return list(values[:n]) + [None] * (n - len(values))


def _user(prompt) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return prompt or ""
