"""The user's task: what a good answer is, declared once (the config's ``task:``).

Everything that judges an answer reads it: the evaluator's verdicts, rl-reward's rewards, the
data-quality gate, DPO negatives, the feedback policy, guards, sweeps and every view. A metric
is declarative checks (``tuneloop.checks``), a Python function by import path, or both; a
metric marked ``format`` says what a valid answer looks like. Three metrics need no
declaration: ``exact`` (the answer equals the reference), and the teacher-forced held-out
``eval_loss`` and ``perplexity`` of the val demonstrations (lower is better).

    task:
      category_column: topic            # per-category verdicts and adaptive data (none: one category)
      reference_column: solution        # or none: the reference is the demonstration's answer,
      answer: {regex: 'Answer: (\\S+)'}  # ... or the part of it this finds (a regex group or a JSON field)
      metrics:
        format: {format: true, checks: [{type: regex, pattern: 'Answer: -?\\d+'}]}
        correct: {requires: [format], checks: [{type: regex, pattern: 'Answer: (-?\\d+)', capture: 1}]}
        work_shown: {function: "my_task.checks:equation_holds"}

A metric function is called with keywords ``prompt`` (the last user message), ``completion``,
``reference`` and the case's other columns (those its signature names, or all with
``**kwargs``), and returns a bool, a score in [0, 1], or ``(score, reason)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .checks import Check, Subject, needs_reference, run_checks

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,39}$"  # a guard's word; no dot (CATEGORY.metric has one)
EXACT, LOSS, PERPLEXITY = "exact", "eval_loss", "perplexity"
BUILTIN = (EXACT, LOSS, PERPLEXITY)
LOWER_IS_BETTER = (LOSS, PERPLEXITY)
REWARD_BUILTINS = (EXACT, "similarity")  # similarity: partial credit, how close the answer is to the reference
SUITE_METRIC = "pass"  # a test suite case's own checks, all passing
DEFAULT_CATEGORY = "default"
# Names a metric may not take: tuneloop's own metrics, what guards read, and the keys beside the scores in a summary.
RESERVED = (*BUILTIN, SUITE_METRIC, "similarity", "tokens", "loss", "cases", "step", "mean_new_tokens", "by_category")


class TaskError(ValueError):
    """A task that cannot be used: a function that does not import, or has the wrong signature."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnswerRule(_Section):
    """Where the answer lies in an assistant message: a JSON field, or a regex (its first group,
    else the whole match)."""

    field: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "AnswerRule":
        if (self.field is None) == (self.regex is None):
            raise ValueError("give exactly one of field and regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} is not a valid regular expression: {e}") from None
        return self

    def find(self, text: str) -> str | None:
        """The answer in ``text``, or None when it has none."""
        if self.regex is not None:
            m = re.search(self.regex, text)
            return None if m is None else (m.group(1) if m.groups() else m.group(0)).strip()
        import json

        try:
            obj = json.loads(text.strip())
        except ValueError:
            return None
        value = obj.get(self.field) if isinstance(obj, dict) else None
        return None if value is None else str(value)


class Metric(_Section):
    """One named metric: checks (all must pass), a Python function, or both (the function's
    score counts only when the checks pass); ``requires``: other metrics that must pass too."""

    checks: list[Check] = Field(default_factory=list)
    function: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                 description="package.module:function, importable from task.python_path.")
    requires: list[str] = Field(default_factory=list, description="Metrics a case must pass for this one to count.")
    format: bool = Field(default=False, description="What a valid answer looks like: the data-quality gate's rule.")
    description: str = ""

    @model_validator(mode="after")
    def _something(self) -> "Metric":
        if not self.checks and self.function is None and not self.requires:
            raise ValueError("a metric needs checks, a function, or requires")
        return self


class TaskSection(_Section):
    category_column: str | None = Field(default=None, description=(
        "The data column whose value is a row's category (per-category verdicts, adaptive data). None: one category."))
    reference_column: str | None = Field(default=None, description=(
        "The data column holding the reference answer. None: the demonstration's answer (or what `answer` finds in it)."))
    answer: AnswerRule | None = Field(default=None, description=(
        "Where the answer lies in an assistant message, for the reference (without reference_column), `exact` and "
        "`similarity`. None: the whole message."))
    metrics: dict[str, Metric] = Field(default_factory=dict, description="Named metrics, in the order views show them.")
    python_path: list[str] = Field(default_factory=lambda: ["."], description=(
        "Folders (relative to the config file) the metric and reward functions are imported from."))
    function_timeout_s: float = Field(default=10.0, gt=0, description="A function call taking longer scores 0 (per case, per batch for rewards).")

    @model_validator(mode="after")
    def _names(self) -> "TaskSection":
        for name, metric in self.metrics.items():
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"metric name {name!r}: letters, digits and _ only, starting with a letter")
            if name in RESERVED:
                raise ValueError(f"metric name {name!r} is tuneloop's own; choose another")
            unknown = [r for r in metric.requires if r not in self.metrics]
            if unknown:
                raise ValueError(f"metrics.{name}.requires: no metric {', '.join(unknown)} (declared: "
                                 f"{', '.join(self.metrics)})")
        for name in self.metrics:
            self._order(name, ())
        formats = [n for n, m in self.metrics.items() if m.format]
        if len(formats) > 1:
            raise ValueError(f"at most one format metric, got {', '.join(formats)}")
        return self

    def _order(self, name: str, seen: tuple) -> None:
        if name in seen:
            raise ValueError(f"metrics.{name}.requires: a cycle ({' -> '.join((*seen, name))})")
        for r in self.metrics[name].requires:
            self._order(r, (*seen, name))

    @property
    def format_metric(self) -> str | None:
        return next((n for n, m in self.metrics.items() if m.format), None)

    def names(self) -> list[str]:
        """Every metric a verdict of this task reports: the declared ones, then tuneloop's."""
        return [*self.metrics, *BUILTIN]

    def shown(self) -> list[str]:
        """What views show of a verdict: the declared metrics (else exact), and the held-out loss."""
        return [*(self.metrics or [EXACT]), LOSS]

    def default_metric(self) -> str:
        """What feedback steers by unless the config says: the first declared metric, else exact."""
        return next(iter(self.metrics), EXACT)

    def reward_names(self) -> list[str]:
        return [*self.metrics, *REWARD_BUILTINS]

    def category_of(self, columns: dict) -> str:
        if self.category_column is None:
            return DEFAULT_CATEGORY
        value = columns.get(self.category_column)
        return DEFAULT_CATEGORY if value is None else str(value)

    def reference_of(self, answer: str, columns: dict) -> str | None:
        if self.reference_column is not None:
            value = columns.get(self.reference_column)
            return None if value is None else str(value)
        return self.answer.find(answer) if self.answer else answer.strip()

    def answer_of(self, completion: str) -> str | None:
        return self.answer.find(completion) if self.answer else completion.strip()


def shown_of(scores) -> list[str]:
    """What views show of a verdict's ``scores`` when they do not have the task at hand: as
    ``TaskSection.shown``, told from the names (the declared ones are not tuneloop's)."""
    declared = [m for m in scores if m not in BUILTIN]
    return [*(declared or [m for m in scores if m == EXACT]), *(m for m in scores if m == LOSS)]


def goal(metric: str) -> Literal["max", "min"]:
    """Whether a higher or a lower value of ``metric`` is better."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def better(metric: str, a: float, b: float | None) -> bool:
    """Whether ``a`` is better than ``b`` (None: nothing yet)."""
    return b is None or (a < b if goal(metric) == "min" else a > b)


def unknown_metric(name: str, known: list[str], where: str) -> str:
    return f"{where}: unknown metric {name!r}; the task's metrics: {', '.join(known)}"


# ------------------------------------------------------------------ user functions
_IMPORT_LOCK = threading.Lock()


def import_function(path: str, python_path: list[Path]) -> Callable:
    """The function at ``module:function``; TaskError names the path and what went wrong."""
    module_name, _, attr = path.partition(":")
    with _IMPORT_LOCK:
        for folder in reversed(python_path):
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # any import failure: the user's module is what is wrong
            raise TaskError(f"{path}: cannot import {module_name!r}: {type(e).__name__}: {e} (looked in "
                            f"{', '.join(map(str, python_path))} and the installed packages)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise TaskError(f"{path}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no {attr!r}")
    if not callable(fn):
        raise TaskError(f"{path}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _parameters(fn: Callable, path: str) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise TaskError(f"{path}: its signature cannot be read: {e}") from None


def check_metric_function(fn: Callable, path: str) -> None:
    """A metric function takes ``completion`` (by keyword), and asks for nothing else it cannot have."""
    params = _parameters(fn, path)
    names = {p.name for p in params}
    if "completion" not in names:
        raise TaskError(f"{path}: a metric function takes the keyword argument 'completion' (and optionally "
                        f"prompt, reference and the case's columns); its parameters: {_signature(params)}")
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        raise TaskError(f"{path}: parameters {positional_only} are positional-only; tuneloop passes keywords")


def check_reward_function(fn: Callable, path: str) -> None:
    """TRL's reward signature: ``(prompts, completions, **columns) -> list[float]``."""
    params = _parameters(fn, path)
    names = [p.name for p in params]
    if "completions" not in names:
        raise TaskError(f"{path}: a reward function has TRL's signature (prompts, completions, **kwargs) -> "
                        f"list[float]; its parameters: {_signature(params)}")


def _signature(params: list[inspect.Parameter]) -> str:
    return "(" + ", ".join(str(p) for p in params) + ")"


def call_with_timeout(fn: Callable, kwargs: dict, timeout: float) -> tuple[Any, str | None]:
    """(what ``fn(**kwargs)`` returned, None), or (None, why not): it raised or ran past ``timeout``.

    The call runs on a daemon thread: a function that never returns is left behind (Python
    cannot stop a thread) but no longer holds up the evaluator or the run."""
    box: dict[str, Any] = {}

    def call():
        try:
            box["value"] = fn(**kwargs)
        except BaseException as e:  # the user's code: anything it raises is its case's reason
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=call, daemon=True, name="tuneloop-task-function")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return None, f"timed out after {timeout:g} s"
    if "error" in box:
        return None, f"raised {box['error']}"
    return box.get("value"), None


def as_score(value: Any) -> tuple[float | None, str]:
    """A metric function's result as (score in [0, 1], reason); score None when it is not one."""
    reason = ""
    if isinstance(value, tuple) and len(value) == 2:
        value, reason = value
    elif isinstance(value, dict) and "score" in value:
        value, reason = value["score"], value.get("reason", "")
    if isinstance(value, bool):
        return float(value), str(reason or "")
    if isinstance(value, (int, float)) and not math.isnan(value) and 0.0 <= value <= 1.0:
        return float(value), str(reason or "")
    return None, f"returned {value!r}, not a bool or a score in [0, 1]"


# ------------------------------------------------------------------ judging one case
@dataclass
class Verdict:
    """One case judged: each metric's score in [0, 1] and, where it is below 1, why."""

    scores: dict[str, float]
    reasons: dict[str, str]


class Judge:
    """A task ready to score answers: its functions imported once (TaskError if one cannot be)."""

    def __init__(self, task: TaskSection, base_dir: str | Path):
        self.task = task
        self.python_path = [Path(base_dir) / p for p in task.python_path]
        self.functions: dict[str, Callable] = {}
        for name, metric in task.metrics.items():
            if metric.function:
                fn = import_function(metric.function, self.python_path)
                check_metric_function(fn, metric.function)
                self.functions[name] = fn

    def judge(self, completion: str, *, prompt: str = "", reference: str | None = None, fields: dict | None = None,
              new_tokens: int = 0, only: list[str] | None = None) -> Verdict:
        """Every declared metric of one completion (or those in ``only``, with what they require),
        and ``exact`` where the case has a reference. A case without a reference (a demonstration
        whose answer the task's rule finds nothing in) has no score on a metric whose checks
        compare with it: that metric's mean is over the cases that have one."""
        fields = dict(fields or {})
        subject = Subject(completion, new_tokens, reference, fields)
        scores: dict[str, float] = {}
        reasons: dict[str, str] = {}
        for name in self._needed(only):
            metric = self.task.metrics[name]
            if (reference is None and needs_reference(metric.checks)) or any(r not in scores for r in metric.requires):
                continue  # a case without a reference is not scored on what compares with one (nor what requires it)
            score, why = self._metric(name, subject, prompt, scores)
            scores[name] = score
            if why:
                reasons[name] = why
        if reference is not None and (only is None or EXACT in only):
            got = self.task.answer_of(completion)
            ok = got is not None and got.strip() == reference.strip()
            scores[EXACT] = float(ok)
            if not ok:
                reasons[EXACT] = "no answer found" if got is None else f"answer {got[:80]!r}, expected {reference[:80]!r}"
        return Verdict(scores, reasons)

    def _needed(self, only: list[str] | None) -> list[str]:
        """Declared metrics to compute, each after those it requires."""
        want = list(self.task.metrics) if only is None else [n for n in only if n in self.task.metrics]
        out: list[str] = []

        def add(name: str) -> None:
            for r in self.task.metrics[name].requires:
                add(r)
            if name not in out:
                out.append(name)

        for n in want:
            add(n)
        return out

    def _metric(self, name: str, s: Subject, prompt: str, done: dict[str, float]) -> tuple[float, str]:
        metric = self.task.metrics[name]
        failed = [r for r in metric.requires if done.get(r, 0.0) < 1.0]
        if failed:
            return 0.0, f"fails {', '.join(failed)}"
        reasons = run_checks(metric.checks, s)
        if reasons:
            return 0.0, reasons[0]  # the first check it fails: the later ones often fail for the same cause
        if metric.function is None:
            return 1.0, ""
        kwargs = {"prompt": prompt, "completion": s.output, "reference": s.reference, **s.fields}
        value, error = call_with_timeout(self.functions[name], self._accepted(self.functions[name], kwargs),
                                         self.task.function_timeout_s)
        if error:
            return 0.0, f"{metric.function} {error}"
        score, why = as_score(value)
        if score is None:
            return 0.0, f"{metric.function} {why}"
        return score, why

    @staticmethod
    def _accepted(fn: Callable, kwargs: dict) -> dict:
        params = inspect.signature(fn).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return kwargs
        names = {p.name for p in params}
        return {k: v for k, v in kwargs.items() if k in names}


def check_task(task: TaskSection, base_dir: str | Path, rewards: list[str] = ()) -> None:
    """Import every function the task and the rewards name and check its signature (TaskError)."""
    judge = Judge(task, base_dir)
    for name in rewards:
        if ":" in name:
            check_reward_function(import_function(name, judge.python_path), name)
