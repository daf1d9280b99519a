"""Property-based bad input (hypothesis) for what a user hands in: run configs (task
declarations included), dataset rows in every format the data-pipeline reads, sweep and PBT
files. Each is taken or refused with an error that names the file and the field (a row: its
file:line); nothing else escapes (no traceback, no half-read config), and nothing is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import EXAMPLE_DATA, protocol_task
from tuneloop.config import ConfigError, load_config
from tuneloop.data_pipeline.prepare import DataError, read_source
from tuneloop.config import Source
from tuneloop.tools.sweep.spec import load_sweep

pytestmark = pytest.mark.reliability

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=5,
)
SETTINGS = settings(max_examples=150, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def paths(tree, prefix=()):
    """Every key path of a nested mapping (where a fuzzed value can go)."""
    for k, v in tree.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from paths(v, (*prefix, k))


def put(tree: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(tree)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


BASE = {
    "run": {"name": "fuzz", "seed": 1},
    "task": protocol_task(),
    "data": {"sources": [{"path": str(EXAMPLE_DATA), "format": "messages"}], "max_rows": 50},
    "model": {"tiny": {"hidden_size": 32, "num_attention_heads": 2}},
    "train": {"max_steps": 10, "lora": {"r": 4}, "trl": {}},
    "eval": {"max_cases": 8},
    "feedback": {"target": 0.9, "patience": 2},
}
CONFIG_PATHS = sorted(set(paths(BASE)) | {("train", "trl", "neftune_noise_alpha"), ("run", "report_to"),
                                          ("data", "turns"), ("task", "metrics", "fuzzed")})


def written(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.timeout(600)
def test_fuzzed_configs_load_or_are_refused_naming_the_file_and_a_field(tmp_path):
    seen = {"taken": 0, "refused": 0}

    @SETTINGS
    @given(st.sampled_from(CONFIG_PATHS), VALUES)
    def check(path, value):
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump(put(BASE, path, value)))
        before = written(tmp_path)
        try:
            load_config(f, functions=True)
            seen["taken"] += 1
        except ConfigError as e:
            seen["refused"] += 1
            text = str(e)
            assert str(f) in text, text
            assert any(part in text for part in path if isinstance(part, str)) or ":" in text.split(str(f), 1)[1], text
        assert written(tmp_path) == before  # loading writes nothing

    check()
    assert seen["refused"] > 20 and seen["taken"] > 5, seen  # both ways were exercised


FORMATS = {
    "messages": {"messages": [{"role": "user", "content": "Compute 1 + 1."}, {"role": "assistant", "content": "2"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Compute 1 + 1."}, {"from": "gpt", "value": "2"}]},
    "alpaca": {"instruction": "Compute 1 + 1.", "input": "", "output": "2"},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fuzzed_rows_of_every_format_are_read_or_refused_naming_file_and_line(tmp_path, fmt):
    good = FORMATS[fmt]
    keys = sorted(set(paths(good)))

    @SETTINGS
    @given(st.lists(st.one_of(st.tuples(st.sampled_from(keys), VALUES), st.text(max_size=20)), min_size=1, max_size=4))
    def check(mutations):
        lines = [json.dumps(good)]
        for m in mutations:  # each bad line: a field set to anything, or not JSON at all (one line: no \n, \r)
            bad = json.dumps(put(good, *m), default=str) if isinstance(m, tuple) else m.replace("\n", " ").replace("\r", " ")
            lines.append(bad)
        f = tmp_path / f"{fmt}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        source = Source(path=str(f), format=fmt)
        try:
            read_source(f, fmt, 1.0, "fail", source=source)
        except DataError as e:
            line = str(e).split(f"{f}:", 1)
            assert len(line) == 2 and line[1].split(":", 1)[0].isdigit(), str(e)  # file:line
        skipped = read_source(f, fmt, 1.0, "skip", source=source)  # the good first row always survives
        assert skipped.rows and len(skipped.rows) + len(skipped.rejected) <= len([x for x in lines if x.strip()])

    check()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sampler", ["grid", "pbt"])
def test_fuzzed_sweep_files_load_or_are_refused_naming_the_file(tmp_path, sampler):
    base = dict(BASE, data={"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 50})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "fz", "config": "base.yaml", "sampler": sampler, "concurrency": 2,
             "params": {"train.learning_rate": {"values": [0.001, 0.003]}},
             **({"pbt": {"population": 2, "interval": 1}} if sampler == "pbt" else {"pruner": {"kind": "median"}})}
    keys = sorted(set(paths(sweep)))

    @SETTINGS
    @given(st.sampled_from(keys), VALUES)
    def check(path, value):
        f = tmp_path / "sweep.yaml"
        f.write_text(yaml.safe_dump(put(sweep, path, value)))
        before = written(tmp_path)
        try:
            load_sweep(f)
        except ConfigError as e:
            assert str(f) in str(e) or "base.yaml" in str(e), str(e)
        assert written(tmp_path) == before

    check()
