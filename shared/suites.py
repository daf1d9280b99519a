"""Test suites declared in files: cases with a prompt and the checks its answer must pass.

One JSON object per line::

    {"prompt": "Compute 2 + 2.", "category": "math", "weight": 2,
     "checks": [{"type": "json"}, {"type": "keys", "keys": ["task", "answer"]},
                {"type": "numeric", "field": "answer", "value": 4}, {"type": "max_tokens", "value": 20}]}

``prompt`` is the user's message (or ``messages``, a chat without the answer). data-pipeline
validates the file (errors name file:line: field), renders each prompt with the chat template
and writes the cases beside the splits as split ``suite:<name>``; the evaluator runs them like
any held-out split and scores each case by its own checks (weighted by ``weight``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .events import explain


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IsJson(_Check):
    type: Literal["json"]


class JsonSchema(_Check):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")

    @model_validator(mode="after")
    def _valid_schema(self) -> "JsonSchema":
        try:
            jsonschema.Draft202012Validator.check_schema(self.schema_)
        except jsonschema.SchemaError as e:
            raise ValueError(f"not a valid JSON Schema: {e.message}") from None
        return self


class Keys(_Check):
    type: Literal["keys"]
    keys: list[str] = Field(min_length=1)


class Regex(_Check):
    type: Literal["regex"]
    pattern: str

    @model_validator(mode="after")
    def _compiles(self) -> "Regex":
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return self


class Exact(_Check):
    type: Literal["exact"]
    value: str
    field: str | None = Field(default=None, description="Compare this key of the JSON answer instead of the whole text.")


class Numeric(_Check):
    type: Literal["numeric"]
    value: float
    tolerance: float = Field(default=1e-6, ge=0)
    field: str | None = None


class MaxTokens(_Check):
    type: Literal["max_tokens"]
    value: int = Field(ge=1)


Check = Annotated[Union[IsJson, JsonSchema, Keys, Regex, Exact, Numeric, MaxTokens], Field(discriminator="type")]


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
        return self

    def chat(self) -> list[dict]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]


_CHECKS = TypeAdapter(list[Check])


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


def parse_checks(raw: list[dict]) -> list:
    return _CHECKS.validate_python(raw)


def _field(obj: Any, name: str | None) -> Any:
    if name is None:
        return obj
    if not isinstance(obj, dict) or name not in obj:
        raise KeyError(name)
    return obj[name]


def run_check(check, output: str, new_tokens: int) -> str | None:
    """None when ``output`` passes ``check``, else why not."""
    text = output.strip()
    if isinstance(check, MaxTokens):
        return None if new_tokens <= check.value else f"{new_tokens} tokens > {check.value}"
    if isinstance(check, Regex):
        return None if re.search(check.pattern, text) else f"no match for /{check.pattern}/"
    needs_json = isinstance(check, (IsJson, JsonSchema, Keys)) or getattr(check, "field", None) is not None
    obj: Any = text
    if needs_json:
        try:
            obj = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
    if isinstance(check, IsJson):
        return None
    if isinstance(check, JsonSchema):
        err = next(iter(jsonschema.Draft202012Validator(check.schema_).iter_errors(obj)), None)
        return None if err is None else f"schema: {err.message}"
    if isinstance(check, Keys):
        missing = [k for k in check.keys if not isinstance(obj, dict) or k not in obj]
        return None if not missing else f"missing keys: {', '.join(missing)}"
    try:
        got = _field(obj, check.field)
    except KeyError as e:
        return f"no field {e.args[0]!r}"
    if isinstance(check, Exact):
        return None if str(got).strip() == check.value.strip() else f"{got!r} != {check.value!r}"
    try:
        number = float(got)
    except (TypeError, ValueError):
        return f"{got!r} is not a number"
    return None if abs(number - check.value) <= check.tolerance else f"{number:g} != {check.value:g}"


def run_checks(checks: list, output: str, new_tokens: int) -> list[str]:
    """The reasons ``output`` fails (empty: it passes every check)."""
    return [f"{c.type}: {why}" for c in checks if (why := run_check(c, output, new_tokens)) is not None]
