"""Test suites: every check passes and fails for the right reason; bad suite files are named."""

import pytest

from tuneloop.evaluator.suite import Case, score
from tuneloop.suites import parse_checks, read_suite, run_checks

ANSWER = '{"task": "math", "answer": "26"}'


@pytest.mark.parametrize("check, output, tokens, why", [
    ({"type": "json"}, "answer 26", 3, "not JSON"),
    ({"type": "json_schema", "schema": {"type": "object", "required": ["answer"],
                                        "properties": {"answer": {"type": "string"}}}}, '{"answer": 26}', 5, "schema: 26 is not of type 'string'"),
    ({"type": "keys", "keys": ["task", "answer", "why"]}, ANSWER, 9, "missing keys: why"),
    ({"type": "regex", "pattern": r"^\{.*\}$"}, "answer: 26", 3, "no match"),
    ({"type": "exact", "value": "27", "field": "answer"}, ANSWER, 9, "'26' != '27'"),
    ({"type": "numeric", "value": 25.5, "tolerance": 0.1, "field": "answer"}, ANSWER, 9, "26 != 25.5"),
    ({"type": "numeric", "value": 26, "field": "result"}, ANSWER, 9, "no field 'result'"),
    ({"type": "max_tokens", "value": 8}, ANSWER, 9, "9 tokens > 8"),
])
def test_each_check_fails_with_its_reason_and_passes_a_good_answer(check, output, tokens, why):
    [reason] = run_checks(parse_checks([check]), output, tokens)
    assert reason.startswith(check["type"] + ":") and why in reason
    good = {"json": ANSWER, "json_schema": '{"answer": "26"}', "keys": '{"task": 1, "answer": 2, "why": 3}',
            "regex": ANSWER, "exact": '{"answer": "27"}', "numeric": '{"answer": "25.55", "result": 26}',
            "max_tokens": ANSWER}[check["type"]]
    assert run_checks(parse_checks([check]), good, 8) == []


def test_suite_cases_count_with_their_weight(tmp_path):
    checks = parse_checks([{"type": "numeric", "field": "answer", "value": 26}])
    cases = [Case("a", "math", None, weight=3.0, checks=checks), Case("b", "math", None, weight=1.0, checks=checks)]
    r = score(cases, [ANSWER, '{"answer": "1"}'], [9, 9])
    assert r.scores["protocol"] == 0.75 and r.by_category["math"]["cases"] == 2
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
