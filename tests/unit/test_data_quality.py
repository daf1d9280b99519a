"""The data-quality gate and augmentation of data-pipeline, on crafted data sets: each finding,
what each setting drops or refuses, and that nothing goes without being counted and shown."""

import json
import random

import pytest

from helpers import REPO, protocol_task, tiny_config
from tuneloop.config import QualitySection
from tuneloop.data_pipeline import quality
from tuneloop.data_pipeline.prepare import DataError, prepare
from tuneloop.task import Judge, TaskSection

PROTOCOL = Judge(TaskSection.model_validate(protocol_task()), REPO / "examples")

LONG = ("Please take the two whole numbers that follow in this message and add them together carefully, then "
        "give me the total as your answer in the usual format that we agreed on earlier today for sums")


def item(where, prompt, answer, category="math", reference=None):
    return quality.Item(where, prompt, answer, category, reference, f"<|user|>\n{prompt}\n<|assistant|>\n{answer}",
                        {"category": category}, prompt)


def js(task, answer):
    return json.dumps({"task": task, "answer": answer})


def gate(train, held=(), judge=PROTOCOL, max_length=400, **settings):
    return quality.run_gate(QualitySection(**settings), list(train), list(held), judge, max_length,
                            lambda text: len(text.encode()), "bytes")


def clean(n=12):
    """Rows that pass everything: two categories, distinct prompts, similar lengths."""
    return ([item(f"d:{i}", f"Compute {i} + {i + 1}.", js("math", str(2 * i + 1)), "math", str(2 * i + 1)) for i in range(n)]
            + [item(f"u:{i}", f"Uppercase w{i}x.", js("upper", f"W{i}X"), "upper", f"W{i}X") for i in range(n // 2)])


def test_clean_rows_have_no_findings_and_the_balance_is_counted():
    drop_train, drop_held, report = gate(clean())
    assert report.findings == [] and not drop_train and not drop_held
    assert report.categories == {"math": 12, "upper": 6} and report.balance == 0.5


def test_exact_and_near_duplicates_are_found_and_dropped_or_kept():
    rows = clean() + [
        item("x:1", "COMPUTE 3 + 4 ", js("math", "7")),                       # d:3 once case, spacing and '.' are aside
        item("x:2", LONG + " 3 and 9.", js("math", "12"), reference="12"),
        item("x:3", LONG + " right now 3 and 9.", js("math", "12"), reference="12"),  # two words more: near
        item("x:4", "Compute 3 + 5.", js("math", "8"), reference="8"),        # one number differs: another task
    ]
    drop, _, report = gate(rows, max_length=1000)
    found = {f.where: (f.kind, f.detail) for f in report.findings if "duplicate" in f.kind}
    assert found["x:1"] == ("duplicate", "same as d:3")
    assert found["x:3"] == ("near_duplicate", "nearly the same as x:2")
    assert "x:4" not in found and "x:2" not in found
    assert {rows[i].where for i in drop} == {"x:1", "x:3"} and report.dropped == {"duplicate": 1, "near_duplicate": 1}
    drop, _, report = gate(rows, duplicates="keep")
    assert not drop and not report.dropped
    assert {k: n for k, n in report.counts().items() if "duplicate" in k} == {"duplicate": 1, "near_duplicate": 1}


def test_a_held_out_prompt_nearly_in_train_is_found_beyond_the_exact_rule():
    held = [item("t:1", "compute 3+4", js("math", "7")), item("t:2", "Compute 30 + 40.", js("math", "70"))]
    _, drop_held, report = gate(clean(), held)
    assert [(f.kind, f.where) for f in report.findings] == [("test_overlap", "t:1")]
    assert drop_held == {0} and "train's d:3" in report.findings[0].detail


def test_demonstrations_that_fail_the_format_metric_are_named_with_why():
    rows = clean() + [
        item("v:1", "Add 5 and 6.", "5 + 6 = 11", reference="11"),                  # prose: the legacy answers
        item("v:2", "Add 5 and 7.", js("upper", "12"), reference="12"),             # wrong task name
        item("v:3", "Add 5 and 8.", js("math", "14"), reference="13"),              # a wrong answer keeps the format
    ]
    drop, _, report = gate(rows)
    why = {f.where: f.detail for f in report.findings if f.kind == "format_violation"}
    assert why["v:1"].startswith("protocol: json_schema: not JSON")
    assert why["v:2"].startswith("protocol: exact: 'upper' != 'math'")
    assert set(why) == {"v:1", "v:2"} and not drop  # report: counted, kept
    assert report.violation_rate == pytest.approx(2 / 21)
    drop, _, report = gate(rows, format_violations="drop")
    assert {rows[i].where for i in drop} == set(why) and report.dropped == {"format_violation": 2}
    assert report.categories == {"math": 13, "upper": 6}  # the balance of what trains
    with pytest.raises(quality.QualityError, match=r"2 of 21 train rows fail the format metric 'protocol' .*v:1: "
                                                   r"protocol: json_schema: not JSON"):
        gate(rows, protocol_violations="fail")  # the old key is read as format_violations
    with pytest.raises(quality.QualityError, match=r"9.5% of the train rows fail the format metric 'protocol', more "
                                                   r"than data.quality.max_violation_rate 5%"):
        gate(rows, max_violation_rate=0.05)


def test_another_task_shape_has_its_own_format_and_no_format_means_no_violation_rule():
    arithmetic = Judge(TaskSection.model_validate({"metrics": {"answer_line": {
        "format": True, "checks": [{"type": "regex", "pattern": r"(?m)^Answer: -?\d+$"}]}}}), ".")
    rows = [item(f"a:{i}", f"Tom has {i} apples and gets 2 more. How many?", f"{i} + 2 = {i + 2}\nAnswer: {i + 2}",
                 "default") for i in range(10)]
    rows.append(item("a:x", "Sam has 3 pears and eats 1. How many?", "He has two pears left.", "default"))
    _, _, report = gate(rows, judge=arithmetic)
    assert [(f.kind, f.where) for f in report.findings if f.kind == "format_violation"] == [("format_violation", "a:x")]
    assert "answer_line: regex: no match" in next(f.detail for f in report.findings if f.kind == "format_violation")
    _, _, report = gate(rows, judge=Judge(TaskSection(), "."))  # nothing declares a valid answer: nothing violates
    assert report.counts().get("format_violation", 0) == 0 and report.violation_rate == 0.0


def test_empty_truncated_and_outlier_lengths_are_found():
    rows = clean() + [
        item("l:1", "Add 1 and 2.", "   "),
        item("l:2", "Add 1 and 3.", js("math", "4" * 400)),
        item("l:3", "Add 1 and 4.", js("math", "5" * 200)),
    ]
    drop, _, report = gate(rows, max_length=300)
    found = {f.where: (f.kind, f.detail) for f in report.findings if f.kind != "format_violation"}
    assert found["l:1"] == ("empty", "empty prompt or answer")
    assert found["l:2"][0] == "truncated" and found["l:2"][1].endswith("bytes > train.max_length 300")
    assert found["l:3"][0] == "outlier_length"
    assert not drop
    drop, _, report = gate(rows, max_length=300, lengths="drop")
    assert {rows[i].where for i in drop} == {"l:1", "l:2", "l:3"}


def test_prepare_drops_as_configured_and_writes_every_count_and_the_first_examples(tmp_path):
    rows = [{"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.answer}],
             "category": r.category, "reference": r.reference} for r in clean(40)]
    prose = {"messages": [{"role": "user", "content": "Add 5 and 6."}, {"role": "assistant", "content": "11"}],
             "category": "math", "reference": "11"}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0], prose]))
    cfg = tiny_config(tmp_path).with_overrides({"data": {"sources": [{"path": str(data)}], "max_rows": None,
                                                         "quality": {"format_violations": "drop"}}})
    p = prepare(cfg, tmp_path / "run" / "data", tmp_path / "run")
    doc = json.loads((tmp_path / "run" / p.splits["train"][0]).with_name("quality.json").read_text())
    assert doc["findings"]["duplicate"] == 1 and doc["dropped"] == {"duplicate": 1, "format_violation": 1}
    assert doc["examples"]["format_violation"][0]["where"] == f"{data}:62"
    assert doc["examples"]["duplicate"][0] == {"where": f"{data}:61", "detail": f"same as {data}:1"}
    assert doc["length_unit"] == "bytes" and p.quality.summary()["findings"] == doc["findings"]
    train = [json.loads(x) for x in (tmp_path / "run" / p.splits["train"][0]).read_text().splitlines()]
    assert all(r["completion"] != "11" for r in train)
    held = sum(n for name, (_, n, _) in p.splits.items() if name != "train")
    assert len(train) + held == 60  # 62 read, the duplicate and the prose answer dropped


def test_a_data_set_the_gate_refuses_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"prose {i}"}]}) + "\n"
                            for i in range(30)))
    cfg = tiny_config(tmp_path).with_overrides({"data": {"sources": [{"path": str(data)}]}})
    with pytest.raises(DataError, match=r"100.0% of the train rows fail the format metric 'protocol'.*d.jsonl:\d+: "
                                        r"protocol: json_schema: not JSON"):
        prepare(cfg, tmp_path / "run" / "data", tmp_path / "run")


PHRASINGS = {"math": {"match": [r"Compute (?P<a>\d+) \+ (?P<b>\d+)\."], "templates": ["Sum {a} and {b}.", "Total of {a} and {b}?"]}}


def test_augmentation_adds_rephrased_train_rows_with_the_same_answers_and_never_held_out_prompts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.answer}],
             "category": r.category, "reference": r.reference} for r in clean(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"data": {"sources": [{"path": str(data)}], "max_rows": None, "test_fraction": 0.2}}
    plain = prepare(tiny_config(tmp_path).with_overrides(base), tmp_path / "a" / "data", tmp_path / "a")
    cfg = tiny_config(tmp_path).with_overrides(base, {"data": {"augment": {"phrasings": PHRASINGS, "copies": 2}}})
    more = prepare(cfg, tmp_path / "b" / "data", tmp_path / "b")

    def split(p, root, name):
        return [json.loads(x) for x in (root / p.splits[name][0]).read_text().splitlines()]

    math_train = [r for r in split(plain, tmp_path / "a", "train") if r["category"] == "math"]
    assert more.augmented == 2 * len(math_train) and plain.augmented == 0
    train = split(more, tmp_path / "b", "train")
    new = [r for r in train if "Sum" in r["prompt"] or "Total" in r["prompt"]]
    assert len(new) == more.augmented and len(train) == len(split(plain, tmp_path / "a", "train")) + more.augmented
    for r in new:  # the same answer as the row it rephrases
        a, b = map(int, __import__("re").findall(r"\d+", r["prompt"].split("<|assistant|>")[0])[:2])
        assert json.loads(r["completion"]) == {"task": "math", "answer": str(a + b)}
    assert split(more, tmp_path / "b", "test") == split(plain, tmp_path / "a", "test")  # held-out untouched


def test_a_template_naming_a_field_its_pattern_does_not_capture_is_refused(tmp_path):
    bad = {"math": {"match": [r"Compute (?P<a>\d+) \+ (?P<b>\d+)\."], "templates": ["Sum {a} and {c}."]}}
    with pytest.raises(ValueError, match=r"template 'Sum \{a\} and \{c\}.' uses \['c'\], which match .* does not capture"):
        tiny_config(tmp_path).with_overrides({"data": {"augment": {"phrasings": bad}}})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tiny_config(tmp_path).with_overrides({"data": {"augment": {"phrasings": {"math": {"match": ["(x"], "templates": ["y"]}}}}})


def test_dpo_negatives_are_other_answers_the_task_fails_for_this_row():
    from tuneloop.data_pipeline.augment import negative_for
    from tuneloop.data_pipeline.prepare import Row, to_example

    task = TaskSection.model_validate(protocol_task())

    def row(a, b):
        return Row.model_validate({"messages": [{"role": "user", "content": f"Compute {a} + {b}."},
                                                {"role": "assistant", "content": js("math", str(a + b))}],
                                   "category": "math", "reference": str(a + b)}).read_by(task)

    rows = [row(1, 1), row(2, 2), row(3, 3), row(1, 3)]  # 1+3 = 2+2: its answer is no negative for 2+2
    negatives = negative_for(rows, Judge(task, "."), random.Random(0))
    assert len(negatives) == 4
    for r in rows:
        assert negatives[id(r)] != r.answer and json.loads(negatives[id(r)])["answer"] != r.reference
        assert to_example(r, "tuneloop", negatives[id(r)])["rejected"] == negatives[id(r)]
    assert "rejected" not in to_example(rows[0], "tuneloop")
    # An answer that breaks the format fails what requires it too: the clearest contrast is taken.
    prose = Row.model_validate({"messages": [{"role": "user", "content": "Compute 4 + 4."},
                                             {"role": "assistant", "content": "4 + 4 = 8"}],
                                "category": "math", "reference": "8"}).read_by(task)
    negatives = negative_for([*rows, prose], Judge(task, "."), random.Random(0))
    assert [negatives[id(r)] for r in rows] == ["4 + 4 = 8"] * 4
    own = rows[0].model_copy(update={"rejected": "two"})
    assert to_example(own, "tuneloop")["rejected"] == "two" and id(own) not in negative_for([own], Judge(task, "."),
                                                                                             random.Random(0))


def test_rephrase_never_returns_the_prompt_it_was_given():
    from tuneloop.config import PhrasingRule
    from tuneloop.data_pipeline.augment import rephrase

    rule = PhrasingRule(match=[r"Sum (?P<a>\d+) and (?P<b>\d+)\."], templates=["Sum {a} and {b}.", "Add {a} to {b}."])
    rng = random.Random(0)
    assert {rephrase("Sum 1 and 2.", rule, rng) for _ in range(20)} == {"Add 1 to 2."}
    assert rephrase("Something else.", rule, rng) is None
