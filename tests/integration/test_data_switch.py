"""Change data mid-run: data-pipeline prepares a new mixture on request, the trainer switches
to it at a step boundary (set-data), and a restarted trainer resumes on the data set its
checkpoint names. Real nats-server, real training."""

import asyncio
import json
import re

import pytest

from helpers import EXAMPLE_DATA, make_run, run_id_for, tiny_config
from helpers import collect, wait_for
from test_trainer import ctl
from tuneloop.config import Source
from tuneloop.tools.client import MixtureRefused, request_mixture
from tuneloop.events import (CheckpointSaved, ControlApplied, ControlRejected, DataSwitch, DatasetReady, Feedback, StepMetrics,
                             TrainingFinished)

pytestmark = pytest.mark.integration


def two_sources(tmp_path):
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text().splitlines()[:800]]
    paths = {}
    for name, keep in (("math", lambda r: r["category"] == "math"), ("words", lambda r: r["category"] != "math")):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows if keep(r)))
    return [Source(path=str(p), name=n) for n, p in paths.items()]


async def test_set_data_switches_at_a_step_boundary_and_survives_a_restart(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, max_steps=100000)
    cfg.data.sources = two_sources(tmp_path)
    storage = make_run(tmp_path, run, cfg)
    ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, CheckpointSaved, TrainingFinished)}
    svc = services(storage, nats_url, run)
    svc.start("data-pipeline")
    svc.start("trainer")
    await wait_for(lambda: ev[StepMetrics], timeout=120)
    first = await bus.latest(DatasetReady, run)

    unknown = await ctl(nats_url, bus, run, "set-data", "0123abcd")
    assert isinstance(unknown, ControlRejected) and first.dataset_id in unknown.reason
    with pytest.raises(MixtureRefused, match="no data source named typo.*sources: math, words"):
        await request_mixture(nats_url, run, {"typo": 2.0}, bus=bus, timeout=60)

    mixed = await request_mixture(nats_url, run, {"math": 4.0}, bus=bus, timeout=60)
    assert mixed.dataset_id != first.dataset_id and mixed.mixture["math"] == pytest.approx(0.8)
    share = lambda ds: ds.splits["train"].categories["math"] / ds.splits["train"].rows  # noqa: E731
    assert share(first) == pytest.approx(0.5, abs=0.02) and share(mixed) == pytest.approx(0.8, abs=0.02)
    assert mixed.splits["test"].path != first.splits["test"].path  # the old files stay for resume

    switched = await ctl(nats_url, bus, run, "set-data", mixed.dataset_id)
    assert isinstance(switched, ControlApplied) and (switched.old, switched.new) == (first.dataset_id, mixed.dataset_id)
    await wait_for(lambda: any(c.step == switched.step for c in ev[CheckpointSaved]), timeout=60)
    await wait_for(lambda: any(s.step > switched.step + 2 for s in ev[StepMetrics]), timeout=120)
    assert not ev[TrainingFinished], "a data switch is not the end of the run"

    svc.kill("trainer")
    svc.start("trainer")
    await wait_for(lambda: "resuming from" in svc.log("trainer"), timeout=120)
    announced = re.findall(r"trainer: dataset (\w+):", svc.log("trainer"))
    assert announced[-1] == mixed.dataset_id, announced
    await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: ev[TrainingFinished], timeout=60)
    assert ev[TrainingFinished][-1].reason == "control"

    # The audit stream holds every intervention and its answer, in order.
    async def trail():
        return [(type(e).__name__, getattr(e, "command", None)) for e in await bus.audit_trail(run)]
    expected = [("Control", "set-data"), ("ControlRejected", "set-data"), ("MixtureRequest", None),
                ("MixtureRequest", None), ("Control", "set-data"), ("ControlApplied", "set-data"),
                ("Control", "stop"), ("ControlApplied", "stop")]
    for _ in range(50):  # the audit stream copies from the main one asynchronously
        if await trail() == expected:
            break
        await asyncio.sleep(0.1)
    assert await trail() == expected


async def test_feedback_naming_weak_categories_shifts_the_mixture_and_the_trainer_follows(
        tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, max_steps=100000)
    cfg.data.adapt.enabled = True
    cfg.data.adapt.cooldown_steps = 5
    storage = make_run(tmp_path, run, cfg)
    ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, ControlApplied, DatasetReady, TrainingFinished)}
    svc = services(storage, nats_url, run)
    svc.start("data-pipeline")
    svc.start("trainer")
    await wait_for(lambda: ev[StepMetrics], timeout=120)
    first = await bus.latest(DatasetReady, run)

    weak = Feedback(run_id=run, step=1, action="continue", reason="math is weak", score=0.4, weak_categories=["math"])
    await bus.publish(weak)
    await wait_for(lambda: any(c.command == "set-data" for c in ev[ControlApplied]), timeout=60)
    adapted = next(d for d in ev[DatasetReady] if d.requested_by == weak.event_id)
    switch = next(c for c in ev[ControlApplied] if c.command == "set-data")
    assert (switch.old, switch.new) == (first.dataset_id, adapted.dataset_id)
    assert adapted.category_weights == {"math": 2.0}
    share = lambda ds: ds.splits["train"].categories["math"] / ds.splits["train"].rows  # noqa: E731
    p = share(first)
    assert share(adapted) == pytest.approx(2 * p / (1 + p), abs=0.05)  # math drawn twice as often
    assert adapted.splits["test"].categories == first.splits["test"].categories  # same held-out cases

    trail = await bus.audit_trail(run)
    # Asked for on data.switch (data-pipeline may not publish a control), applied as set-data.
    asked = [e for e in trail if isinstance(e, DataSwitch) and e.requested_by == weak.event_id]
    assert len(asked) == 1 and switch.control_id == asked[0].event_id, trail

    # One switch per piece of evidence: the verdict of the checkpoint taken at the switch (and of
    # any within the cooldown) was trained on the old mixture and moves nothing; a later one does.
    for step in (switch.step, switch.step + cfg.data.adapt.cooldown_steps - 1):
        await bus.publish(Feedback(run_id=run, step=step, action="continue", reason="math is weak", score=0.4,
                                   weak_categories=["math"]))
    later = Feedback(run_id=run, step=switch.step + cfg.data.adapt.cooldown_steps, action="continue",
                     reason="math is still weak", score=0.5, weak_categories=["math"])
    await bus.publish(later)
    await wait_for(lambda: any(d.requested_by == later.event_id for d in ev[DatasetReady]), timeout=60)
    boosts = [d.category_weights for d in ev[DatasetReady] if d.requested_by]  # handled in order: all three are in
    assert boosts == [{"math": 2.0}, {"math": 4.0}], boosts
    await ctl(nats_url, bus, run, "stop")
    await wait_for(lambda: ev[TrainingFinished], timeout=60)
