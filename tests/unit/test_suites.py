"""Checks: every type passes and fails for the right reason, against a value, a column or the
reference; bad suite files are named."""

import pytest

from tuneloop.checks import Subject, parse_checks, run_checks
from tuneloop.evaluator.suite import Case, score
from tuneloop.suites import read_suite

ANSWER = '{"task": "math", "answer": "26"}'
WORK = "18 + 8 = 26\nAnswer: 26"


@pytest.mark.parametrize("check, bad, why, good", [
    ({"type": "json"}, "answer 26", "not JSON", ANSWER),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}},
     '{"answer": 26}', "schema: 26 is not of type 'string'", '{"answer": "26"}'),
    ({"type": "keys", "keys": ["task", "answer", "why"]}, ANSWER, "missing keys: why", '{"task": 1, "answer": 2, "why": 3}'),
    ({"type": "regex", "pattern": r"^\{.*\}$"}, "answer: 26", "no match", ANSWER),
    ({"type": "regex", "pattern": r"Answer: (-?\d+)", "capture": 1}, "Answer: 25", "captured '25', expected '26'", WORK),
    ({"type": "regex", "pattern": r"Answer: (?P<n>\S+)", "capture": "n", "tolerance": 0.5}, "Answer: 27",
     "captured 27, expected 26", "Answer: 26.4"),
    ({"type": "exact", "value": "27", "field": "answer"}, ANSWER, "'26' != '27'", '{"answer": "27"}'),
    ({"type": "exact"}, "26.", "'26.' != '26'", " 26 "),
    ({"type": "exact", "normalize": True}, "twenty-six", "!= '26'", "26!"),
    ({"type": "exact", "field": "task", "column": "category"}, '{"task": "upper"}', "'upper' != 'math'", ANSWER),
    ({"type": "contains"}, "it is 25", "'26' not in the answer", "so it is 26 apples"),
    ({"type": "contains", "value": "APPLES", "normalize": True}, "26 pears", "'APPLES' not in", "26 apples"),
    ({"type": "numeric", "value": 25.5, "tolerance": 0.1, "field": "answer"}, ANSWER, "26 != 25.5", '{"answer": "25.55"}'),
    ({"type": "numeric", "field": "result"}, ANSWER, "no field 'result'", '{"result": 26.0}'),
    ({"type": "numeric", "pattern": r"Answer: (\S+)"}, "Answer: many", "'many' is not a number", "Answer: 26.0000001"),
    ({"type": "length", "min_chars": 3, "max_chars": 20}, "26", "2 characters < 3", "Answer: 26"),
    ({"type": "length", "max_tokens": 8}, ANSWER, "9 tokens > 8", ANSWER),
    ({"type": "max_tokens", "value": 8}, ANSWER, "9 tokens > 8", ANSWER),
])
def test_each_check_fails_with_its_reason_and_passes_a_good_answer(check, bad, why, good):
    checks = parse_checks([check])
    fields = {"category": "math"}
    [reason] = run_checks(checks, Subject(bad, 9, "26", fields))
    assert reason.startswith(check["type"] + ":") and why in reason, reason
    assert run_checks(checks, Subject(good, 8, "26", fields)) == []


def test_a_comparison_without_what_to_compare_with_says_so():
    assert run_checks(parse_checks([{"type": "exact"}]), Subject("26")) == ["exact: the case has no reference to compare with"]
    assert "no column 'unit'" in run_checks(parse_checks([{"type": "exact", "column": "unit"}]), Subject("26", 1, "26"))[0]


@pytest.mark.parametrize("check, why", [
    ({"type": "regex", "pattern": "("}, "not a valid regular expression"),
    ({"type": "regex", "pattern": "a(b)", "capture": 2}, "capture 2, but the pattern has 1 group"),
    ({"type": "regex", "pattern": "a", "value": "x"}, "set capture too"),
    ({"type": "exact", "value": "1", "column": "c"}, "at most one of value and column"),
    ({"type": "length"}, "at least one of"),
    ({"type": "json_schema", "schema": {"type": "nope"}}, "not a valid JSON Schema"),
])
def test_a_bad_check_is_refused_with_why(check, why):
    with pytest.raises(ValueError, match=why):
        parse_checks([check])


def test_suite_cases_count_with_their_weight():
    checks = parse_checks([{"type": "numeric", "field": "answer", "value": 26}])
    cases = [Case("a", "math", None, weight=3.0, checks=checks), Case("b", "math", None, weight=1.0, checks=checks)]
    r = score(cases, [ANSWER, '{"answer": "1"}'], [9, 9])
    assert r.scores["pass"] == 0.75 and r.by_category["math"]["cases"] == 2
    assert "1 != 26" in r.failures[0].reason


def test_a_bad_suite_line_is_named(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "Compute 1 + 1.", "checks": [{"type": "json"}]}\n'
                    '{"prompt": "x", "checks": [{"type": "regex", "pattern": "("}]}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: checks.0.regex.*not a valid regular expression"):
        read_suite(path)
    path.write_text('{"prompt": "x", "messages": [], "checks": [{"type": "json"}]}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: .*exactly one of prompt or messages"):
        read_suite(path)
    path.write_text('{"prompt": "x", "checks": [{"type": "telepathy"}]}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: checks.0: .*'telepathy'"):
        read_suite(path)
    path.write_text('{"prompt": "x", "checks": [{"type": "exact", "field": "answer"}]}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: .*no reference; give each comparing check its value"):
        read_suite(path)
