"""A real Prometheus (Debian's package) scrapes the services of an embedded run; every PromQL
expression of the dashboards returns data, and promtool accepts the generated config and rules."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nats
import pytest

from helpers import REPO, run_id_for, tiny_config
from tuneloop.tools import dashboards
from tuneloop.config import dump_config

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                reason="needs Debian's prometheus package (apt-get install prometheus; .ci/run does)")
OBS = REPO / "k8s" / "base" / "observability"
TUNELOOP = [sys.executable, "-m", "tuneloop"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query_range(base: str, expr: str, start: float, end: float) -> list:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_generated_files_are_current_and_promtool_accepts_them():
    assert dashboards.main(["--check"]) == 0, "run python -m tuneloop.tools.dashboards"
    for name in ("prometheus-compose.yml",):  # the k8s one needs kubernetes_sd, which Debian's build leaves out
        subprocess.run([PROMTOOL, "check", "config", "--syntax-only", str(OBS / name)], check=True, capture_output=True)
    out = subprocess.run([PROMTOOL, "check", "rules", str(OBS / "prometheus-rules.yml")], capture_output=True, text=True)
    assert out.returncode == 0 and "4 rules found" in out.stdout, out.stdout + out.stderr
    board = json.loads((OBS / "tuneloop-dashboard.json").read_text())
    panels = [p for p in board["panels"] if p["type"] == "timeseries"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"]) and len(panels) >= 20
    assert all(t["expr"] and t["refId"] and t["datasource"]["uid"] == "prometheus" for p in panels for t in p["targets"])


def test_every_dashboard_expression_returns_data_from_a_real_run(tmp_path, nats_url, request):
    run = run_id_for(request)
    cfg = tiny_config(tmp_path, method="grpo", max_steps=10**5, batch_size=8, save_steps=10, logging_steps=1,
                      grpo={"num_generations": 4, "max_completion_length": 16, "rewards": {"protocol": 1, "correctness": 1}})
    # It ends by the operator's stop below, however fast it trains: feedback wants to stop at every
    # verdict (target 0), and each time that becomes a proposal nobody approves (feedback.approve).
    cfg.feedback.target, cfg.feedback.approve = 0.0, ["stop"]
    cfg_path = tmp_path / "prom.yaml"
    dump_config(cfg, cfg_path)
    storage = tmp_path / "runs"
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(OBS / "prometheus-rules.yml")],
        "scrape_configs": [{"job_name": "tuneloop", "file_sd_configs": [
            {"files": [str(storage / run / "prometheus" / "*.json")], "refresh_interval": "1s"}]}],
    }))
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    start = time.time()
    job = subprocess.Popen([*TUNELOOP, "run", str(cfg_path), "--run-id", run, "--nats-url", nats_url],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _trainer_stepped(storage / run), 180, "the trainer never logged a step")
        _wait_for(lambda: len(_targets(base)) >= 5, 60, "Prometheus did not find the 5 services")
        _publish_garbage(nats_url, f"tuneloop.{run}.control")  # a dead letter, counted by the trainer
        # Controls while paused (the run cannot end meanwhile): paused=1 is scraped, and each answer
        # is counted; the annotation query sees them.
        # A guarded set-lr whose guard no verdict can meet: rolled back at the next verdict.
        for command in (["pause"], ["set-log-interval", "1"], ["resume"], ["set-lr", "0.002", "--guard", "correctness>1"]):
            ctl = subprocess.run([*TUNELOOP, "ctl", run, *command, "--storage", str(storage)],
                                 capture_output=True, text=True, timeout=120)
            assert ctl.returncode == 0, ctl.stdout + ctl.stderr
            time.sleep(3)
        _wait_for(lambda: query_range(base, f'tuneloop_guards_total{{run_id="{run}"}}', start, time.time())
                  and query_range(base, f'tuneloop_proposals_total{{run_id="{run}"}}', start, time.time()), 180,
                  "no rollback or proposal scraped")
        ctl = subprocess.run([*TUNELOOP, "ctl", run, "stop", "--storage", str(storage)], capture_output=True, text=True,
                             timeout=120)
        assert ctl.returncode == 0, ctl.stdout + ctl.stderr
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:]
        time.sleep(3)  # one more scrape of everything
        empty = [e for e in dashboards.expressions()
                 if not query_range(base, e.replace("$run", run).replace("$metric", "correctness"), start, time.time())]
        assert not empty, f"expressions without data: {empty}"
        # The dashboard's metric variable offers the task's own metrics (its query, as Grafana runs it).
        match = dashboards.METRIC_VALUES.split("(", 1)[1].rsplit(",", 1)[0].replace("$run", run)
        with urllib.request.urlopen(f"{base}/api/v1/label/metric/values?match[]={urllib.parse.quote(match)}",
                                    timeout=10) as r:
            offered = set(json.loads(r.read())["data"])
        assert offered == {"protocol", "correctness", "exact"}, offered  # the fractions; eval_loss has its panel
        assert query_range(base, f'tuneloop_train_paused{{run_id="{run}"}} == 1', start, time.time()), "pause not seen"
        applied = query_range(base, f'tuneloop_controls_total{{run_id="{run}", outcome="applied"}}', start, time.time())
        # (the trainer may exit before the stop's count is scraped)
        assert {"pause", "resume", "set-log-interval"} <= {s["metric"]["command"] for s in applied}
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as r:
            groups = json.loads(r.read())["data"]["groups"]
        assert [rule["health"] for g in groups for rule in g["rules"]] == ["ok"] * 4
        fired = query_range(base, f'ALERTS{{alertname="TuneloopDeadLetters", run_id="{run}"}}', start, time.time())
        assert fired, "the dead letter did not raise TuneloopDeadLetters"
    finally:
        if job.poll() is None:
            job.terminate()
            job.wait(30)
        prom.terminate()
        prom.wait(30)


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(what)


def _trainer_stepped(rdir: Path) -> bool:
    log = rdir / "logs" / "trainer.log"
    return log.exists() and "'loss'" in log.read_text(errors="replace")


def _targets(base: str) -> list:
    try:
        with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
    except OSError:
        return []
    return [t for t in active if t["health"] == "up"]


def _publish_garbage(url: str, subject: str) -> None:
    import asyncio

    async def go():
        nc = await nats.connect(url)
        await nc.jetstream().publish(subject, b"{not json", headers={"Nats-Msg-Id": f"garbage-{time.time()}"})
        await nc.close()

    asyncio.run(go())
