"""TLS where there is a network, against real nats-servers started from the deployment's own
nats.conf with certificates `make secrets` would make (shared/tls.py): a plaintext client is
refused, a client that does not trust the deployment's CA refuses the server (and says how to
trust it), one that does connects and works, and a 3-node cluster's routes are TLS both ways,
verified, with JetStream's replicated streams working across them. The permission matrix
(test_permissions.py) and the security scenarios run over TLS too: their server is this one."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import urllib.request
from urllib.parse import urlparse

import pytest

from helpers import DEPLOYED_CONF, IDENTITIES, deployed_tls
from tuneloop import tls
from tuneloop.tools.embedded import NatsCluster, NatsServer

pytestmark = pytest.mark.integration


def passwords(monkeypatch) -> dict[str, str]:
    pw = {u: secrets.token_hex(8) for u in IDENTITIES}
    for user, p in pw.items():
        monkeypatch.setenv(f"TUNELOOP_{user.upper().replace('-', '_')}_PASSWORD", p)
    return pw


def plaintext_connect(url: str, user: str, password: str) -> bytes:
    """What the server answers a client that sends CONNECT without TLS (a raw socket: nats-py
    would upgrade to TLS by itself)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        info = sock.recv(4096)
        assert info.startswith(b"INFO ") and json.loads(info[5:])["tls_required"] is True
        sock.sendall(b'CONNECT {"verbose":false,"user":"%s","pass":"%s"}\r\nPING\r\n' % (user.encode(), password.encode()))
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        return answer


async def connect(url: str, user: str, password: str, monkeypatch):
    from tuneloop.bus import Bus

    with monkeypatch.context() as m:
        m.setenv("NATS_USER", user)
        m.setenv("NATS_PASSWORD", password)
        return await Bus.connect(url, user, patience=10)


async def test_a_plaintext_client_is_refused_and_an_untrusting_one_is_told_how_to_trust(tmp_path, monkeypatch):
    from tuneloop.bus import NatsUnreachable

    pw = passwords(monkeypatch)
    ca = deployed_tls(tmp_path / "tls", monkeypatch)
    other_ca = tls.make_certificates(tmp_path / "other")[tls.CA]  # another deployment's CA
    with NatsServer(tmp_path / "nats", config_file=DEPLOYED_CONF) as server:
        answer = plaintext_connect(server.url, "operator", pw["operator"])
        assert answer == b"", answer  # no PONG, no -ERR: the server hung up on the plaintext CONNECT
        monkeypatch.setenv("NATS_TLS_CA", str(other_ca))
        with pytest.raises(NatsUnreachable, match="does not trust.*set NATS_TLS_CA to the deployment's CA"):
            await connect(server.url, "operator", pw["operator"], monkeypatch)
        monkeypatch.setenv("NATS_TLS_CA", str(ca))
        bus = await connect(server.url, "admin", pw["admin"], monkeypatch)  # trusting it: connected, over TLS
        try:
            assert bus.nc.is_connected and bus.nc._server_info["tls_required"]
        finally:
            await bus.close()


async def test_the_clusters_routes_are_tls_both_ways_and_jetstream_replicates_over_them(tmp_path, monkeypatch):
    from tuneloop.events import RunQueued
    from tuneloop.provision import provision

    pw = passwords(monkeypatch)
    deployed_tls(tmp_path / "tls", monkeypatch)
    with NatsCluster(tmp_path / "cluster", config_file=DEPLOYED_CONF, monitor=True) as cluster:
        varz = []
        for node in cluster.nodes:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/varz", timeout=10) as r:
                varz.append(json.loads(r.read())["cluster"])
        assert all(v["tls_required"] and v["tls_verify"] for v in varz), varz
        admin = await connect(cluster.url, "admin", pw["admin"], monkeypatch)
        try:
            made = await provision(admin.nc)
            assert set(made.values()) == {3}, made  # three copies of everything: over the TLS routes
        finally:
            await admin.close()
        operator = await connect(cluster.url, "operator", pw["operator"], monkeypatch)
        try:
            await operator.publish(RunQueued(run_id="tls-run", reason="over TLS"))
            got = await operator.latest(RunQueued, "tls-run")
            assert got is not None and got.reason == "over TLS"
        finally:
            await operator.close()

        async def routes(node) -> int:
            def get():
                with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/routez", timeout=10) as r:
                    return json.loads(r.read())["num_routes"]
            return await asyncio.to_thread(get)
        counts = [await routes(n) for n in cluster.nodes]
        assert all(c >= 2 for c in counts), counts  # each node routed to both others
