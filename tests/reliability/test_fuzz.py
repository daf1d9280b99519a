"""Property-based bad input (hypothesis) against the five live services of a training run:
broken bytes, wrong types, missing and extra fields on every subject a service consumes, and
random arguments to the control CLI. No service dies; every message that fails validation is
dead-lettered once by each service that consumes it, with a reason; every CLI call ends with
the trainer's answer (applied, or rejected with the reason) or a usage error, never a hang or
a traceback; the run still stops when told to."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from typer.testing import CliRunner

from helpers import collect, make_run, tiny_config, wait_for
from tuneloop.tools.cli import app
from tuneloop.tools.client import send_control
from tuneloop.events import (BY_KIND, ControlApplied, ControlRejected, DeadLetter, StepMetrics, TrainingFinished)

pytestmark = pytest.mark.reliability

# subject kind -> the services whose durable consumers read it
CONSUMERS = {
    "control": ["trainer"], "feedback": ["trainer", "data-pipeline"], "data.mixture": ["data-pipeline"],
    "ckpt.saved": ["checkpoint"], "train.done": ["checkpoint"], "eval.verdict": ["checkpoint", "rl-reward"],
    "eval.request": ["evaluator"], "eval.shard": ["evaluator"],
    # read live (data sets: the trainer follows them) or by watchers only: invalid ones are counted and skipped
    "data.ready": [], "train.step": [], "ckpt.recorded": [], "export.done": [], "control.applied": [],
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def template(kind: str, run: str) -> dict:
    """A valid event of ``kind`` (harmless if it got through as it is)."""
    base = {"run_id": run}
    return {
        "control": {**base, "command": "set-log-interval", "value": 5},
        "feedback": {**base, "step": 1, "action": "continue", "reason": "fuzz", "score": 0.5},
        "data.mixture": {**base, "weights": {"protocol": 1.0}},
        "ckpt.saved": {**base, "step": 1, "path": "checkpoints/none", "base_model": "base", "adapter": True},
        "train.done": {**base, "step": 1, "reason": "completed", "detail": "fuzz"},
        "eval.verdict": {**base, "request_id": "r", "step": 1, "checkpoint": "c", "split": "val",
                         "purpose": "periodic", "cases": 1, "scores": {"protocol": 1.0, "correctness": 1.0}},
        "eval.request": {**base, "step": 1, "checkpoint": "c", "base_model": "base"},
        "eval.shard": {**base, "shard": 0, "shards": 1, "cases_path": "x", "start": 0, "end": 1},
        "data.ready": {**base, "dataset_id": "d", "fingerprint": "f", "splits": {}, "chat_template": "t"},
        "train.step": {**base, "step": 1, "max_steps": 2},
        "ckpt.recorded": {**base, "step": 1, "path": "p", "sha256": "s", "bytes": 1},
        "export.done": {**base, "step": 1},
        "control.applied": {**base, "control_id": "c", "command": "stop", "step": 1},
    }[kind]


@st.composite
def broken(draw, kinds: list[str]) -> tuple[str, bytes]:
    """(kind, payload) that must not validate: bytes, a wrong type, a missing field, an extra field."""
    kind = draw(st.sampled_from(kinds))
    event = template(kind, "RUN")
    how = draw(st.sampled_from(["bytes", "json", "wrong-type", "missing", "extra"]))
    if how == "bytes":
        return kind, draw(st.binary(max_size=64))
    if how == "json":
        return kind, json.dumps(draw(JSON)).encode()
    field = draw(st.sampled_from(sorted(k for k in event if k != "run_id")))
    if how == "wrong-type":
        event[field] = draw(JSON.filter(lambda v: isinstance(v, (dict, list)) or v is None))
    elif how == "missing":
        del event[field]
    else:
        event[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in event))] = draw(JSON)
    return kind, json.dumps(event).encode()


def generate(strategy, n: int) -> list:
    """``n`` examples of ``strategy`` (hypothesis as a generator: the property is checked on them all)."""
    out: list = []

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def keep(x):
        out.append(x)

    keep()
    return out[:n]


def invalid(kind: str, payload: bytes, run: str) -> bool:
    try:
        BY_KIND[kind].model_validate_json(payload.replace(b'"RUN"', json.dumps(run).encode()))
    except (ValidationError, ValueError):
        return True
    return False


async def test_bad_input_never_kills_a_service_and_every_rejection_is_explained(tmp_path, nats_url, bus, services,
                                                                              figures):
    run = f"fuzz-{int(time.time()) % 10**6}"
    storage = make_run(tmp_path, run, tiny_config(tmp_path, max_steps=100000, save_steps=100000))
    svc = services(storage, nats_url, run)
    for name in ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward"):
        svc.start(name)
    steps, dead = await collect(bus, StepMetrics, run), await collect(bus, DeadLetter, run)
    answers, finished = await collect(bus, ControlApplied, run), await collect(bus, TrainingFinished, run)
    rejected = await collect(bus, ControlRejected, run)
    await wait_for(lambda: steps, timeout=180)

    messages = [(k, p.replace(b'"RUN"', json.dumps(run).encode())) for k, p in generate(broken(list(CONSUMERS)), 150)]
    messages = [(k, p) for k, p in messages if invalid(k, p, run)]
    t0 = time.monotonic()
    for i, (kind, payload) in enumerate(messages):
        await bus.js.publish(f"tuneloop.{run}.{kind}", payload, headers={"Nats-Msg-Id": f"{run}-fuzz-{i}"})
    expected = Counter()
    for kind, _ in messages:
        for service in CONSUMERS[kind]:
            expected[(service, kind)] += 1

    def seen():
        return Counter((d.service, d.subject.rsplit(f"{run}.", 1)[1]) for d in dead)

    await wait_for(lambda: seen() == expected, timeout=120)
    figures["dead_letter_s"] = round(time.monotonic() - t0, 2)
    assert all(d.reason and len(d.reason) > 10 for d in dead), [d.reason for d in dead if len(d.reason) <= 10]

    # Random arguments to the control CLI itself: every call ends with an answer or a reason.
    commands = st.sampled_from(["set-lr", "set-grad-clip", "set-save-interval", "set-log-interval", "checkpoint",
                                "set-data", "resume", "frobnicate", "", "SET-LR", "set-lr ", "--help"])
    values = st.none() | st.floats(allow_nan=True, allow_infinity=True).map(str) | st.integers(-10**6, 10**6).map(str) \
        | st.text(max_size=10).filter(lambda v: not v.startswith("-") and "\x00" not in v)
    controls = generate(st.tuples(commands, values), 30)
    runner = CliRunner()
    codes = Counter()
    for command, value in controls:
        args = ["ctl", run, command, *([value] if value is not None else []), "--nats-url", nats_url, "--timeout", "60"]
        result = await asyncio.to_thread(runner.invoke, app, args)
        codes[result.exit_code] += 1
        assert result.exit_code in (0, 1, 2), (args, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.output.strip(), args  # applied, rejected with the reason, or what is wrong with the call
        assert "no answer" not in result.output, (args, result.output)  # the trainer answered every control
    died = [name for name, p in svc.procs.items() if p.poll() is not None]
    figures["services_died"] = len(died)
    for name in died:
        raise AssertionError(f"{name} died:\n{svc.log(name)[-2000:]}")
    stop = await send_control(nats_url, run, "stop", None, timeout=60)
    assert isinstance(stop, ControlApplied)
    await wait_for(lambda: finished, timeout=60)
    figures.update(bad_messages=len(messages), dead_letters=len(dead), cli_calls=len(controls),
                   cli_exit_codes=dict(sorted(codes.items())), controls_applied=len(answers) - 1,
                   controls_rejected=len(rejected))
