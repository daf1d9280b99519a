"""The permission matrix: every identity of the deployment x every action, against a real
nats-server started from the deployment's own config (k8s/base/nats/nats.conf).

Each cell is tried for real and observed: allowed when the server carries the action out (or
answers the API request), refused when the server reports a permissions violation for it. The
observed matrix must equal the designed one below, and docs/reliability.md shows it as
observed (``TUNELOOP_WRITE_DOCS=1`` rewrites that section from a run of this test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re

import nats
import pytest
from nats.js.api import ConsumerConfig

from helpers import IDENTITIES, REPO, tls_options
from tuneloop import subjects, topology
from tuneloop.events import BY_KIND

DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- permissions:begin -->", "<!-- permissions:end -->"
SERVICES = {"trainer", "data-pipeline", "evaluator", "rl-reward", "checkpoint"}
RUN = "m"  # the run the probes aim at
TRAINER_CONSUMER = subjects.durable_name("trainer", RUN, "control")

# ------------------------------------------------------------------ the design
# Who may publish what and write which bucket: the one declaration (shared/topology.py) the
# server's config is generated from; this test checks the server does what it says.
PUBLISHES = {who: set(topology.publishes(who)) for who in topology.IDENTITIES}
KV_WRITERS = {bucket: set(writers) for bucket, writers in topology.KV_WRITERS.items()}
EVERYONE = set(IDENTITIES)
READERS = EVERYONE - {"admin"}
DESIGN: dict[str, set[str]] = {
    **{f"publish {kind}": {who for who, kinds in PUBLISHES.items() if kind in kinds} for kind in sorted(BY_KIND)
       if kind != "reward.reply"},
    **{f"write KV {bucket}": writers for bucket, writers in KV_WRITERS.items()},
    "read KV (get)": EVERYONE,
    "subscribe to events": READERS,
    "follow history (ordered consumer)": EVERYONE,
    "subscribe to another identity's inbox": set(),
    "publish to another identity's inbox": set(),
    "answer a reward request it received": {"rl-reward"},
    "create a stream or KV bucket": {"admin"},
    "update a stream (e.g. the audit trail's max_age)": {"admin"},
    "delete a stream": set(),
    "purge a stream": set(),
    "delete a stored message": set(),
    "create a durable consumer on control": {"admin", "trainer"},
    "create a durable consumer on eval.shard": {"admin", "evaluator"},
    "take the trainer's controls (pull its consumer)": {"admin"} | SERVICES,
    "re-point the trainer's consumer by the ephemeral endpoint": set(),
    "delete a consumer": set(),
}


# ------------------------------------------------------------------ probing
class Probe:
    """One identity's connection, collecting the permission violations the server reports."""

    def __init__(self, url: str, user: str, password: str):
        self.url, self.user, self.password = url, user, password
        self.violations: list[str] = []

    async def __aenter__(self) -> "Probe":
        async def on_error(e):
            if "permissions violation" in str(e).lower():
                self.violations.append(str(e))

        self.nc = await nats.connect(self.url, user=self.user, password=self.password, error_cb=on_error,
                                     inbox_prefix=f"_INBOX.{self.user}", max_reconnect_attempts=0, **tls_options())
        self.js = self.nc.jetstream(timeout=2.0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    def refused(self, subject: str) -> bool:
        quoted = f'"{subject.lower()}"'  # nats-py reports the server's error in lower case
        return any(quoted in v.lower() for v in self.violations)

    async def publishes(self, subjects_: list[str]) -> set[str]:
        """Those of ``subjects_`` the server let this identity publish to."""
        for subject in subjects_:
            await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        await asyncio.sleep(0.5)
        return {s for s in subjects_ if not self.refused(s)}

    async def api(self, subject: str, body: dict | None = None) -> dict | None:
        """The JetStream API's answer (or a message it hands out), or None when the server
        refused the request."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, json.dumps(body or {}).encode(), reply=inbox)
            msg = await sub.next_msg(timeout=2.0)
        except nats.errors.TimeoutError:
            await asyncio.sleep(0.1)
            assert self.refused(subject), f"{self.user}: no answer on {subject} and no permissions violation"
            return None
        finally:
            await sub.unsubscribe()
        return json.loads(msg.data) if msg.data and msg.data.startswith(b"{") else {}

    async def subscribes(self, subjects_: list[str]) -> set[str]:
        subs = [await self.nc.subscribe(subject) for subject in subjects_]
        await self.nc.flush()
        await asyncio.sleep(0.5)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return {s for s in subjects_ if not self.refused(s)}


async def observe(url: str, pw: dict[str, str], user: str) -> set[str]:
    """The actions ``user`` was able to carry out."""
    ok: set[str] = set()
    other = "trainer" if user != "trainer" else "evaluator"
    ident = user.replace("-", "_")
    async with Probe(url, user, pw[user]) as p:
        wanted = {subjects.subject(RUN, kind): f"publish {kind}" for kind in sorted(BY_KIND) if kind != "reward.reply"}
        wanted |= {f"$KV.{bucket}.probe-{user}": f"write KV {bucket}" for bucket in KV_WRITERS}
        wanted[f"_INBOX.{other}.probe"] = "publish to another identity's inbox"
        ok |= {wanted[s] for s in await p.publishes(list(wanted))}
        listened = {f"{subjects.PREFIX}.{RUN}.>": "subscribe to events", f"_INBOX.{other}.>": "subscribe to another identity's inbox"}
        ok |= {listened[s] for s in await p.subscribes(list(listened))}

        audit = await admin_view(url, pw, "stream", subjects.AUDIT_STREAM)
        api = {  # action: (subject, body)
            "read KV (get)": (f"$JS.API.STREAM.MSG.GET.KV_{subjects.CHECKPOINT_BUCKET}", {"last_by_subj": "$KV.x.y"}),
            "create a stream or KV bucket": (f"$JS.API.STREAM.CREATE.PROBE_{ident}",
                                             {"name": f"PROBE_{ident}", "subjects": [f"probe.{user}"]}),
            "update a stream (e.g. the audit trail's max_age)": (f"$JS.API.STREAM.UPDATE.{subjects.AUDIT_STREAM}",
                                                                {**audit, "max_age": 1_000_000_000}),
            "delete a stream": ("$JS.API.STREAM.DELETE.PROBE_NONE", None),
            "purge a stream": (f"$JS.API.STREAM.PURGE.{subjects.STREAM}", {"filter": "tuneloop.none.>"}),
            "delete a stored message": (f"$JS.API.STREAM.MSG.DELETE.{subjects.STREAM}", {"seq": 10**9}),
            "take the trainer's controls (pull its consumer)": (
                f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM}.{TRAINER_CONSUMER}", {"batch": 1, "no_wait": True}),
            "delete a consumer": (f"$JS.API.CONSUMER.DELETE.{subjects.STREAM}.probe_none", None),
        }
        for kind in ("control", "eval.shard"):
            name, filt = f"probe_{ident}_{kind.replace('.', '-')}", subjects.subject(RUN, kind)
            api[f"create a durable consumer on {kind}"] = (
                f"$JS.API.CONSUMER.CREATE.{subjects.STREAM}.{name}.{filt}",
                {"stream_name": subjects.STREAM, "config": {"name": name, "durable_name": name, "filter_subject": filt,
                                                            "ack_policy": "explicit"}})
        answers = await asyncio.gather(*(p.api(subject, body) for subject, body in api.values()))
        ok |= {action for action, answer in zip(api, answers) if answer is not None}

        await p.api(f"$JS.API.CONSUMER.CREATE.{subjects.STREAM}",  # the ephemeral endpoint, a durable's name
                    {"stream_name": subjects.STREAM,
                     "config": {"durable_name": TRAINER_CONSUMER, "filter_subject": f"{subjects.PREFIX}.{RUN}.>",
                                "ack_policy": "explicit"}})
        if (await admin_view(url, pw, "consumer", TRAINER_CONSUMER))["filter_subject"] != subjects.subject(RUN, "control"):
            ok.add("re-point the trainer's consumer by the ephemeral endpoint")
        try:
            sub = await p.js.subscribe(subjects.subject(RUN, "train.step"), stream=subjects.STREAM, ordered_consumer=True)
            msg = await sub.next_msg(timeout=3)
            await sub.unsubscribe()
            if msg.subject == subjects.subject(RUN, "train.step"):
                ok.add("follow history (ordered consumer)")
        except Exception:
            assert p.refused(f"$JS.API.CONSUMER.CREATE.{subjects.STREAM}"), p.violations
        if await answer_reward_request(url, pw, p):
            ok.add("answer a reward request it received")
    return ok


async def answer_reward_request(url: str, pw: dict[str, str], p: Probe) -> bool:
    """The trainer asks for a reward (on a run of ``p``'s own); ``p`` receives the request and answers it."""
    subj = subjects.subject(f"{RUN}-{p.user}", "reward.score")
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on(msg):
        await msg.respond(p.user.encode())
        if not got.done():
            got.set_result(msg.reply)

    sub = await p.nc.subscribe(subj, cb=on)
    await p.nc.flush()
    try:
        async with Probe(url, "trainer", pw["trainer"]) as asker:
            try:
                reply = await asker.nc.request(subj, b"{}", timeout=1.5)
                return reply.data == p.user.encode()
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):  # refused, or it may not even listen
                return False
    finally:
        await sub.unsubscribe()


async def admin_view(url: str, pw: dict[str, str], what: str, name: str) -> dict:
    async with Probe(url, "admin", pw["admin"]) as a:
        if what == "stream":
            return (await a.js.stream_info(name)).config.as_dict()
        return (await a.js.consumer_info(subjects.STREAM, name)).config.as_dict()


# ------------------------------------------------------------------ the test
@pytest.fixture
def deployment(secured):
    """The provisioned deployment's server, with a trainer's durable control consumer and one
    stored train.step."""
    url, pw = secured

    async def setup():
        async with Probe(url, "trainer", pw["trainer"]) as t:
            await t.js.add_consumer(subjects.STREAM, ConsumerConfig(
                name=TRAINER_CONSUMER, durable_name=TRAINER_CONSUMER, filter_subject=subjects.subject(RUN, "control")))
            await t.js.publish(subjects.subject(RUN, "train.step"), b"{}")

    asyncio.run(setup())
    return url, pw


def render(matrix: dict[str, set[str]]) -> str:
    head = "| action | " + " | ".join(IDENTITIES) + " |"
    rows = [head, "|" + "---|" * (len(IDENTITIES) + 1)]
    for action, allowed in matrix.items():
        rows.append(f"| {action} | " + " | ".join("yes" if who in allowed else "—" for who in IDENTITIES) + " |")
    return "\n".join(rows)


def test_every_identity_may_do_exactly_what_the_design_says(deployment):
    url, pw = deployment

    async def run() -> dict[str, set[str]]:
        seen = await asyncio.gather(*(observe(url, pw, user) for user in IDENTITIES))
        by_user = dict(zip(IDENTITIES, seen))
        return {action: {u for u in IDENTITIES if action in by_user[u]} for action in DESIGN}

    observed = asyncio.run(run())
    wrong = {a: (sorted(observed[a]), sorted(DESIGN[a])) for a in DESIGN if observed[a] != DESIGN[a]}
    assert not wrong, "action: (observed, designed) " + json.dumps(wrong, indent=1)

    table = render(observed)
    text = DOC.read_text()
    if os.environ.get("TUNELOOP_WRITE_DOCS"):
        text = re.sub(f"{BEGIN}.*?{END}", f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
        DOC.write_text(text)
    shown = re.search(f"{BEGIN}\n(.*?)\n{END}", text, flags=re.S)
    assert shown and shown.group(1) == table, \
        "docs/reliability.md does not show the observed matrix: rerun with TUNELOOP_WRITE_DOCS=1"


def test_only_the_admin_provisions_and_the_others_are_told_to_ask_for_it(tmp_path, monkeypatch):
    """On a fresh deployment server a service identity may not create the streams: a command
    fails at once naming `tuneloop provision`; `tuneloop provision` as admin creates them all."""
    import subprocess
    import sys

    from tuneloop.bus import Bus, BusError
    from tuneloop.tools.embedded import NatsServer

    from helpers import DEPLOYED_CONF, deployed_tls

    pw = {u: f"pw-{u}" for u in IDENTITIES}
    for user, password in pw.items():
        monkeypatch.setenv(f"TUNELOOP_{user.upper().replace('-', '_')}_PASSWORD", password)
    deployed_tls(tmp_path / "tls", monkeypatch)
    with NatsServer(tmp_path / "nats", config_file=DEPLOYED_CONF) as server:
        async def connect_as(user: str):
            with monkeypatch.context() as m:
                m.setenv("NATS_USER", user)
                m.setenv("NATS_PASSWORD", pw[user])
                return await Bus.connect(server.url, user, patience=10)

        with pytest.raises(BusError, match="may not create them.*tuneloop provision"):
            asyncio.run(connect_as("viewer"))
        done = subprocess.run([sys.executable, "-m", "tuneloop", "provision", "--nats-url", server.url],
                              env={**os.environ, "NATS_USER": "admin", "NATS_PASSWORD": pw["admin"]},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert all(name in done.stdout for name in (subjects.STREAM, subjects.AUDIT_STREAM, *subjects.BUCKETS))

        async def evaluator_works() -> None:
            bus = await connect_as("evaluator")
            kv = await bus.key_value(subjects.SHARD_BUCKET)
            await kv.put("r.req.0000", b"{}")
            await bus.close()

        asyncio.run(evaluator_works())
