"""The command line: clear errors for bad input (an unreachable server too), init for deployments, proto check."""

import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from helpers import REPO
from tuneloop.tools.cli import app
from tuneloop.storage import write_run_info

runner = CliRunner()


def test_run_with_a_broken_config_names_the_field_and_starts_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {sources: [{path: x.jsonl}]}\ntrain: {max_step: 5}\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "train.max_step" in result.output and "Extra inputs" in result.output
    assert not (tmp_path / "runs").exists()


def test_init_writes_the_run_directory_services_read(tmp_path):
    result = runner.invoke(app, ["init", str(REPO / "examples" / "protocol-tiny.yaml"), "--run-id", "demo",
                                 "--storage", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from tuneloop.storage import load_run_config

    cfg = load_run_config(tmp_path, "demo")
    assert cfg.resolve(cfg.data.sources[0].path).is_file()
    bad = runner.invoke(app, ["init", str(REPO / "examples" / "protocol-tiny.yaml"), "--run-id", "no/slash",
                              "--storage", str(tmp_path)])
    assert bad.exit_code == 2 and "invalid run id" in bad.output


def test_ctl_on_an_unknown_run_says_where_it_looked(tmp_path):
    result = runner.invoke(app, ["ctl", "ghost", "stop", "--storage", str(tmp_path)])
    assert result.exit_code == 5 and "no run 'ghost'" in result.output  # not found


def test_proto_check_passes_on_the_repo():
    result = runner.invoke(app, ["proto", "--check", "--out", str(REPO / "proto")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", [["ctl", "gone", "stop"], ["watch", "gone"], ["audit", "gone"]])
def test_commands_against_a_server_that_is_gone_say_so_and_do_not_hang(tmp_path, command):
    """A finished embedded run's server is gone: its run.json still names it. The command
    gives up after TUNELOOP_CONNECT_PATIENCE seconds, naming the URL (exit 3), instead of
    retrying forever."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "gone").mkdir()
    write_run_info(tmp_path, "gone", {"run_id": "gone", "nats_url": url, "state": "complete"})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tuneloop", *command, "--storage", str(tmp_path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TUNELOOP_CONNECT_PATIENCE": "2", "COLUMNS": "200"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"no NATS server answered at {url} within 2s" in proc.stderr and not proc.stdout
    assert time.monotonic() - t0 < 30


def test_runs_never_cuts_a_run_id_even_in_a_narrow_terminal(tmp_path):
    run_id = "protocol-sweep-with-a-long-name-20261126-041421-sft"
    (tmp_path / run_id).mkdir()
    write_run_info(tmp_path, run_id, {"run_id": run_id, "state": "complete", "started": "2026-11-26T04:14:21"})
    proc = subprocess.run([sys.executable, "-m", "tuneloop", "runs", "--storage", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert run_id in proc.stdout, proc.stdout


def test_runs_reads_the_typed_summaries_and_says_when_one_is_broken(tmp_path):
    from tuneloop.tools.summary import JobSummary, PhaseSummary, RunSummary, Scores, summary_row, write

    scores = Scores(cases=10, protocol=1.0, correctness=0.5, mean_new_tokens=9.0)
    write(RunSummary(run_id="r", run_dir="r", method="sft", processes=1, steps=80, stop_reason="feedback: target",
                     test=scores), tmp_path)
    assert summary_row(tmp_path / "summary.json") == ("80", "feedback", scores)
    phases = [PhaseSummary(run_id=f"j-{p}", run_dir="x", method=p, processes=1, steps=n, stop_reason="completed: x",
                           phase=p) for p, n in (("sft", 40), ("grpo", 20))]
    write(JobSummary(job_id="j", run_dir="j", phases=phases, test=scores), tmp_path)
    assert summary_row(tmp_path / "summary.json") == ("40+20", "completed", scores)
    (tmp_path / "summary.json").write_text('{"run_id": "r", "steps": "many"')
    steps, stopped, test = summary_row(tmp_path / "summary.json")
    assert (steps, test) == ("-", None) and stopped.startswith("unreadable summary.json: ")
    assert summary_row(tmp_path / "none.json") == ("-", "-", None)


def test_run_set_changes_are_checked_like_the_file_and_a_malformed_one_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {sources: [{path: x.jsonl}]}\n")
    for change, says in (("train.max_steps=0", "train.max_steps=0"), ("train.max_steps=0", "greater than or equal to 1"),
                         ("train.trl.neftune_noise_alfa=5", "did you mean neftune_noise_alpha"),
                         ("train.max_steps", "expected KEY=VALUE")):
        result = runner.invoke(app, ["run", str(cfg), "--set", change])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists()


def test_version_is_the_installed_one():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"tuneloop {version('tuneloop')}"
