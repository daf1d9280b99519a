"""proto/ is the language-neutral contract; it must match the pydantic models."""

import json
from pathlib import Path

import jsonschema
import yaml

from tuneloop.tools import proto
from tuneloop.events import EVENT_TYPES, Feedback

PROTO = Path(__file__).resolve().parents[2] / "proto"


def test_proto_folder_is_up_to_date():
    stale = proto.diff(PROTO)
    assert not stale, f"proto/ is out of date, run `make proto`: {stale}"


def test_a_generated_schema_accepts_a_real_event_and_rejects_a_broken_one():
    schema = json.loads((PROTO / "schemas" / "feedback.json").read_text())
    event = json.loads(Feedback(run_id="r", step=5, action="stop", reason="target", score=0.97).model_dump_json())
    jsonschema.validate(event, schema)
    event["action"] = "explode"
    try:
        jsonschema.validate(event, schema)
    except jsonschema.ValidationError as e:
        assert "explode" in str(e.message)
    else:
        raise AssertionError("schema accepted an unknown action")


def test_asyncapi_lists_every_event_subject():
    doc = yaml.safe_load((PROTO / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {f"tuneloop.{{run_id}}.{cls.KIND}" for cls in EVENT_TYPES}


def test_diff_reports_a_stale_file(tmp_path):
    proto.write(tmp_path)
    assert proto.diff(tmp_path) == []
    (tmp_path / "schemas" / "control.json").write_text("{}")
    assert proto.diff(tmp_path) == ["schemas/control.json"]


def test_summary_schemas_accept_a_real_summary_and_reject_a_broken_one(tmp_path):
    from helpers import tiny_config
    from tuneloop.events import EvalVerdict, ExportDone, TrainingFinished
    from tuneloop.tools.progress import Progress
    from tuneloop.tools.summary import SUMMARY_FILE, run_summary, write

    p = Progress("r")
    p.update(TrainingFinished(run_id="r", step=40, reason="completed", detail="max_steps", train_seconds=3.0))
    p.update(ExportDone(run_id="r", step=40, score=1.0, adapter_path="export/adapter"))
    p.update(EvalVerdict(run_id="r", request_id="q", step=40, checkpoint="c", split="test", purpose="final", cases=3,
                         scores={"protocol": 1.0, "correctness": 0.5}))
    p.update(EvalVerdict(run_id="r", request_id="q", step=40, checkpoint="c", split="suite:fmt", purpose="final", cases=2,
                         scores={"pass": 0.5}))
    write(run_summary(p, tmp_path, tiny_config(tmp_path)), tmp_path)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["suites"]["fmt"]["pass"] == 0.5 and summary["test"]["protocol"] == 1.0
    schema = json.loads((PROTO / "summaries" / "run.json").read_text())
    jsonschema.validate(summary, schema)
    summary["suites"]["fmt"]["pass"] = "half"
    try:
        jsonschema.validate(summary, schema)
    except jsonschema.ValidationError as e:
        assert "half" in e.message
    else:
        raise AssertionError("schema accepted a pass rate that is not a number")
