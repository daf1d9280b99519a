"""Approval gates over the deployment's own nats-server config (every service with its own
identity), with real training, real verdicts and the real feedback policy.

With ``feedback.approve: [stop, prune]`` the policies' actions wait for an operator: nothing
stops until `tuneloop approve`, `reject` keeps training, only the operator identity may
decide (the server refuses the others), `watch` shows what is open, and a proposal nobody
answers does what the config says when its time is up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from helpers import collect, make_run, readme_transcript, run_id_for, tiny_config, wait_for
from test_operator_tools import Terminal
from tuneloop.bus import Bus
from tuneloop.events import Proposal, ProposalResolved, StepMetrics, TrainingFinished

pytestmark = pytest.mark.integration
TUNELOOP = [sys.executable, "-m", "tuneloop"]
SERVICES = ("data-pipeline", "checkpoint", "evaluator", "rl-reward", "trainer")


def config(tmp, **feedback):
    cfg = tiny_config(tmp, max_steps=100000, save_steps=20, logging_steps=1, learning_rate=3e-3)
    # target 0: every verdict makes the policy want to stop.
    return cfg.model_copy(update={"feedback": cfg.feedback.model_copy(update={"target": 0.0, **feedback})})


def identity(passwords: dict, user: str) -> dict[str, str]:
    return {"NATS_USER": user, "NATS_PASSWORD": passwords[user]}


def decide(verb: str, run: str, url: str, who: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNELOOP, verb, run, *args, "--nats-url", url], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **who})


async def test_nothing_stops_until_the_operator_approves(tmp_path, secured, services, request, monkeypatch):
    url, pw = secured
    run = run_id_for(request)
    storage = make_run(tmp_path, run, config(tmp_path, approve=["stop", "prune"], approve_timeout_s=600))
    svc = services(storage, url, run)
    for name in SERVICES:
        svc.start(name, env=identity(pw, name))
    monkeypatch.setenv("NATS_USER", "viewer")  # the test watches with the read-only identity
    monkeypatch.setenv("NATS_PASSWORD", pw["viewer"])
    bus = await Bus.connect(url, "test-viewer")
    ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, Proposal, ProposalResolved, TrainingFinished)}
    term = Terminal([*TUNELOOP, "watch", run, "--nats-url", url])

    await wait_for(lambda: ev[Proposal], timeout=240)
    first = ev[Proposal][0]
    assert (first.command, first.proposer, first.on_timeout) == ("stop", "feedback", "reject"), first
    assert first.verdict_step is not None and "target reached" in first.reason
    screen = await asyncio.to_thread(term.wait_for, "open proposal", first.event_id, timeout=60)
    print(screen)
    # Training goes on while it waits.
    await wait_for(lambda: ev[StepMetrics][-1].step > first.step + 20, timeout=120)
    assert not ev[TrainingFinished]

    # The policies themselves, and anyone else but the operator, are refused by the server.
    for user in ("trainer", "viewer", "rl-reward"):
        refused = await asyncio.to_thread(decide, "approve", run, url, identity(pw, user), first.event_id)
        assert refused.returncode == 4 and f"does not let identity {user} publish" in refused.stderr, (user, refused.stderr)
    assert not [r for r in ev[ProposalResolved] if r.outcome != "unknown"]

    operator = identity(pw, "operator")
    no = await asyncio.to_thread(decide, "reject", run, url, operator, first.event_id, "--reason", "let it train on")
    assert no.returncode == 0 and "rejected stop at step" in no.stdout and "not applied" in no.stdout, no.stdout + no.stderr
    rejected = next(r for r in ev[ProposalResolved] if r.proposal_id == first.event_id)
    assert rejected.outcome == "rejected" and not rejected.applied and rejected.reason == "let it train on"
    await wait_for(lambda: ev[StepMetrics][-1].step > rejected.step + 20, timeout=120)
    assert not ev[TrainingFinished]

    # A sweep's prune is held the same way; `approve` with no id lists what is open.
    pruned = await asyncio.to_thread(_policy_prune, url, run, operator)
    assert pruned.startswith("Proposal prune"), pruned
    listing = await asyncio.to_thread(decide, "approve", run, url, operator)
    assert "prune fell behind  proposed by median pruner" in listing.stdout, listing.stdout
    prune_id = next(p.event_id for p in ev[Proposal] if p.command == "prune")
    assert (await asyncio.to_thread(decide, "reject", run, url, operator, prune_id)).returncode == 0

    await wait_for(lambda: len([p for p in ev[Proposal] if p.command == "stop"]) >= 2, timeout=240)
    second = [p for p in ev[Proposal] if p.command == "stop"][1]
    yes = await asyncio.to_thread(decide, "approve", run, url, operator, second.event_id)
    assert yes.returncode == 0 and "approved stop at step" in yes.stdout and ": applied" in yes.stdout, yes.stdout
    await wait_for(lambda: ev[TrainingFinished], timeout=120)
    approved = next(r for r in ev[ProposalResolved] if r.proposal_id == second.event_id)
    done = ev[TrainingFinished][0]
    assert done.reason == "feedback" and done.step == approved.step and "approved by" in done.detail, done
    assert term.exit_code() == 0
    readme_transcript("approval-transcript", "\n".join([
        f"$ tuneloop watch {run}    # while the first proposal waits", screen.rstrip(),
        f"$ NATS_USER=rl-reward tuneloop approve {run} {first.event_id}    # a policy approving itself", refused.stdout.rstrip(),
        f"$ tuneloop reject {run} {first.event_id} --reason 'let it train on'", no.stdout.rstrip(),
        f"$ tuneloop approve {run}    # no id: what is open", listing.stdout.rstrip(),
        f"$ tuneloop approve {run} {second.event_id}", yes.stdout.rstrip()]))

    audit = await asyncio.to_thread(subprocess.run, [*TUNELOOP, "audit", run, "--nats-url", url], capture_output=True,
                                    text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    kinds = [ln.split()[2] for ln in audit.stdout.splitlines() if ln[:2] == "20"]
    assert kinds.count("proposal") == 3 and kinds.count("proposal.decision") == 3, kinds
    assert kinds.count("proposal.resolved") == 3, kinds
    await bus.close()


def _policy_prune(url: str, run: str, who: dict) -> str:
    """A sweep's pruner asking to prune (as the sweep does, with the operator identity)."""
    code = ("import asyncio,sys; from tuneloop.tools.client import send_control; "
            "a = asyncio.run(send_control(sys.argv[1], sys.argv[2], 'prune', 'fell behind', timeout=120, "
            "policy='median pruner')); print(type(a).__name__, a.command)")
    out = subprocess.run([sys.executable, "-c", code, url, run], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **who})
    return out.stdout.strip() or out.stderr[-2000:]


async def test_a_proposal_nobody_answers_does_what_the_config_says(tmp_path, nats_url, bus, services, request):
    run = run_id_for(request)
    storage = make_run(tmp_path, run, config(tmp_path, approve=["stop"], approve_timeout_s=5, on_timeout="apply"))
    ev = {cls: await collect(bus, cls, run) for cls in (StepMetrics, Proposal, ProposalResolved, TrainingFinished)}
    svc = services(storage, nats_url, run)
    for name in SERVICES:
        svc.start(name)
    await wait_for(lambda: ev[Proposal], timeout=240)
    proposed = time.monotonic()
    await wait_for(lambda: ev[TrainingFinished], timeout=120)
    waited = time.monotonic() - proposed
    [resolved] = ev[ProposalResolved]
    assert resolved.outcome == "timed-out" and resolved.applied and resolved.by == "timeout", resolved
    assert waited >= 4.0, waited  # not before its time (5 s, less the delivery of the proposal itself)
    assert ev[StepMetrics][-1].step > ev[Proposal][0].step  # it trained meanwhile
    assert ev[TrainingFinished][0].reason == "feedback" and ev[TrainingFinished][0].step == resolved.step
