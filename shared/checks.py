"""Declarative checks of an answer: the building blocks of a task's metrics and of test suites. Pure.

A check passes or fails one completion and says why it fails. What it compares with is, in
order: its own ``value``, the case's ``column`` (a field of the data row), or the case's
reference (the task says where the reference comes from: ``tuneloop.task``). Where a check
looks in the answer: the whole text, a JSON ``field`` of it, or a regex's ``capture``.

    {"type": "regex", "pattern": "Answer: (-?\\d+)", "capture": 1}   # the number equals the reference
    {"type": "numeric", "field": "answer", "tolerance": 0.01}        # a JSON field, within 0.01
    {"type": "json_schema", "schema": {...}}                          # the answer's shape
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


@dataclass
class Subject:
    """What a check judges: the completion, its token count, and what it may compare with."""

    output: str
    new_tokens: int = 0
    reference: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # the case's other columns (category included)


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Compares(_Check):
    """A check that compares a part of the answer with an expected value."""

    value: str | float | int | None = Field(default=None, description="Compare with this (default: the reference).")
    column: str | None = Field(default=None, description="Compare with this column of the case instead.")
    field: str | None = Field(default=None, description="Compare this key of the JSON answer instead of the whole text.")

    @model_validator(mode="after")
    def _one_expected(self):
        if self.value is not None and self.column is not None:
            raise ValueError("give at most one of value and column (neither: the case's reference)")
        return self

    def expected(self, s: Subject) -> tuple[Any, str | None]:
        return expected(self.value, self.column, s)

    def part(self, s: Subject) -> tuple[Any, str | None]:
        """(the part of the answer compared, why there is none)."""
        if self.field is None:
            return s.output.strip(), None
        obj, why = _json(s.output)
        if why:
            return None, why
        if not isinstance(obj, dict) or self.field not in obj:
            return None, f"no field {self.field!r}"
        return obj[self.field], None


class IsJson(_Check):
    type: Literal["json"]


class JsonSchema(_Check):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
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


class Exact(_Compares):
    type: Literal["exact"]
    normalize: bool = Field(default=False, description="Ignore case, spacing and punctuation.")


class Contains(_Compares):
    type: Literal["contains"]
    normalize: bool = False


class Regex(_Check):
    type: Literal["regex"]
    pattern: str
    capture: int | str | None = Field(default=None, description=(
        "Compare this group of the first match with the expected value (the reference, `value` or `column`); "
        "without it the pattern need only match."))
    value: str | None = None
    column: str | None = None
    tolerance: float | None = Field(default=None, ge=0, description="Compare the capture as a number, within this.")

    @model_validator(mode="after")
    def _compiles(self) -> "Regex":
        try:
            compiled = re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        if isinstance(self.capture, int) and self.capture > compiled.groups:
            raise ValueError(f"capture {self.capture}, but the pattern has {compiled.groups} group(s)")
        if isinstance(self.capture, str) and self.capture not in compiled.groupindex:
            raise ValueError(f"capture {self.capture!r} is not a named group of the pattern")
        if self.capture is None and (self.value is not None or self.column or self.tolerance is not None):
            raise ValueError("value, column and tolerance compare a capture: set capture too")
        return self


class Numeric(_Compares):
    type: Literal["numeric"]
    tolerance: float = Field(default=1e-6, ge=0)
    pattern: str | None = Field(default=None, description="Read the number from this regex's first group instead.")


class Length(_Check):
    type: Literal["length"]
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some_bound(self) -> "Length":
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)):
            raise ValueError("give at least one of min_chars, max_chars, min_tokens, max_tokens")
        return self


class MaxTokens(_Check):
    type: Literal["max_tokens"]
    value: int = Field(ge=1)


Check = Annotated[Union[IsJson, JsonSchema, Keys, Exact, Contains, Regex, Numeric, Length, MaxTokens],
                  Field(discriminator="type")]
CHECK_TYPES = ("json", "json_schema", "keys", "exact", "contains", "regex", "numeric", "length", "max_tokens")
_CHECKS = TypeAdapter(list[Check])


def parse_checks(raw: list[dict]) -> list:
    return _CHECKS.validate_python(raw)


def expected(value: Any, column: str | None, s: Subject) -> tuple[Any, str | None]:
    """(what a check compares with: ``value``, else the case's ``column``, else its reference; why it is missing)."""
    if value is not None:
        return value, None
    if column is not None:
        if s.fields.get(column) is None:
            return None, f"the case has no column {column!r}"
        return s.fields[column], None
    if s.reference is None:
        return None, "the case has no reference to compare with"
    return s.reference, None


def normalise(text: str) -> str:
    """Case, spacing and punctuation aside."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


def _json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text.strip()), None
    except ValueError as e:
        return None, f"not JSON: {e}"


def _number(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        return float(str(x).strip().replace(",", ""))
    except (TypeError, ValueError):
        return None


def _same(got: Any, want: Any, normalize: bool = False) -> bool:
    a, b = str(got).strip(), str(want).strip()
    return normalise(a) == normalise(b) if normalize else a == b


def run_check(check, s: Subject) -> str | None:
    """None when ``s`` passes ``check``, else why not."""
    text = s.output.strip()
    if isinstance(check, MaxTokens):
        return None if s.new_tokens <= check.value else f"{s.new_tokens} tokens > {check.value}"
    if isinstance(check, Length):
        n = len(text)
        for bound, got, unit in ((check.min_chars, n, "characters"), (check.min_tokens, s.new_tokens, "tokens")):
            if bound is not None and got < bound:
                return f"{got} {unit} < {bound}"
        for bound, got, unit in ((check.max_chars, n, "characters"), (check.max_tokens, s.new_tokens, "tokens")):
            if bound is not None and got > bound:
                return f"{got} {unit} > {bound}"
        return None
    if isinstance(check, Regex):
        m = re.search(check.pattern, text)
        if not m:
            return f"no match for /{check.pattern}/"
        if check.capture is None:
            return None
        got = m.group(check.capture)
        want, why = expected(check.value, check.column, s)
        if why:
            return why
        if check.tolerance is not None:
            a, b = _number(got), _number(want)
            if a is None or b is None:
                return f"{got!r} or {want!r} is not a number"
            return None if abs(a - b) <= check.tolerance else f"captured {a:g}, expected {b:g}"
        return None if _same(got, want) else f"captured {got!r}, expected {str(want)!r}"
    if isinstance(check, (IsJson, JsonSchema, Keys)):
        obj, why = _json(text)
        if why:
            return why
        if isinstance(check, JsonSchema):
            err = next(iter(jsonschema.Draft202012Validator(check.schema_).iter_errors(obj)), None)
            return None if err is None else f"schema: {err.message}"
        if isinstance(check, Keys):
            missing = [k for k in check.keys if not isinstance(obj, dict) or k not in obj]
            return None if not missing else f"missing keys: {', '.join(missing)}"
        return None
    want, why = check.expected(s)
    if why:
        return why
    if isinstance(check, Numeric) and check.pattern is not None:
        m = re.search(check.pattern, text)
        if not m:
            return f"no match for /{check.pattern}/"
        got = m.group(1) if m.groups() else m.group(0)
    else:
        got, why = check.part(s)
        if why:
            return why
    if isinstance(check, Exact):
        return None if _same(got, want, check.normalize) else f"{_show(got)} != {_show(want)}"
    if isinstance(check, Contains):
        a, b = (normalise(str(got)), normalise(str(want))) if check.normalize else (str(got), str(want))
        return None if b in a else f"{_show(want)} not in the answer"
    a, b = _number(got), _number(want)
    if a is None:
        return f"{_show(got)} is not a number"
    if b is None:
        return f"expected {_show(want)} is not a number"
    return None if abs(a - b) <= check.tolerance else f"{a:g} != {b:g}"


def run_checks(checks: list, s: Subject) -> list[str]:
    """The reasons ``s`` fails (empty: it passes every check)."""
    return [f"{c.type}: {why}" for c in checks if (why := run_check(c, s)) is not None]


def needs_reference(checks: list) -> bool:
    """Whether any of ``checks`` compares with the case's reference."""
    for c in checks:
        if isinstance(c, _Compares) and c.value is None and c.column is None:
            return True
        if isinstance(c, Regex) and c.capture is not None and c.value is None and not c.column:
            return True
    return False


def _show(x: Any) -> str:
    text = x if isinstance(x, str) else json.dumps(x)
    return repr(text[:80])
