import json

import pytest

from helpers import tiny_config
from tuneloop.data_pipeline.prepare import DataError, prepare, read_source


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "Compute 1 + 1."}, {"role": "assistant", "content": '{"task": "math", "answer": "2"}'}],
        "category": "math", "reference": "2"}


def test_bad_row_fails_naming_file_line_and_field(tmp_path):
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}
    p = write_rows(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as e:
        read_source(p, "d", 1.0, "fail")
    assert f"{p}:3:" in str(e.value) and "messages.1.content" in str(e.value)


def test_bad_rows_are_skipped_and_counted_when_configured(tmp_path):
    rows = [GOOD, "{not json", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, GOOD]
    src = read_source(write_rows(tmp_path / "d.jsonl", rows), "d", 1.0, "skip")
    assert len(src.rows) == 2 and len(src.rejected) == 2
    assert ":2:" in src.rejected[0] and "last message must be the assistant" in src.rejected[1]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        read_source(tmp_path / "nope.jsonl", "d", 1.0, "fail")


def test_a_hub_source_that_cannot_be_loaded_is_named(tmp_path, monkeypatch):
    from tuneloop.config import Source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub; offline fails fast the same way
    cfg = tiny_config(tmp_path)
    cfg.data.sources = [Source(hub="tuneloop/no-such-dataset", split="train")]
    with pytest.raises(DataError, match="hub data set 'tuneloop/no-such-dataset' \\(split 'train'\\) could not be loaded"):
        prepare(cfg, tmp_path / "out", tmp_path)
    with pytest.raises(ValueError, match="exactly one of path or hub"):
        Source(path="a.jsonl", hub="org/name")


def test_splits_are_deterministic_and_held_out_prompts_never_in_train(tmp_path):
    cfg = tiny_config(tmp_path)
    a = prepare(cfg, tmp_path / "a" / "data", tmp_path / "a")
    b = prepare(cfg, tmp_path / "b" / "data", tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    rows = {s: [json.loads(l) for l in open(tmp_path / "a" / p)] for s, (p, n, _) in a.splits.items()}
    train_prompts = {r["prompt"] for r in rows["train"]}
    assert rows["test"] and not any(r["prompt"] in train_prompts for r in rows["test"] + rows["val"])
    assert rows["train"][0]["prompt"].startswith("<|user|>\n") and rows["train"][0]["prompt"].endswith("<|assistant|>\n")
    assert sum(n for _, n, _ in a.splits.values()) <= 600
    assert set(a.splits["train"][2]) == {"math", "reverse", "upper", "length"}


def test_mixture_follows_weights(tmp_path):
    math = write_rows(tmp_path / "m.jsonl", [GOOD] * 100)
    other = dict(GOOD, category="upper")
    up = write_rows(tmp_path / "u.jsonl", [other] * 100)
    cfg = tiny_config(tmp_path).model_copy(deep=True)
    cfg.data.sources = [type(cfg.data.sources[0])(path=str(math), weight=3), type(cfg.data.sources[0])(path=str(up), weight=1)]
    cfg.data.val_fraction = cfg.data.test_fraction = 0.0
    cfg.data.quality.duplicates = "keep"  # a hundred copies of one row, on purpose
    out = prepare(cfg, tmp_path / "r" / "data", tmp_path / "r")
    assert out.splits["train"][2] == {"math": 150, "upper": 50}
    assert out.mixture == {"m": 0.75, "u": 0.25}


def test_weak_categories_are_weighed_up_in_train_only(tmp_path):
    import random
    from collections import Counter

    from tuneloop.data_pipeline.prepare import adapt_weights, reweight

    cats = ["length", "math", "upper"]
    assert adapt_weights({}, ["math"], cats, 2.0, 8.0) == {"math": 2.0}
    assert adapt_weights({"math": 4.0}, ["math", "upper"], cats, 3.0, 8.0) == {"math": 8.0, "upper": 3.0}
    # Only shares matter: every category weak shifts nothing; weights stay relative to the least.
    assert adapt_weights({"math": 2.0}, cats, cats, 2.0, 8.0) == {"math": 2.0}
    assert adapt_weights({"math": 2.0}, ["length", "upper"], cats, 2.0, 8.0) == {}
    assert adapt_weights({"math": 4.0}, ["math"], cats, 2.0, 4.0) == {"math": 4.0}  # capped
    cfg = tiny_config(tmp_path)
    plain = prepare(cfg, tmp_path / "a", tmp_path)
    boosted = prepare(cfg, tmp_path / "b", tmp_path, category_weights={"math": 4.0})
    share = lambda p, split: p.splits[split][2].get("math", 0) / p.splits[split][1]  # noqa: E731
    s = share(plain, "train")  # math at 4 times the weight of each other category: 4s / (4s + 1 - s) of train
    assert share(boosted, "train") == pytest.approx(4 * s / (3 * s + 1), abs=0.04)
    assert boosted.splits["test"][2] == plain.splits["test"][2]  # held-out data is never re-weighted
    rows = [type("R", (), {"category": c})() for c in "aab"]
    assert Counter(r.category for r in reweight(rows, {"b": 100.0}, random.Random(0)))["b"] > 1


def test_parquet_and_saved_datasets_read_like_jsonl_and_name_the_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    from helpers import EXAMPLE_DATA

    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()[:50]]
    jsonl = read_source(EXAMPLE_DATA, "j", 1.0, "fail", max_rows=50)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    for path in (tmp_path / "d.parquet", tmp_path / "hf"):
        assert [r.model_dump() for r in read_source(path, "x", 1.0, "fail").rows] == [r.model_dump() for r in jsonl.rows]

    rows[7]["messages"][1]["content"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 7: messages.1.content"):
        read_source(tmp_path / "bad.parquet", "x", 1.0, "fail")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train\)"):
        read_source(tmp_path / "hf", "x", 1.0, "fail", split="test")


def test_the_task_says_where_categories_and_references_come_from(tmp_path):
    """A task of another shape: categories from the column it names, the reference found in the
    demonstration's answer; without a category column the data set is one category."""
    from tuneloop.data_pipeline.prepare import adapt_weights

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"Tom has {i} apples and buys {i % 7 + 1} more. How many?"},
                     {"role": "assistant", "content": f"{i} + {i % 7 + 1} = {i + i % 7 + 1}\nAnswer: {i + i % 7 + 1}"}],
        "topic": "add" if i % 2 else "plus", "source_id": i}) + "\n" for i in range(60)))
    task = {"category_column": "topic", "answer": {"regex": r"Answer:\s*(-?\d+)"},
            "metrics": {"answer_line": {"format": True, "checks": [{"type": "regex", "pattern": r"(?m)^Answer: -?\d+$"}]}}}
    base = {"data": {"sources": [{"path": str(data)}], "max_rows": None}}
    cfg = tiny_config(tmp_path).with_overrides(base, {f"task.{k}": v for k, v in task.items()},
                                               {"task.reference_column": None, "feedback.metric": None})
    p = prepare(cfg, tmp_path / "a" / "data", tmp_path / "a")
    rows = [json.loads(x) for x in (tmp_path / "a" / p.splits["train"][0]).read_text().splitlines()]
    assert {r["category"] for r in rows} == {"add", "plus"}
    assert all(r["reference"] == r["completion"].rsplit(" ", 1)[1] for r in rows)  # the number on the Answer line
    assert all(json.loads(r["columns"])["source_id"] >= 0 for r in rows)  # the row's own columns travel with it
    assert p.quality.counts().get("format_violation", 0) == 0
    one = tiny_config(tmp_path).with_overrides(base, {"task.category_column": None, "task.metrics": {},
                                                      "feedback.metric": None})
    p = prepare(one, tmp_path / "b" / "data", tmp_path / "b")
    assert p.splits["train"][2] == {"default": p.splits["train"][1]}
    assert adapt_weights({}, ["default"], ["default"], 2.0, 8.0) == {}  # one weak category of one: nothing to shift
