"""data-pipeline's handlers on an in-memory bus (``FakeBus``): a mixture request prepares and
announces the data again (a wrong one is refused with the reason), and adaptive data turns
feedback naming weak categories into a new data set and a ``data.switch`` (never a control),
once per piece of evidence. The service against a real nats-server is in
tests/integration/test_data_switch.py."""

import asyncio

import pytest

from fakebus import FakeBus
from helpers import make_run, tiny_config
from tuneloop.data_pipeline.__main__ import DataService, announce
from tuneloop.events import (Control, ControlApplied, DataSwitch, DatasetReady, Feedback, MixtureRequest, Reject,
                             RunQueued)
from tuneloop.service import ServiceContext


def service(tmp_path, adapt: bool = True, run: str = "r") -> tuple[DataService, FakeBus]:
    cfg = tiny_config(tmp_path)
    cfg.data.sources[0].name = "protocol"
    cfg.data.adapt.enabled, cfg.data.adapt.cooldown_steps = adapt, 5
    bus = FakeBus("data-pipeline")
    return DataService(ServiceContext("data-pipeline", bus, run, make_run(tmp_path, run, cfg))), bus


def weak(step: int, action: str = "continue") -> Feedback:
    return Feedback(run_id="r", step=step, action=action, reason="math is weak", score=0.4, weak_categories=["math"])


def test_a_mixture_request_announces_the_data_again_and_a_wrong_one_is_refused(tmp_path):
    svc, bus = service(tmp_path)
    first = asyncio.run(announce(svc.ctx, "r"))
    req = MixtureRequest(run_id="r", weights={"protocol": 2.0}, reason="more")
    asyncio.run(svc.on_mixture(req))
    again = bus.of(DatasetReady)[-1]
    assert again.requested_by == req.event_id and again.mixture == {"protocol": 1.0}
    assert again.splits["test"].categories == first.splits["test"].categories
    with pytest.raises(Reject, match="no data source named nope"):
        asyncio.run(svc.on_mixture(MixtureRequest(run_id="r", weights={"nope": 1.0})))


def test_weak_categories_become_a_data_switch_once_per_piece_of_evidence(tmp_path):
    svc, bus = service(tmp_path)
    first = asyncio.run(announce(svc.ctx, "r"))
    evidence = weak(10)
    asyncio.run(svc.on_feedback(evidence))
    adapted = bus.of(DatasetReady)[-1]
    [switch] = bus.of(DataSwitch)
    assert adapted.category_weights == {"math": 2.0} and adapted.dataset_id != first.dataset_id
    assert (switch.dataset_id, switch.requested_by) == (adapted.dataset_id, evidence.event_id)
    assert bus.of(Control) == []  # data-pipeline never publishes a control
    asyncio.run(svc.on_feedback(weak(12)))  # the switch not applied yet: the same evidence again
    assert len(bus.of(DataSwitch)) == 1
    asyncio.run(bus.publish(ControlApplied(run_id="r", control_id=switch.event_id, command="set-data", step=15,
                                           old=first.dataset_id, new=adapted.dataset_id)))
    asyncio.run(svc.on_feedback(weak(17)))  # trained 2 of the 5 cooldown steps on the new mixture
    assert len(bus.of(DataSwitch)) == 1
    asyncio.run(svc.on_feedback(weak(20)))
    assert len(bus.of(DataSwitch)) == 2 and bus.of(DatasetReady)[-1].category_weights == {"math": 4.0}


def test_no_switch_without_adaptive_data_or_on_a_stop(tmp_path):
    svc, bus = service(tmp_path, adapt=False)
    asyncio.run(announce(svc.ctx, "r"))
    asyncio.run(svc.on_feedback(weak(10)))
    on, on_bus = service(tmp_path / "on")
    asyncio.run(announce(on.ctx, "r"))
    asyncio.run(on.on_feedback(weak(10, action="stop")))
    assert bus.of(DataSwitch) == [] and on_bus.of(DataSwitch) == []


def test_a_pool_prepares_each_queued_run_and_refuses_one_whose_data_is_broken(tmp_path):
    svc, bus = service(tmp_path, run="r")
    asyncio.run(svc.on_queued(RunQueued(run_id="r")))
    assert [d.run_id for d in bus.of(DatasetReady)] == ["r"]
    broken = tiny_config(tmp_path)
    broken.data.sources[0].path = str(tmp_path / "missing.jsonl")
    make_run(tmp_path, "b", broken)
    with pytest.raises(Reject, match="data set for run b rejected: .*missing.jsonl: data file not found"):
        asyncio.run(svc.on_queued(RunQueued(run_id="b")))
