"""Guards of guarded interventions: ``correct>=0.9 and loss<3``. Pure.

A guard is a condition the next verdicts must meet for a control to stay applied
(``tuneloop ctl RUN set-lr 3e-3 --guard "correct>=0.9" --within 2``). It is parsed by the
small grammar below, never by ``eval``, and each mistake is named with its column::

    guard  := all ("or" all)*
    all    := term ("and" term)*
    term   := "(" guard ")" | NAME OP NUMBER
    OP     := >= | <= | > | < | == | !=
    NAME   := METRIC | tokens | loss | CATEGORY.METRIC

``METRIC`` is any metric the run's task reports (``tuneloop.task``: those it declares, ``exact``,
``eval_loss``, ``perplexity``), ``tokens`` a verdict's mean new tokens per case,
``CATEGORY.METRIC`` a metric of one category, and ``loss`` the mean training loss logged from
the change (or the last verdict that held) to the verdict's step (``services/trainer/rollback.py``
says which steps count). Given the task's metrics, ``parse`` refuses a name it does not report.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

PLAIN = ("tokens", "loss")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|==|!=|>|<)"
                    r"|(?P<paren>[()])|(?P<word>[A-Za-z_][A-Za-z0-9_.-]*))")
MAX_LENGTH = 200


class GuardError(ValueError):
    """The guard does not parse, or names what no verdict has; the message says where."""


@dataclass(frozen=True)
class Term:
    name: str
    op: str
    value: float

    def holds(self, metrics: dict[str, float], bounds: dict[str, list[float]] | None = None) -> bool:
        """Whether the term holds; with the verdict's ``bounds``, it is broken only when the whole
        bound is on the wrong side (a guard does not roll back on the noise of a few cases)."""
        v = metrics.get(self.name)
        if v is None or math.isnan(v):  # NaN breaks every guard
            return False
        lo, hi = (bounds or {}).get(self.name) or (v, v)
        seen = {">=": hi, ">": hi, "<=": lo, "<": lo}.get(self.op, v)
        return OPS[self.op](seen, self.value)


@dataclass(frozen=True)
class Guard:
    """``any`` of its alternatives holds when ``all`` of that alternative's terms do."""

    text: str
    alternatives: tuple  # tuple[tuple[Term | Guard, ...], ...]

    def holds(self, metrics: dict[str, float], bounds: dict[str, list[float]] | None = None) -> bool:
        return any(all(t.holds(metrics, bounds) for t in alt) for alt in self.alternatives)

    @property
    def names(self) -> set[str]:
        return {n for alt in self.alternatives for t in alt for n in (t.names if isinstance(t, Guard) else {t.name})}

    def categories(self) -> set[str]:
        return {n.split(".", 1)[0] for n in self.names if "." in n}

    def missing(self, metrics: dict[str, float]) -> set[str]:
        """The names this guard reads that ``metrics`` lacks (a verdict it cannot judge)."""
        return {n for n in self.names if metrics.get(n) is None}


def parse(text: str, metrics: list[str] | None = None) -> Guard:
    """The guard ``text``; GuardError names the column and what was expected there. ``metrics``:
    the run's task's metric names (None: any name is taken, the run judges it)."""
    if not isinstance(text, str) or not text.strip():
        raise GuardError("empty guard: write a condition such as 'accuracy>=0.9'")
    if len(text) > MAX_LENGTH:
        raise GuardError(f"guard of {len(text)} characters; at most {MAX_LENGTH}")
    tokens = _tokens(text)
    guard, pos = _alternatives(text, tokens, 0, metrics)
    if pos < len(tokens):
        raise GuardError(f"guard {text!r}, column {tokens[pos][2] + 1}: unexpected {tokens[pos][1]!r}")
    return guard


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, column) of each token."""
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            col = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise GuardError(f"guard {text!r}, column {col + 1}: unexpected {text[col]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


def _expected(text: str, tokens, pos: int, what: str) -> GuardError:
    where = f"column {tokens[pos][2] + 1}, found {tokens[pos][1]!r}" if pos < len(tokens) else "at the end"
    return GuardError(f"guard {text!r}, {where}: expected {what}")


def _alternatives(text, tokens, pos, metrics) -> tuple[Guard, int]:
    alts = []
    while True:
        terms, pos = _all(text, tokens, pos, metrics)
        alts.append(tuple(terms))
        if pos < len(tokens) and tokens[pos][:2] == ("word", "or"):
            pos += 1
            continue
        return Guard(text, tuple(alts)), pos


def _all(text, tokens, pos, metrics):
    terms = []
    while True:
        term, pos = _term(text, tokens, pos, metrics)
        terms.append(term)
        if pos < len(tokens) and tokens[pos][:2] == ("word", "and"):
            pos += 1
            continue
        return terms, pos


def _term(text, tokens, pos, metrics):
    if pos < len(tokens) and tokens[pos][:2] == ("paren", "("):
        inner, pos = _alternatives(text, tokens, pos + 1, metrics)
        if pos >= len(tokens) or tokens[pos][:2] != ("paren", ")"):
            raise _expected(text, tokens, pos, "')'")
        return inner, pos + 1
    if pos >= len(tokens) or tokens[pos][0] != "word" or tokens[pos][1] in ("and", "or"):
        raise _expected(text, tokens, pos, f"a metric ({_known(metrics)})")
    name, col = tokens[pos][1], tokens[pos][2]
    _check_name(text, name, col, metrics)
    if pos + 1 >= len(tokens) or tokens[pos + 1][0] != "op":
        raise _expected(text, tokens, pos + 1, f"a comparison ({' '.join(OPS)}) after {name!r}")
    if pos + 2 >= len(tokens) or tokens[pos + 2][0] != "num":
        raise _expected(text, tokens, pos + 2, f"a number after {tokens[pos + 1][1]!r}")
    return Term(name, tokens[pos + 1][1], float(tokens[pos + 2][1])), pos + 3


def _known(metrics: list[str] | None) -> str:
    return f"{', '.join([*(metrics or ['METRIC']), *PLAIN])}, or CATEGORY.METRIC"


def _check_name(text: str, name: str, col: int, metrics: list[str] | None) -> None:
    category, _, metric = name.rpartition(".")
    if name in PLAIN or metrics is None or metric in metrics:
        return
    raise GuardError(f"guard {text!r}, column {col + 1}: unknown metric {name!r}; the run's: {_known(metrics)}")


def metrics_of(scores: dict[str, float], by_category: dict[str, dict[str, float]], tokens: float | None,
               loss: float | None) -> dict[str, float]:
    """The names a guard can read, from one verdict (and the training loss up to its step)."""
    out = {k: float(v) for k, v in scores.items()}
    for cat, s in by_category.items():
        for k, v in s.items():
            if k != "cases":
                out[f"{cat}.{k}"] = float(v)
    if tokens is not None:
        out["tokens"] = float(tokens)
    if loss is not None:
        out["loss"] = float(loss)
    return out
