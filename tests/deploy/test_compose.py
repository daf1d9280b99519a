"""The real compose.yaml, on a real Docker engine, with the images `make images` built: a job
through the whole stack, steered, scaled, killed and stopped from the host, as deployed.

`make test-deploy` runs it (and `.ci/run`, which installs the engine). Grafana is left out:
its image cannot be had here (no registry, and nothing to build it from); the dashboard is
type-checked against Grafana's schema instead (tests/unit/test_deploy.py)."""

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

from helpers import IDENTITIES, REPO, readme_transcript, wait_for
from tuneloop import images
from tuneloop.config import load_config

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1500)]
PROJECT = "tuneloop-deploy-test"
RUN = "deploy"
SERVICES = ("data-pipeline", "trainer", "checkpoint", "evaluator", "rl-reward")
NODES = ("nats", "nats-2", "nats-3")  # the NATS cluster
STACK = (*NODES, "provision", "init", *SERVICES, "prometheus")  # all but grafana
TUNELOOP = [sys.executable, "-m", "tuneloop"]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or "docker-compose"


SAID: list[str] = []


def say(line: str) -> None:
    """A figure of this run, printed and kept for the README's Deploy section."""
    print(line)
    SAID.append(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, tmp: Path):
        self.passwords = {u: secrets.token_hex(12) for u in IDENTITIES}
        self.env_file = tmp / "deploy.env"  # not the repo's .env: the test never touches a user's file
        self.nats_port, self.prom_port = free_port(), free_port()
        self.env_file.write_text("".join(f"TUNELOOP_{u.upper().replace('-', '_')}_PASSWORD={p}\n"
                                         for u, p in self.passwords.items()) +
                                 f"TUNELOOP_RUN_ID={RUN}\nTUNELOOP_CONFIG=examples/deploy.yaml\n"
                                 f"TUNELOOP_NATS_PORT={self.nats_port}\nTUNELOOP_PROMETHEUS_PORT={self.prom_port}\n")
        self.url = f"nats://127.0.0.1:{self.nats_port}"

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run([COMPOSE, "-p", PROJECT, "--env-file", str(self.env_file), "-f", str(REPO / "compose.yaml"),
                              *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and out.returncode:
            raise AssertionError(f"docker compose {' '.join(args)}: {out.stdout}{out.stderr}")
        return out

    def who(self, user: str) -> dict[str, str]:
        return {**os.environ, "NATS_USER": user, "NATS_PASSWORD": self.passwords[user]}

    def containers(self, service: str) -> list[str]:
        return self.compose("--profile", "multinode", "ps", "-q", service).stdout.split()

    def running(self, service: str) -> bool:
        return bool(self.compose("--profile", "multinode", "ps", "-q", "--status", "running", service).stdout.split())

    def volume(self, name: str) -> Path:
        out = subprocess.run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", f"{PROJECT}_{name}"],
                             capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    def host_url(self) -> str:
        """Every node of the NATS cluster, as the host reaches them (nodes 2 and 3 on free ports)."""
        ports = [self.compose("port", node, "4222").stdout.strip().rsplit(":", 1)[1] for node in NODES[1:]]
        return ",".join([self.url, *(f"nats://127.0.0.1:{p}" for p in ports)])

    def ctl(self, *args: str, user: str = "operator") -> subprocess.CompletedProcess:
        return subprocess.run([*TUNELOOP, "ctl", RUN, *args, "--nats-url", self.url, "--timeout", "180"],
                              capture_output=True, text=True, timeout=240, env=self.who(user))


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.fail("no Docker engine answers: `make test-deploy` needs one (.ci/run installs and starts it)")
    s = Stack(tmp_path_factory.mktemp("deploy"))
    s.compose("down", "-v", "--remove-orphans", check=False)
    print("grafana left out: no registry serves grafana/grafana here and nothing builds it; "
          "the dashboard is checked against @grafana/schema instead")
    yield s
    s.compose("logs", "--no-color", check=False)  # kept by pytest's output on failure
    s.compose("down", "-v", "--remove-orphans", check=False)


def test_a_job_runs_through_the_deployed_stack(stack):
    s = stack
    asyncio.run(_scenario(s))


async def _scenario(s: Stack) -> None:
    from tuneloop.bus import Bus
    from tuneloop.events import (CheckpointRecorded, EvalVerdict, ExportDone, Feedback, StepMetrics, TrainingFinished)

    for t in images.TARGETS:
        say(f"image {images.image(t)}: {images.size_mb(images.image(t)):.0f} MB"
            + ("" if t in images.TORCH_TARGETS else " (no torch)"))
    t_up = time.monotonic()
    s.compose("up", "-d", *STACK, timeout=600)
    s.url = s.host_url()
    os.environ.update(NATS_USER="viewer", NATS_PASSWORD=s.passwords["viewer"])
    bus = await Bus.connect(s.url, "deploy-test", patience=60)
    ev = {cls: [] for cls in (StepMetrics, CheckpointRecorded, EvalVerdict, Feedback, TrainingFinished, ExportDone)}
    for cls, got in ev.items():
        async def keep(e, got=got):
            got.append(e)
        await bus.follow(cls, RUN, keep)
    steps = ev[StepMetrics]
    await wait_for(lambda: any(e.loss is not None for e in steps), timeout=600)
    say(f"from `docker compose up` to the first training step: {time.monotonic() - t_up:.1f} s")

    # Steered from the host with the operator identity; the viewer is refused by the server.
    lr = s.ctl("set-lr", "5e-4")
    assert lr.returncode == 0 and "applied set-lr at step" in lr.stdout, lr.stdout + lr.stderr
    paused = s.ctl("pause")
    assert paused.returncode == 0 and "applied pause at step" in paused.stdout, paused.stdout + paused.stderr
    refused = s.ctl("stop", user="viewer")
    assert refused.returncode == 4 and "does not let identity viewer publish" in refused.stdout, refused.stdout

    # While it is paused (its container up), Prometheus finds the trainer and scrapes its step.
    await scraped(s.prom_port, 'tuneloop_train_step{service="trainer"}')

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
    subprocess.run(["docker", "kill", *s.containers("trainer")], check=True, capture_output=True)
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

    # Prometheus inside the stack scraped every service, and a tuneloop metric of each.
    # (over the run: the trainer's container has exited by now)
    up = {r["metric"]["service"]: r["value"][1] for r in prometheus(s.prom_port, "max by (service) (max_over_time(up[30m]))")}
    assert {svc: "1" for svc in SERVICES} == {k: v for k, v in up.items() if k in SERVICES}, up
    for service, metric in (("trainer", "tuneloop_train_step"), ("data-pipeline", "tuneloop_data_sets_total"),
                            ("evaluator", "tuneloop_eval_cases_total"), ("checkpoint", "tuneloop_checkpoints_total"),
                            ("rl-reward", "tuneloop_feedback_total")):
        assert prometheus(s.prom_port, f'max_over_time({metric}{{service="{service}"}}[30m])'), (service, metric)
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
    s.compose("down", "-v", "--remove-orphans", timeout=300)
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                          capture_output=True, text=True, check=True).stdout.split()
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert not left and not volumes, (left, volumes)
    say(f"docker compose down -v: no container, no volume left; the scenario took {time.monotonic() - t_up:.0f} s")
    readme_transcript("deploy-figures", "\n".join(SAID))

