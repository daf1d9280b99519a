"""/healthz is readiness, /livez liveness: a service is ready once it is connected to NATS with
every consumer consuming, and not while its server is away; alive all the while. Against a
real nats-server of the test's own that is stopped and started again."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tuneloop import exporter
from tuneloop.bus import Bus
from tuneloop.events import Control
from tuneloop.tools.embedded import NatsServer, free_ports

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def until(check, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def test_ready_only_while_connected_with_every_consumer_consuming(tmp_path):
    server = NatsServer(tmp_path / "nats", port=free_ports(1)[0])  # the same port when it comes back
    url = server.start()
    http = exporter.start_http(0, host="127.0.0.1")
    port = http.server_address[1]
    bus = None
    try:
        code, body = await asyncio.to_thread(get, port, "/healthz")
        assert code == 503 and json.loads(body)["bus"] == "starting"  # no bus yet: not ready
        assert (await asyncio.to_thread(get, port, "/livez"))[0] == 200

        bus = await Bus.connect(url, "trainer")
        exporter.HEALTH.append(bus.health)
        await bus.consume(Control, "health", lambda e: None)
        code, body = await asyncio.to_thread(get, port, "/healthz")
        seen = json.loads(body)
        assert code == 200 and seen["ready"] and seen["bus"] == "connected" and seen["service"] == "trainer"
        assert list(seen["consumers"].values()) == ["consuming"], seen

        server.stop()  # the broker goes away: not ready (a load balancer stops sending), yet alive

        async def not_ready() -> bool:
            code, body = await asyncio.to_thread(get, port, "/healthz")
            return code == 503 and json.loads(body)["bus"] in ("reconnecting", "disconnected")
        await until(not_ready, timeout=30)
        assert (await asyncio.to_thread(get, port, "/livez"))[0] == 200

        server.start()  # back on the same port: ready again, with the same consumer

        async def ready() -> bool:
            return (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        await until(ready, timeout=60)
    finally:
        if bus is not None:
            exporter.HEALTH.remove(bus.health)
            await bus.close()
        http.shutdown()
        server.stop()
