"""The data-quality gate: what the rows teach, checked before any training. Pure: no bus, no files.

Findings, each with the row it is about (file:line) and why:

- ``duplicate``: the same row as an earlier one once normalised (case, spacing, punctuation);
- ``near_duplicate``: nearly the same text as an earlier row (MinHash LSH, datasketch);
- ``test_overlap``: a held-out prompt that is (nearly) a train prompt, beyond the exact rule
  that already keeps held-out prompts out of train;
- ``format_violation``: a demonstration that fails the task's format metric (the metric marked
  ``format: true``, judged with the row's reference and columns; shared/task.py). A task
  without one has no violation rule;
- ``empty``, ``truncated`` (longer than ``train.max_length`` once templated), ``outlier_length``
  (outside the interquartile fences);
- category balance (counts and the smallest category's share of the largest).

``data.quality`` decides what is dropped. Nothing goes silently: every count and the first
examples of each finding go to ``quality.json`` beside the splits and into ``data.ready``.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneloop.task import Judge

VIOLATION = "format_violation"
EXAMPLES = 5  # first examples kept per finding
NUM_PERM = 128


class QualityError(ValueError):
    """The gate refused the data set (``format_violations: fail`` or too high a violation rate)."""


@dataclass
class Finding:
    kind: str
    where: str
    detail: str


@dataclass
class Report:
    rows: int = 0
    findings: list[Finding] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    categories: dict[str, int] = field(default_factory=dict)
    length_unit: str = "bytes"

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.kind for f in self.findings).items()))

    @property
    def violation_rate(self) -> float:
        return self.counts().get(VIOLATION, 0) / self.rows if self.rows else 0.0

    @property
    def balance(self) -> float:
        """The smallest category's row count over the largest's (1: balanced)."""
        return min(self.categories.values()) / max(self.categories.values()) if self.categories else 1.0

    def summary(self) -> dict:
        """What ``data.ready`` carries (quality.json has the examples too)."""
        return {"rows": self.rows, "findings": self.counts(), "dropped": dict(sorted(self.dropped.items())),
                "violation_rate": round(self.violation_rate, 4), "categories": dict(sorted(self.categories.items())),
                "balance": round(self.balance, 4), "length_unit": self.length_unit}

    def document(self) -> dict:
        examples: dict[str, list[dict]] = {}
        for f in self.findings:
            if len(examples.setdefault(f.kind, [])) < EXAMPLES:
                examples[f.kind].append({"where": f.where, "detail": f.detail})
        return {**self.summary(), "examples": examples}

    def lines(self) -> list[str]:
        """Counts by reason and the first examples, as the service logs them."""
        out = [f"quality: {self.rows} train rows checked; findings {self.counts() or 'none'}; dropped "
               f"{dict(self.dropped) or 'none'}; violation rate {self.violation_rate:.1%}; categories "
               f"{self.categories} (balance {self.balance:.2f})"]
        for kind, items in self.document()["examples"].items():
            out += [f"  {kind}: {e['where']}: {e['detail']}" for e in items[:3]]
        return out


def normalise(text: str) -> str:
    """Case, accents-as-typed, spacing and punctuation aside: what makes two rows the same."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


def _minhash(text: str):
    """MinHash of a normalised text's words and word pairs: on short prompts a character
    shingle would call "What is 33 plus 10" and "... plus 19" near-duplicates; they are two tasks."""
    from datasketch import MinHash

    words = text.split()
    grams = {*words, *(" ".join(p) for p in zip(words, words[1:]))} or {""}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([g.encode() for g in grams])
    return m


class NearIndex:
    """Texts seen so far, queried for near-duplicates: LSH finds candidates, and a candidate
    counts when its estimated Jaccard similarity reaches the threshold."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.hashes: dict[str, object] = {}

    def near(self, text: str) -> list[str]:
        m = _minhash(text)
        return sorted(k for k in self.lsh.query(m) if m.jaccard(self.hashes[k]) >= self.threshold)

    def add(self, key: str, text: str) -> None:
        m = _minhash(text)
        self.hashes[key] = m
        self.lsh.insert(key, m)


def violation(item: "Item", judge: Judge) -> str | None:
    """Why a demonstration fails the task's format metric, or None (also when there is none)."""
    metric = judge.task.format_metric
    if metric is None:
        return None
    v = judge.judge(item.answer, prompt=item.user, reference=item.reference, fields=item.columns, only=[metric])
    return None if v.scores.get(metric, 0.0) >= 1.0 else f"{metric}: {v.reasons.get(metric, 'fails')}"


def fences(lengths: list[int], k: float = 3.0) -> tuple[float, float]:
    """Tukey's far-out fences: below Q1 - k*IQR or above Q3 + k*IQR is an outlier."""
    if len(lengths) < 4:
        return float("-inf"), float("inf")
    q1, _, q3 = statistics.quantiles(lengths, n=4)
    return q1 - k * (q3 - q1), q3 + k * (q3 - q1)


@dataclass
class Item:
    """A row as the gate sees it: where it came from, its prompt and answer texts."""

    where: str
    prompt: str
    answer: str
    category: str
    reference: str | None
    templated: str  # prompt and answer as the trainer will see them
    columns: dict = field(default_factory=dict)  # the row's other columns, for the task's checks
    user: str = ""  # the last user message, for the task's functions


def run_gate(settings, train: list[Item], held: list[Item], judge: Judge, max_length: int,
             length_of: Callable[[str], int], length_unit: str) -> tuple[set[int], set[int], Report]:
    """(train indices to drop, held-out indices to drop, report). Raises QualityError when the
    settings say the data set must not be trained on."""
    report = Report(rows=len(train), length_unit=length_unit)
    drop_train: set[int] = set()
    drop_held: set[int] = set()

    def find(kind: str, where: str, detail: str, drop: bool, into: set[int], i: int) -> None:
        report.findings.append(Finding(kind, where, detail))
        if drop and i not in into:
            into.add(i)
            report.dropped[kind] += 1

    dedupe = settings.duplicates == "drop"
    first: dict[str, str] = {}
    index = NearIndex(settings.near_duplicate_threshold)
    for i, item in enumerate(train):
        key = normalise(item.prompt + "\n" + item.answer)
        if key in first:
            find("duplicate", item.where, f"same as {first[key]}", dedupe, drop_train, i)
            continue
        first[key] = item.where
        near = index.near(key)
        if near:
            find("near_duplicate", item.where, f"nearly the same as {near[0]}", dedupe, drop_train, i)
            continue
        index.add(item.where, key)

    prompts = NearIndex(settings.near_duplicate_threshold)
    train_prompts: dict[str, str] = {}
    for item in train:
        p = normalise(item.prompt)
        if p not in train_prompts:
            train_prompts[p] = item.where
            prompts.add(item.where, p)
    for i, item in enumerate(held):
        p = normalise(item.prompt)
        twin = train_prompts.get(p) or next(iter(prompts.near(p)), None)
        if twin:
            find("test_overlap", item.where, f"held-out prompt {item.prompt!r} is (nearly) train's {twin}", dedupe,
                 drop_held, i)

    policy = settings.format_violations
    for i, item in enumerate(train):
        why = violation(item, judge)
        if why:
            find(VIOLATION, item.where, f"{why} in {item.answer[:200]!r}", policy == "drop", drop_train, i)

    lengths = [len(t.templated) for t in train]
    low, high = fences(lengths)
    for i, item in enumerate(train):
        n = length_of(item.templated)
        if not item.answer.strip() or not item.prompt.strip():
            find("empty", item.where, "empty prompt or answer", settings.lengths == "drop", drop_train, i)
        elif n > max_length:
            find("truncated", item.where, f"{n} {length_unit} > train.max_length {max_length}",
                 settings.lengths == "drop", drop_train, i)
        elif not low <= len(item.templated) <= high:
            find("outlier_length", item.where, f"{len(item.templated)} characters, outside [{low:.0f}, {high:.0f}]",
                 settings.lengths == "drop", drop_train, i)

    report.categories = dict(Counter(t.category for i, t in enumerate(train) if i not in drop_train))
    violations = report.counts().get(VIOLATION, 0)
    metric = judge.task.format_metric
    if policy == "fail" and violations:
        raise QualityError(f"{violations} of {len(train)} train rows fail the format metric {metric!r} (data.quality."
                           f"format_violations: fail): " + "; ".join(report.lines()[1:4]))
    if report.violation_rate > settings.max_violation_rate:
        raise QualityError(f"{report.violation_rate:.1%} of the train rows fail the format metric {metric!r}, more than "
                           f"data.quality.max_violation_rate {settings.max_violation_rate:.0%}: " +
                           "; ".join(report.lines()[1:4]))
    return drop_train, drop_held, report
