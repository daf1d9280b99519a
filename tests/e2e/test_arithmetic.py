"""A task of another shape, end to end on the real pretrained model: `tuneloop run
examples/arithmetic.yaml` teaches SmolLM2-135M-Instruct word problems answered in plain text
(`Answer: <number>`), judged only by the metrics its config declares (a regex format, a regex
capture against the reference, a Python check), then a GRPO phase rewarded by a declared
metric and a TRL-signature function given by import path. Its transcript is docs/your-task.md's."""

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from helpers import REPO, example_config, readme_transcript

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
DECLARED = ["answer_line", "correct", "work_right"]
REWARD_FUNCTION = "arithmetic.rewards:close_answer"


def scrape(run_dir: Path, service: str) -> str:
    """What Prometheus would scrape from ``service``'s /metrics in this run (its file_sd targets)."""
    out = []
    for target in (run_dir / "prometheus").glob(f"{service}-*.json"):
        try:
            [entry] = json.loads(target.read_text())
            with urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=5) as r:
                out.append(r.read().decode())
        except (OSError, ValueError):
            continue  # the process is starting or gone
    return "\n".join(out)


def labels(text: str, series: str, label: str) -> set[str]:
    return set(re.findall(rf'^{series}{{[^}}]*{label}="([^"]+)"', text, re.M))


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arithmetic")
    config = example_config(tmp, "arithmetic.yaml")
    runs = tmp / "runs"
    t0 = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "tuneloop", "run", str(config), "--run-id", "arith"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # While it runs, the series the dashboard reads, as the services expose them: the evaluator's
    # scores by metric (once the baseline verdict is in), rl-reward's rewards by function (GRPO).
    seen: dict[str, set[str]] = {"metrics": set(), "rewards": set()}
    while job.poll() is None and not ({*DECLARED} <= seen["metrics"] and REWARD_FUNCTION in seen["rewards"]):
        seen["metrics"] |= labels(scrape(runs / "arith-sft", "evaluator"), "tuneloop_eval_score", "metric")
        seen["rewards"] |= labels(scrape(runs / "arith-grpo", "rl-reward"), "tuneloop_reward_sum_total", "function")
        time.sleep(1)
    stdout, _ = job.communicate(timeout=2400)
    assert job.returncode == 0, stdout[-4000:]
    summary = json.loads((runs / "arith" / "summary.json").read_text())
    jsonschema.validate(summary, json.loads((REPO / "proto" / "summaries" / "job.json").read_text()))
    return summary, stdout, seen, runs, time.perf_counter() - t0


def test_the_declared_format_is_learnt_and_correctness_rises_above_the_base(arithmetic_run):
    summary, stdout, _, _, seconds = arithmetic_run
    sft, grpo = summary["phases"]
    before, after = sft["baseline"], sft["test"]
    # The pretrained model answers in prose: no Answer line. After SFT, held-out prompts get one.
    assert before["cases"] == after["cases"] >= 40 and before["answer_line"] <= 0.1, before
    assert after["answer_line"] >= 0.9, after
    assert after["correct"] > before["correct"] and after["work_right"] > before["work_right"], (before, after)
    assert after["eval_loss"] < before["eval_loss"], (before, after)  # held-out loss needs no declaration
    # Every view carries the task's own names, none of the protocol example's.
    assert sft["metrics"] == [*DECLARED, "eval_loss"] and all(set(DECLARED) <= set(v) for v in sft["evaluations"])
    verdict_lines = [line for line in stdout.splitlines() if "verdict step" in line]
    assert verdict_lines and all("answer_line" in line for line in verdict_lines)
    assert "protocol" not in stdout and "correctness" not in stdout
    # The GRPO phase starts from the SFT export and keeps the format.
    assert grpo["method"] == "grpo" and grpo["steps"] >= 1 and grpo["test"]["answer_line"] >= 0.9, grpo
    lines = [line for line in stdout.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if "tuneloop job arith" in line)
    readme_transcript("arithmetic-summary", "\n".join([
        *lines[start:],
        f"the whole job took {seconds:.0f} s on this machine (services, base, baselines, SFT, GRPO, evaluations, exports)"]))


def test_the_dashboard_series_carry_the_metric_names_and_the_reward_function(arithmetic_run):
    _, _, seen, _, _ = arithmetic_run
    assert {*DECLARED, "exact", "eval_loss", "perplexity"} <= seen["metrics"], seen
    assert not {"protocol", "correctness"} & seen["metrics"]
    assert REWARD_FUNCTION in seen["rewards"] and "correct" in seen["rewards"], seen  # served by import path


def test_the_quality_gate_drops_by_the_format_metric_and_the_report_names_the_metrics(arithmetic_run):
    _, _, _, runs, _ = arithmetic_run
    [quality] = (runs / "arith-sft" / "data").glob("*/quality.json")
    q = json.loads(quality.read_text())
    # The older assistant's prose answers (a tenth of the rows) fail answer_line and are dropped.
    assert q["dropped"]["format_violation"] == q["findings"]["format_violation"] >= 100, q
    assert all("answer_line: regex: no match" in e["detail"] for e in q["examples"]["format_violation"])
    report = (runs / "arith-sft" / "report.html").read_text()
    assert all(f"<th>{m}</th>" in report for m in DECLARED) and "<th>protocol</th>" not in report
