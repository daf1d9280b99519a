import pytest
from pydantic import ValidationError

from tuneloop import subjects
from tuneloop.events import BY_KIND, Control, DeadLetter, EvalVerdict, StepMetrics, explain, parse


def test_envelope_is_filled_and_round_trips():
    ev = StepMetrics(run_id="r1", step=3, max_steps=10, loss=1.5)
    assert len(ev.event_id) == 32 and ev.schema_version == 1 and ev.time.tzinfo is not None
    again = parse(StepMetrics, ev.to_bytes())
    assert again == ev


def test_unknown_fields_and_bad_run_ids_are_rejected_with_the_field_named():
    with pytest.raises(ValidationError) as e:
        parse(StepMetrics, {"run_id": "r1", "step": 1, "max_steps": 2, "lose": 0.1})
    assert "lose" in explain(e.value)
    with pytest.raises(ValidationError) as e:
        Control(run_id="bad id!", command="stop")
    assert explain(e.value).startswith("run_id:")


def test_negative_step_names_the_field():
    with pytest.raises(ValidationError) as e:
        parse(StepMetrics, b'{"run_id": "r", "step": -1, "max_steps": 3}')
    assert "step:" in explain(e.value)


def test_every_kind_has_a_unique_subject_and_durable_kinds_are_in_the_stream():
    assert len(BY_KIND) == len({c.__name__ for c in BY_KIND.values()})
    captured = subjects.stream_subjects()
    assert "tuneloop.*.control" in captured and "tuneloop.*.dlq" in captured
    # request/reply must stay outside the stream, or JetStream would answer the request itself
    assert "tuneloop.*.reward.score" not in captured
    assert subjects.subject("run-1", Control.KIND) == "tuneloop.run-1.control"
    assert subjects.run_of("tuneloop.run-1.eval.verdict") == "run-1"
    assert subjects.kind_of("tuneloop.run-1.eval.verdict") == "eval.verdict"
    with pytest.raises(ValueError):
        subjects.subject("a.b", "control")


def test_verdict_failures_are_bounded():
    with pytest.raises(ValidationError):
        EvalVerdict(run_id="r", request_id="x", step=1, checkpoint="c", split="val", purpose="periodic", cases=1,
                    scores={}, failures=[{"prompt": "p", "output": "o", "reason": "r"}] * 21)
    assert DeadLetter.KIND == "dlq"


def test_derived_ids_stay_unique_and_valid_with_the_longest_run_ids():
    """Ids made from other ids (shards of a request, the verdict, feedback, exports...) never
    collide: cut to 64 characters they once did, and a baseline evaluation of a long run id
    stored 1 of its 4 shards."""
    from tuneloop.events import derived_id

    made = []
    for run in ("r" * 63 + "a", "r" * 63 + "b"):  # the longest run ids, differing only at the end
        request = derived_id("baseline", run)
        made += [request, derived_id("verdict", request), derived_id("feedback", derived_id("verdict", request))]
        made += [derived_id("shard", request, i) for i in range(12)]
        made += [derived_id("queued", run, attempt) for attempt in range(3)]
        made += [derived_id("data", run, "f" * 24), derived_id("data", run, "f" * 24, "e" * 32)]
        done = "d" * 32
        made += [derived_id(f"final{i or ''}", done + run) for i in range(3)] + [derived_id("export", done + run)]
    assert len(set(made)) == len(made)
    for event_id in made:
        assert len(event_id) <= 64
        StepMetrics(run_id="r", event_id=event_id, step=0, max_steps=1)  # valid as an id
    assert derived_id("shard", "abc", 2) == derived_id("shard", "abc", 2) == "shard-abc-2"  # short ids stay readable
