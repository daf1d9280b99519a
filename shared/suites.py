"""Test suites declared in files: cases with a prompt and the checks its answer must pass.

One JSON object per line::

    {"prompt": "Compute 2 + 2.", "category": "math", "weight": 2,
     "checks": [{"type": "json"}, {"type": "keys", "keys": ["task", "answer"]},
                {"type": "numeric", "field": "answer", "value": 4}, {"type": "max_tokens", "value": 20}]}

``prompt`` is the user's message (or ``messages``, a chat without the answer). data-pipeline
validates the file (errors name file:line: field), renders each prompt with the chat template
and writes the cases beside the splits as split ``suite:<name>``; the evaluator runs them like
any held-out split and scores each case by its own checks (weighted by ``weight``): the
verdict's metric ``pass``. The checks are those of a task's metrics (``tuneloop.checks``);
a suite case has no reference, so a comparing check names its ``value``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .checks import Check, needs_reference
from .events import explain


class SuiteCase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[dict] | None = None
    category: str = "default"
    weight: float = Field(default=1.0, gt=0)
    checks: list[Check] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> "SuiteCase":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if needs_reference(self.checks):
            raise ValueError("checks: a suite case has no reference; give each comparing check its value")
        return self

    def chat(self) -> list[dict]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]


def read_suite(path: Path) -> list[SuiteCase]:
    """Validated cases of a suite file; the first bad line raises ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: suite file not found")
    cases = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            cases.append(SuiteCase.model_validate_json(line))
        except ValidationError as e:
            raise ValueError(f"{path}:{lineno}: {explain(e)}") from None
    if not cases:
        raise ValueError(f"{path}: no cases")
    return cases
