"""A real nats-server started from the deployment's own users and permissions
(k8s/base/nats/nats.conf): only the operator may publish control; every service identity's
control is refused by the server (data-pipeline's adaptive data has data.switch, which the
trainer takes only as set-data); an event naming a path outside
the run is rejected and dead-lettered, and the service goes on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import nats
import pytest

from helpers import make_run, run_id_for, tiny_config, tls_options
from helpers import collect, wait_for
from tuneloop.bus import Bus
from tuneloop.checkpoints import MANIFEST
from tuneloop.events import CheckpointRecorded, CheckpointSaved, Control, DeadLetter, StepMetrics

def identity(passwords: dict, user: str) -> dict[str, str]:
    return {"NATS_USER": user, "NATS_PASSWORD": passwords[user]}


async def refused_publish(url: str, passwords: dict, user: str, subject: str) -> list[str]:
    """Publish as ``user``; the server's errors for it."""
    errors: list[str] = []

    async def on_error(e):
        errors.append(str(e))

    nc = await nats.connect(url, user=user, password=passwords[user], error_cb=on_error, max_reconnect_attempts=0,
                            **tls_options())
    await nc.publish(subject, json.dumps({"command": "stop"}).encode())
    await nc.flush()
    await asyncio.sleep(0.5)
    await nc.close()
    return errors


async def test_only_the_operator_may_steer_and_strangers_may_not_connect(tmp_path, secured, services, request,
                                                                         monkeypatch):
    url, pw = secured
    run = run_id_for(request)
    storage = make_run(tmp_path, run, tiny_config(tmp_path, max_steps=100000))
    svc = services(storage, url, run)
    for name in ("data-pipeline", "trainer"):
        svc.start(name, env=identity(pw, name))
    monkeypatch.setenv("NATS_USER", "viewer")
    monkeypatch.setenv("NATS_PASSWORD", pw["viewer"])
    bus = await Bus.connect(url, "test-viewer")  # read-only identity: watches, cannot steer
    steps = await collect(bus, StepMetrics, run)
    await wait_for(lambda: steps, timeout=180)

    for user in ("trainer", "data-pipeline", "evaluator", "rl-reward", "checkpoint", "viewer"):
        errors = await refused_publish(url, pw, user, f"tuneloop.{run}.control")
        assert any("permissions violation for publish" in e.lower() and f"tuneloop.{run}.control" in e for e in errors), (user, errors)
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False, **tls_options())
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(url, user="operator", password="wrong", max_reconnect_attempts=0, allow_reconnect=False,
                           **tls_options())

    ctl = [sys.executable, "-m", "tuneloop", "ctl", run, "--nats-url", url, "--timeout", "60"]
    operator = identity(pw, "operator")
    ok = subprocess.run([*ctl, "set-lr", "0.001"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, **operator})
    assert ok.returncode == 0 and "applied set-lr" in ok.stdout, ok.stdout + ok.stderr
    # None of the refused "stop"s reached the stream (only the operator's set-lr is stored), and
    # the trainer trains on.
    assert [c.command for c in await bus.history(Control, run)] == ["set-lr"]
    seen = steps[-1].step
    await wait_for(lambda: steps[-1].step > seen, timeout=60)
    viewer = subprocess.run([*ctl, "set-lr", "0.002"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **identity(pw, "viewer")})
    assert viewer.returncode == 4 and "does not let identity viewer publish" in viewer.stderr, viewer.stdout + viewer.stderr
    stop = subprocess.run([*ctl, "stop"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **operator})
    assert stop.returncode == 0, stop.stdout + stop.stderr
    await bus.close()


async def test_an_event_naming_a_path_outside_the_run_is_rejected_and_the_service_goes_on(
        tmp_path, secured, services, request, monkeypatch):
    url, pw = secured
    run = run_id_for(request)
    storage = make_run(tmp_path, run, tiny_config(tmp_path, max_steps=40, save_steps=20))
    (tmp_path / "secret.txt").write_text("not for you")
    svc = services(storage, url, run)
    svc.start("checkpoint", env=identity(pw, "checkpoint"))
    monkeypatch.setenv("NATS_USER", "trainer")  # the identity that may announce checkpoints
    monkeypatch.setenv("NATS_PASSWORD", pw["trainer"])
    bus = await Bus.connect(url, "test-trainer")
    dead, recorded = await collect(bus, DeadLetter, run), await collect(bus, CheckpointRecorded, run)
    evil = {"run_id": run, "event_id": "evil-1", "step": 1, "path": "../../secret.txt", "base_model": "base",
            "adapter": True}
    await bus.js.publish(f"tuneloop.{run}.ckpt.saved", json.dumps(evil).encode(), headers={"Nats-Msg-Id": "evil-1"})
    await wait_for(lambda: dead, timeout=60)
    assert "leaves the run directory" in dead[0].reason and "../../secret.txt" in dead[0].reason

    # A checkpoint folder with a symbolic link out of it is not hashed (nor later exported).
    linked = storage / run / "extra" / "linked"
    linked.mkdir(parents=True)
    (linked / "model.safetensors").symlink_to(tmp_path / "secret.txt")
    await bus.publish(CheckpointSaved(run_id=run, step=2, path="extra/linked", base_model="base", adapter=True))
    await wait_for(lambda: len(dead) >= 2, timeout=60)
    assert "symbolic link" in dead[1].reason and not (linked / MANIFEST).exists()

    # ckpt.saved handled again after its files changed: refused, the first record and manifest kept.
    ckpt = storage / run / "extra" / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    saved = CheckpointSaved(run_id=run, step=3, path="extra/ckpt", base_model="base", adapter=True)
    await bus.publish(saved)
    await wait_for(lambda: any(r.step == 3 for r in recorded), timeout=60)
    manifest = (ckpt / MANIFEST).read_text()
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    await bus.js.publish(f"tuneloop.{run}.ckpt.saved", saved.to_bytes(), headers={"Nats-Msg-Id": "again"})
    await wait_for(lambda: len(dead) >= 3, timeout=60)
    assert "changed since it was recorded" in dead[2].reason and (ckpt / MANIFEST).read_text() == manifest
    # The checkpoint service is alive and catalogues the real checkpoints of a real trainer.
    svc.start("data-pipeline", env=identity(pw, "data-pipeline"))
    svc.start("trainer", env=identity(pw, "trainer"))
    await wait_for(lambda: {r.step for r in recorded} >= {20, 40}, timeout=240)
    assert svc.procs["checkpoint"].poll() is None and {r.step for r in recorded} >= {3, 20, 40}
    assert not list(storage.glob(f"{run}/**/secret.txt"))
    await bus.close()
