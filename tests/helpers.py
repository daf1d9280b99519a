"""Helpers for tests: small configs, run directories, real service processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema

from tuneloop import topology
from tuneloop.generated import replace_block
from tuneloop.config import Config, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
# The deployment's own nats-server config, and every identity it knows (tests/conftest.py: ``secured``).
DEPLOYED_CONF = REPO / "k8s" / "base" / "nats" / "nats.conf"
IDENTITIES = topology.IDENTITIES
EXAMPLE_DATA = REPO / "examples" / "data" / "protocol.jsonl"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu", "overlays/multinode", "overlays/sweep"]


def kustomize(kustomization: str) -> list[dict]:
    """The manifests ``kubectl kustomize k8s/<kustomization>`` builds."""
    import shutil

    import yaml

    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / kustomization)], capture_output=True, text=True,
                         check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def protocol_task() -> dict:
    """The example's task declaration (examples/protocol.yaml), for configs on its data."""
    return load_config(REPO / "examples" / "protocol.yaml").task.model_dump(mode="json")


def tiny_config(tmp_path: Path, **train) -> Config:
    """A config for a very small, fast model on the first rows of the example data (and its task)."""
    return Config.model_validate({
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "task": protocol_task(),
        "data": {"sources": [{"path": str(EXAMPLE_DATA)}], "max_rows": 600, "val_fraction": 0.05, "test_fraction": 0.05},
        "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "vocab_size": 300}},
        "train": {"max_steps": 20, "batch_size": 8, "logging_steps": 1, "save_steps": 1000, "max_length": 96, **train},
        "eval": {"max_cases": 8, "max_new_tokens": 16},
        "base_dir": str(tmp_path),
    })


def deployed_tls(folder: Path, monkeypatch) -> Path:
    """Certificates for a server started from the deployment's nats.conf (its TLS paths in this
    process's environment, which the server and every client inherit: NATS_TLS_CA). Returns the CA."""
    from tuneloop import tls

    made = tls.make_certificates(folder)
    for key, value in tls.server_env(folder).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NATS_TLS_CA", str(made[tls.CA]))
    return made[tls.CA]


def tls_options() -> dict:
    """nats.connect's TLS option for a raw client, as tuneloop's own clients take it (NATS_TLS_CA)."""
    from tuneloop.bus import credentials

    return {"tls": credentials()["tls"]} if os.environ.get("NATS_TLS_CA") else {}


def make_run(tmp_path: Path, run_id: str, cfg: Config) -> Path:
    storage = tmp_path / "runs"
    rdir = storage / run_id
    rdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, rdir / "config.yaml")
    return storage


class Services:
    """Real service processes for a test; all stopped (and checked stopped) at the end."""

    def __init__(self, storage: Path, url: str, run_id: str):
        self.storage, self.url, self.run_id = storage, url, run_id
        self.procs: dict[str, subprocess.Popen] = {}  # the latest process of each service
        self.every: list[subprocess.Popen] = []         # replicas too: all are stopped at the end

    def start(self, name: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a service; ``env`` adds to the environment (e.g. its NATS identity)."""
        log = open(self.storage / f"{name}.log", "ab")
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        p = subprocess.Popen([sys.executable, "-m", "tuneloop." + name.replace("-", "_"), "--run-id", self.run_id,
                              "--storage", str(self.storage), "--nats-url", self.url, "--parent-pid", str(os.getpid()),
                              *flags],
                             stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = p
        self.every.append(p)
        return p

    def kill(self, which: str | subprocess.Popen) -> None:
        """SIGKILL a service (by name: its latest process) and every process it started
        (torchrun's ranks): a machine gone."""
        p = self.procs[which] if isinstance(which, str) else which
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def log(self, name: str) -> str:
        return (self.storage / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in self.every:
            if p.poll() is None:
                p.terminate()
        for p in self.every:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def run_id_for(request) -> str:
    return (request.node.name.replace("[", "-").replace("]", "")[:40] + f"-{int(time.time() * 1000) % 10**8}")


async def collect(bus, cls, run_id):
    """A list that fills with every live ``cls`` event of ``run_id`` from now on."""
    got: list = []

    async def on(ev):
        got.append(ev)

    await bus.subscribe(cls, run_id, on)
    return got


async def wait_for(pred, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def kv_records(bucket, contains: str) -> dict[str, dict]:
    """The JSON records of a KV bucket whose key contains ``contains``; an empty bucket has none
    (nats-py raises NoKeysError for it, which a poll that starts early must not die of)."""
    from nats.js.errors import KeyNotFoundError, NoKeysError

    try:
        keys = await bucket.keys()
    except NoKeysError:
        return {}
    out = {}
    for k in keys:
        if contains in k:
            try:
                out[k] = json.loads((await bucket.get(k)).value)
            except KeyNotFoundError:
                continue
    return out


async def stored(url: str, run_id: str, kinds) -> dict:
    """Every event of ``kinds`` the stream keeps for ``run_id`` (what the system holds, after
    JetStream's de-duplication; live subscribers may also see a duplicate publish)."""
    from tuneloop.bus import Bus

    from tuneloop import subjects

    bus = await Bus.connect(url, "replay")
    got = {k: [] for k in kinds}
    kept: dict = {}  # kind -> how many the stream holds now: read until each is in, however slow the machine

    async def keep(e):
        got[type(e)].append(e)

    for k in kinds:
        subject = subjects.subject(run_id, k.KIND)
        info = await bus.js.stream_info(subjects.STREAM, subjects_filter=subject)
        kept[k] = sum((info.state.subjects or {}).values())
        await bus.follow(k, run_id, keep)
    await wait_for(lambda: all(len(got[k]) >= n for k, n in kept.items()), timeout=120)
    await bus.close()
    return got


def every_checkpoint_judged(got: dict) -> bool:
    """Each checkpoint saved (not a snapshot) has its verdict and its feedback in the stream."""
    from tuneloop.events import CheckpointSaved, EvalVerdict, Feedback

    saved = {e.step for e in got[CheckpointSaved] if not e.snapshot}
    return saved <= {v.step for v in got[EvalVerdict] if v.purpose == "periodic"} and saved <= {f.step for f in got[Feedback]}


async def stored_when(url: str, run_id: str, kinds, settled, timeout: float = 180.0) -> dict:
    """``stored`` read again until ``settled(got)`` holds (work still arriving after a run ended:
    the last checkpoint's verdict and feedback); after ``timeout``, what is there, for the
    test's own assertions to name what is missing."""
    deadline = time.monotonic() + timeout
    while True:
        got = await stored(url, run_id, kinds)
        if settled(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(1.0)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (e.g. a test's tmp path): what was left behind."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


def start_job(config: Path, run_id: str, *flags: str, timeout: float = 180, live: bool = True) -> subprocess.Popen:
    """``tuneloop run CONFIG --run-id RUN_ID [flags]`` as a user starts it, returned once its
    trainer logged a training loss (the run is live), or at once with ``live=False``."""
    cfg = load_config(config)
    storage = Path(cfg.resolve(cfg.run.output_dir))
    job = subprocess.Popen([sys.executable, "-m", "tuneloop", "run", str(config), "--run-id", run_id, *flags],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = storage / run_id / "logs" / "trainer.log"
    deadline = time.time() + timeout
    while live and time.time() < deadline and not (log.exists() and "'loss'" in log.read_text(errors="replace")):
        assert job.poll() is None, job.communicate()[0][-3000:]
        time.sleep(0.3)
    return job


def readme_transcript(name: str, text: str) -> None:
    """Print ``text`` (a real session of this test) and, with ``TUNELOOP_WRITE_DOCS=1``, put it
    between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in the README or the page of docs/
    that has them: transcripts there are what a test saw, never typed in."""
    print(text)
    if not os.environ.get("TUNELOOP_WRITE_DOCS"):
        return
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    page = next((p for p in pages if begin in p.read_text() and end in p.read_text()), None)
    if page is None:
        raise AssertionError(f"neither README.md nor docs/ has a {begin} ... {end} section")
    page.write_text(replace_block(page.read_text(), begin, end, f"```\n{text.rstrip()}\n```", str(page)))


TUNELOOP_CLI = [sys.executable, "-m", "tuneloop"]


def example_config(tmp_path: Path, name: str = "protocol-tiny.yaml", **train) -> Path:
    """An example config with its runs under ``tmp_path`` (and ``train`` settings changed)."""
    cfg = load_config(REPO / "examples" / name)
    cfg.run.output_dir = str(tmp_path / "runs")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    path = tmp_path / name
    dump_config(cfg, path)
    return path


def run_job(tmp: Path, name: str, run_id: str, timeout: float, schema: str = "job", *flags: str) -> tuple[dict, str]:
    """``tuneloop run`` of an example job as a user starts it (``flags``: more of its options):
    (its summary.json, what it printed)."""
    proc = subprocess.run([*TUNELOOP_CLI, "run", str(example_config(tmp, name)), "--run-id", run_id, *flags],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp / "runs" / run_id / "summary.json").read_text())
    # What users script against has the shape proto/ publishes.
    jsonschema.validate(summary, json.loads((REPO / "proto" / "summaries" / f"{schema}.json").read_text()))
    return summary, proc.stdout


def own_server_env(columns: int = 200) -> dict:
    """The environment of a CLI command that must use its own NATS server (a sweep finds its
    state in its own store when started again), with a wide terminal for its tables."""
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("NATS_URL", None)
    return env
