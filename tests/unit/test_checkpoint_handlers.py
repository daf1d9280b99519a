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
    verdict = EvalVerdict(run_id="r", request_id="q", step=10, checkpoint="checkpoints/checkpoint-10", split="val",
                          purpose="periodic", cases=1, scores={"protocol": 0.5, "correctness": 0.0})
    asyncio.run(svc.on_verdict(verdict))
    asyncio.run(svc.on_done(TrainingFinished(run_id="r", step=20, reason="pruned", detail="pruned by sweep")))
    [released] = [e for e in bus.published if e.KIND == "ckpt.released"]
    assert released.steps == [10, 20] and released.bytes > 0 and not list((rdir / "checkpoints").iterdir())
    entries = asyncio.run(svc.catalogue.entries("r"))
    assert [(e.step, e.released, e.scores) for e in entries] == [(10, True, {"protocol": 0.5, "correctness": 0.0}),
                                                                (20, True, None)]
