"""The checkpoint service's handlers on an in-memory bus (``FakeBus``): what each does with
one event. The same service against a real nats-server is in tests/integration/."""

import asyncio
import json

import pytest

from fakebus import FakeBus
from helpers import tiny_config
from tuneloop.checkpoint.__main__ import CheckpointService, open_catalogue
from tuneloop.checkpoints import MANIFEST, STATE_FILE
from tuneloop.config import dump_config
from tuneloop.events import (CheckpointRecorded, CheckpointSaved, EvalRequest, EvalVerdict, Reject, TrainingFinished)
from tuneloop.service import ServiceContext
from tuneloop.storage import CONFIG_FILE


@pytest.fixture
def service(tmp_path):
    bus = FakeBus("checkpoint")
    ctx = ServiceContext("checkpoint", bus, "r", tmp_path)
    rdir = tmp_path / "r"
    (rdir / "checkpoints").mkdir(parents=True)
    dump_config(tiny_config(tmp_path), rdir / CONFIG_FILE)

    async def make():
        return CheckpointService(ctx, await open_catalogue(ctx), None)

    return asyncio.run(make()), bus, rdir


def checkpoint(rdir, step, weights=b"w"):
    c = rdir / "checkpoints" / f"checkpoint-{step}"
    c.mkdir()
    (c / "adapter_model.safetensors").write_bytes(weights)
    (c / STATE_FILE).write_text("{}")
    return CheckpointSaved(run_id="r", step=step, path=f"checkpoints/checkpoint-{step}", base_model="base", adapter=True)


def test_a_saved_checkpoint_is_hashed_recorded_and_sent_for_evaluation(service):
    svc, bus, rdir = service
    saved = checkpoint(rdir, 10)
    asyncio.run(svc.on_saved(saved))
    [recorded] = bus.of(CheckpointRecorded)
    manifest = json.loads((rdir / "checkpoints" / "checkpoint-10" / MANIFEST).read_text())
    assert recorded.sha256 == manifest["sha256"] and recorded.bytes == 3  # b"w" + "{}"
    [request] = bus.of(EvalRequest)
    assert (request.step, request.checkpoint, request.purpose) == (10, saved.path, "periodic")
    asyncio.run(svc.on_saved(saved))  # redelivered: the same record again, which the stream de-duplicates by its id
    first, again = bus.of(CheckpointRecorded)
    assert again.event_id == first.event_id and again.sha256 == first.sha256


def test_a_checkpoint_changed_after_it_was_recorded_is_refused_and_keeps_its_record(service):
    svc, bus, rdir = service
    saved = checkpoint(rdir, 10)
    asyncio.run(svc.on_saved(saved))
    (rdir / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(Reject, match="changed since it was recorded"):
        asyncio.run(svc.on_saved(saved))
    assert len(bus.of(CheckpointRecorded)) == 1


def test_a_pruned_run_releases_its_checkpoints_and_keeps_their_records(service):
    svc, bus, rdir = service
    for step in (10, 20):
        asyncio.run(svc.on_saved(checkpoint(rdir, step)))
    [asked] = [e for e in bus.published if e.KIND == "eval.request" and e.step == 10]
    verdict = EvalVerdict(run_id="r", request_id=asked.event_id, step=10, checkpoint="checkpoints/checkpoint-10", split="val",
                          purpose="periodic", cases=1, scores={"protocol": 0.5, "correctness": 0.0})
    asyncio.run(svc.on_verdict(verdict))
    asyncio.run(svc.on_done(TrainingFinished(run_id="r", step=20, reason="pruned", detail="pruned by sweep")))
    [released] = [e for e in bus.published if e.KIND == "ckpt.released"]
    assert released.steps == [10, 20] and released.bytes > 0 and not list((rdir / "checkpoints").iterdir())
    entries = asyncio.run(svc.catalogue.entries("r"))
    assert [(e.step, e.released, e.scores) for e in entries] == [(10, True, {"protocol": 0.5, "correctness": 0.0}),
                                                                (20, True, None)]


def test_a_rollback_discards_the_records_after_the_savepoint_and_their_late_verdicts(service):
    """Steps saved after a savepoint are discarded by a rollback: never exported, and a verdict
    of the discarded checkpoint that arrives after the step was saved again is not its record."""
    from tuneloop.checkpoint.catalogue import best
    from tuneloop.events import ControlRolledBack

    svc, bus, rdir = service
    savepoint, bad = checkpoint(rdir, 10), checkpoint(rdir, 20, weights=b"diverged")
    for saved in (savepoint, bad):
        asyncio.run(svc.on_saved(saved))
    request = {r.step: r for r in bus.of(EvalRequest)}

    def verdict(step, protocol):
        return EvalVerdict(run_id="r", request_id=request[step].event_id, step=step, checkpoint=f"c{step}", split="val",
                           purpose="periodic", cases=1, scores={"protocol": protocol, "correctness": 0.0})

    asyncio.run(svc.on_verdict(verdict(10, 0.5)))
    asyncio.run(svc.on_verdict(verdict(20, 0.9)))  # the discarded branch happened to score higher
    asyncio.run(svc.on_rolled_back(ControlRolledBack(
        run_id="r", control_id="c", command="set-lr", value=5.0, guard="loss<3", step=23, savepoint_step=10,
        discarded_steps=[11, 23], verdict_step=20, discarded_saves=[bad.event_id])))
    entries = asyncio.run(svc.catalogue.entries("r"))
    assert [(e.step, e.released, e.discarded) for e in entries] == [(10, False, False), (20, True, True)]
    assert best(entries, "protocol").step == 10

    import shutil
    shutil.rmtree(rdir / "checkpoints" / "checkpoint-20")  # the trainer deleted it, and saves step 20 again
    again = checkpoint(rdir, 20, weights=b"retrained")
    asyncio.run(svc.on_saved(again))
    asyncio.run(svc.on_verdict(verdict(20, 0.9)))  # late: the discarded checkpoint's verdict
    [entry] = [e for e in asyncio.run(svc.catalogue.entries("r")) if e.step == 20]
    assert entry.scores is None and not entry.released
