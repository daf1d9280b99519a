"""Grafana annotations: what they say, and off without a URL and a token."""


def test_grafana_annotations_say_what_was_done_and_are_off_without_url_and_token(monkeypatch):
    from tuneloop.events import CheckpointRecorded, ControlApplied, StepMetrics
    from tuneloop.grafana import Annotator, annotation

    applied = ControlApplied(run_id="r1", control_id="c", command="set-lr", step=42, old=0.003, new=0.001)
    a = annotation(applied)
    assert a["tags"] == ["tuneloop", "r1", "control", "set-lr"] and a["text"] == "r1: set-lr at step 42: 0.003 -> 0.001"
    assert a["time_from"] == int(applied.time.timestamp() * 1000) and a["dashboard_uid"] == "tuneloop"
    saved = annotation(CheckpointRecorded(run_id="r1", step=50, path="checkpoints/checkpoint-50", sha256="ab" * 32,
                                          bytes=14_300_000))
    assert saved["tags"][-1] == "checkpoint" and "step 50 (14.3 MB, sha256 abababababab)" in saved["text"]
    assert annotation(StepMetrics(run_id="r1", step=1, max_steps=2)) is None
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert Annotator.from_env() is None
