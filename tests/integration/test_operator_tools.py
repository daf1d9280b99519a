"""What an operator uses around a live run: `tuneloop watch` in a terminal, the training-curve
report, `tuneloop runs` and `tuneloop checkpoints`. One real embedded run serves them all."""

from __future__ import annotations

import asyncio
import fcntl
import html
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time

import pyte
import pytest
from PIL import Image

from helpers import start_job, tiny_config
from tuneloop.config import dump_config
from tuneloop.tools.client import send_control
from tuneloop.events import ControlApplied

TUNELOOP = [sys.executable, "-m", "tuneloop"]
ROWS, COLS = 45, 160


class Terminal:
    """A command in a pseudo-terminal, its output fed to a VT100 emulator: what a person sees."""

    def __init__(self, argv: list[str]):
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: a terminal of the test's size, then the command
            os.environ.update(TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS))
            os.execvp(argv[0], argv)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.stream.feed(data)

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.screen.display)

    def wait_for(self, *needles: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.text()
            if all(n in screen for n in needles):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{needles} not on the screen:\n{self.text()}")

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.2)
        os.kill(self.pid, 9)
        raise AssertionError("the command did not exit")


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, nats_url):
    tmp = tmp_path_factory.mktemp("ops")
    run = f"ops-{int(time.time() * 1000) % 10**8}"
    cfg = tiny_config(tmp, max_steps=80, save_steps=20, logging_steps=2)
    dump_config(cfg, tmp / "ops.yaml")
    storage = tmp / "runs"
    job = start_job(tmp / "ops.yaml", run, "--nats-url", nats_url, live=False)
    # Held while the operator's tools come up (the tiny run trains 80 steps in seconds): sent
    # before training starts, the pause waits in the stream and lands at the first step boundary.
    paused = asyncio.run(send_control(nats_url, run, "pause", timeout=300))
    assert isinstance(paused, ControlApplied) and paused.step < 80, paused
    term = Terminal([*TUNELOOP, "watch", run, "--storage", str(storage)])
    during = term.wait_for(f"run {run}", "loss", "step ", timeout=60)
    ctl = subprocess.run([*TUNELOOP, "ctl", run, "set-lr", "0.001", "--storage", str(storage)],
                         capture_output=True, text=True, timeout=120)
    asyncio.run(send_control(nats_url, run, "resume", timeout=120))
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-3000:]
    code = term.exit_code()
    return {"run": run, "storage": storage, "during": during, "after": term.text(), "watch_exit": code, "ctl": ctl,
            "url": nats_url}


def test_watch_shows_a_live_run_and_the_control_it_answered(watched_run):
    r = watched_run
    assert r["ctl"].returncode == 0, r["ctl"].stdout + r["ctl"].stderr
    applied_at = int(r["ctl"].stdout.split(" at step ")[1].split(":")[0])
    print(r["after"])
    assert r["watch_exit"] == 0  # it left by itself once the run was exported
    screen = r["after"]
    assert f"run {r['run']}" in screen and "finished at step 80" in screen
    assert "step 80/80" in screen and "val protocol" in screen and "latest verdict" in screen
    assert "set-lr" in screen and f"applied at step {applied_at}" in screen and "0.001" in screen
    assert any(ch in screen for ch in "▁▂▃▄▅▆▇█"), "no curve drawn"


def test_report_png_is_a_plot_of_this_run_and_the_html_page_has_config_and_summary(watched_run, tmp_path):
    r = watched_run
    rdir = r["storage"] / r["run"]
    png = Image.open(rdir / "report.png")  # written by the runner at the end
    drawn = json.loads(png.text["Description"])
    assert drawn["steps"][0] <= 2 and drawn["steps"][1] == 80 and drawn["xlim"][1] >= 80
    assert drawn["panels"] == ["loss", "learning rate", "validation score"] and drawn["evaluations"] == 4
    assert [c[1] for c in drawn["controls"]] == ["pause", "set-lr", "resume"]
    assert png.size == (900, 780) and len(png.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50  # not blank

    again = subprocess.run([*TUNELOOP, "report", r["run"], "--storage", str(r["storage"]), "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    page = html.unescape((tmp_path / "report.html").read_text())
    assert "data:image/png;base64," in page and "set-lr" in page and "max_steps: 80" in page
    assert '"stop_reason": "completed' in page
    missing = subprocess.run([*TUNELOOP, "report", "nope", "--storage", str(r["storage"])],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 5 and "no run 'nope'" in missing.stderr


def test_runs_and_checkpoints_list_what_the_run_left(watched_run):
    r = watched_run
    runs = subprocess.run([*TUNELOOP, "runs", "--storage", str(r["storage"])], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})
    line = next(ln for ln in runs.stdout.splitlines() if r["run"] in ln)
    assert "finished" in line and " 80 " in line
    ckpts = subprocess.run([*TUNELOOP, "checkpoints", r["run"], "--storage", str(r["storage"])],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert ckpts.returncode == 0, ckpts.stdout + ckpts.stderr
    rows = {ln.split("│")[1].strip(): ln for ln in ckpts.stdout.splitlines() if ln.count("│") > 3}
    assert {"20", "40", "60", "80"} <= set(rows)
    assert all("yes" in rows[s] for s in ("20", "40", "60", "80"))
    scored = [s for s in ("20", "40", "60", "80") if rows[s].rstrip(" │").split("│")[-1].strip() != "-"]
    assert scored == ["20", "40", "60", "80"], ckpts.stdout


def test_ctl_refuses_a_finished_run_and_an_unknown_run_id_instead_of_queueing_the_control(watched_run):
    r = watched_run
    for run, says in ((r["run"], "finished at step 80 (completed)"), (r["run"] + "x", "no run")):
        out = subprocess.run([*TUNELOOP, "ctl", run, "stop", "--nats-url", r["url"]], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 4 and "not sent" in out.stderr and says in out.stderr, out.stdout + out.stderr
