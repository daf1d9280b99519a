"""The event topology is declared once (shared/topology.py): every event is in it, the files
generated from it have not drifted, the services' code consumes exactly what it gives them,
and a service's bus refuses the rest."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO
from tuneloop import topology
from tuneloop.tools import proto
from tuneloop.events import BY_KIND, Control, DataSwitch
from tuneloop.topology import TopologyError


def test_every_event_kind_is_declared_once():
    kinds = [r.kind for r in topology.ROUTES]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) | {r.reply for r in topology.ROUTES if r.reply} == set(BY_KIND)
    for r in topology.ROUTES:
        assert set(r.publishers) | set(r.consumers) <= set(topology.IDENTITIES), r
        assert r.publishers and r.payload, r


def test_nats_conf_and_the_readme_table_are_generated_from_it():
    assert topology.drifted() == [], "run: python -m tuneloop.topology --write"


def test_a_changed_declaration_is_drift(tmp_path, monkeypatch):
    for rel in (topology.CONF, topology.README):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    assert topology.drifted(tmp_path) == []
    monkeypatch.setattr(topology, "ROUTES", (*topology.ROUTES, topology.Route("x.new", ("viewer",), payload="p")))
    assert topology.drifted(tmp_path) == [str(topology.CONF), str(topology.README)]


def test_asyncapi_sends_and_receives_follow_the_declaration():
    ops = proto.asyncapi()["operations"]
    got = {(op["x-identity"], op["action"], op["channel"]["$ref"].rsplit("/", 1)[1]) for op in ops.values()}
    want = {(who, "send", r.kind.replace(".", "_")) for r in topology.ROUTES for who in r.publishers}
    want |= {(who, "receive", r.kind.replace(".", "_")) for r in topology.ROUTES for who in r.consumers}
    assert want <= got
    assert ("rl-reward", "send", "reward_reply") in got and ("trainer", "receive", "reward_reply") in got
    assert ("data-pipeline", "send", "control") not in got  # least privilege, per command


@pytest.mark.parametrize("service", topology.SERVICES)
def test_each_service_consumes_exactly_what_the_declaration_gives_it(service):
    """Read from the code: every ``consume(Event, ...)``, ``serve(Event, ...)`` and
    ``@handles(Event)`` of the service's folder (kinds looped over included)."""
    folder = REPO / "services" / service
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "consume", "serve", "handles") and node.args:
                first = node.args[0]
                names |= {first.id} if isinstance(first, ast.Name) else set()
            if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Tuple) and isinstance(node.target, ast.Name) \
                    and node.target.id == "kind":
                names |= {e.id for e in node.iter.elts if isinstance(e, ast.Name)}
    by_name = {cls.__name__: kind for kind, cls in BY_KIND.items()}
    found = {by_name[n] for n in names if n in by_name}
    assert found == set(topology.consumes(service)), (sorted(found), topology.consumes(service))


def test_a_service_may_not_publish_or_consume_what_it_is_not_given():
    with pytest.raises(TopologyError, match=r"data-pipeline may not publish 'control'.*shared/topology.py"):
        topology.check("data-pipeline", "publish", "control")
    with pytest.raises(TopologyError, match="evaluator may not consume 'control'"):
        topology.check("evaluator", "consume", "control")
    topology.check("data-pipeline", "publish", "data.switch")
    topology.check("trainer", "consume", "data.switch")
    topology.check("ctl", "publish", "control")  # people's tools: the server's identities govern them


def test_a_data_switch_is_only_ever_set_data():
    switch = DataSwitch(run_id="r", dataset_id="d-1", requested_by="fb-1")
    control = switch.as_control()
    assert isinstance(control, Control)
    assert (control.command, control.value, control.policy, control.event_id) == ("set-data", "d-1", "adaptive data",
                                                                                  switch.event_id)
    assert "command" not in DataSwitch.model_fields


def test_the_declared_kv_writers_cover_every_bucket():
    from tuneloop import subjects

    assert set(topology.KV_WRITERS) == set(subjects.BUCKETS)


def test_nats_conf_permissions_name_only_declared_kinds():
    conf = (REPO / topology.CONF).read_text()
    assert "tuneloop.*.control\"" not in conf.split("user: data-pipeline", 1)[1].split("{user:", 1)[0]
    assert Path(REPO / topology.CONF).read_text().count("# topology:begin") == 1
