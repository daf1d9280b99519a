"""Approval gates, the trainer's part: what an automatic policy wants to do (feedback's early
stop, adaptive data's set-data, a sweep's prune) becomes a ``Proposal`` when the config's
``feedback.approve`` names it, and waits for ``tuneloop approve`` / ``reject``; training goes
on meanwhile. The trainer holds the proposals because it is where each of these actions takes
effect, at a step boundary: an answer, or the timeout, is applied there like a control.

Open proposals live in ``Steering.proposals`` (saved with every checkpoint and in the run's
applied-controls file), so a restarted trainer still knows them and their deadlines. Pure,
apart from the clock the caller passes in.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from tuneloop import controls
from tuneloop.config import FeedbackSection
from tuneloop.controls import OpenProposal
from tuneloop.events import Control, Feedback, Proposal, ProposalResolved, derived_id

from .effects import Boundary, Effects

log = logging.getLogger(__name__)


@dataclass
class TimedOut:
    """Rank 0 saw ``proposal_id``'s deadline pass (broadcast, so every rank acts on it alike)."""

    proposal_id: str


def proposal_id(source_event_id: str) -> str:
    """A short id an operator can type (``tuneloop approve RUN p-1a2b3c4d5e``), the same for the
    same policy event: a redelivered one proposes nothing new."""
    return "p-" + hashlib.sha256(source_event_id.encode()).hexdigest()[:10]


def gated(settings: FeedbackSection, command: str) -> bool:
    return command in settings.approve


def for_control(settings: FeedbackSection, event: Control, step: int) -> Proposal:
    """The proposal holding a policy's control (adaptive data's set-data, a sweep's prune)."""
    return Proposal(run_id=event.run_id, event_id=proposal_id(event.event_id), command=event.command,
                    value=event.value, reason=str(event.value) if event.command == "prune" and event.value else
                    f"{event.policy or event.operator} asks for {event.command} {event.value or ''}".strip(),
                    proposer=event.policy or event.operator or event.source, step=step, control_id=event.event_id,
                    timeout_s=settings.approve_timeout_s, on_timeout=settings.on_timeout)


def for_feedback(settings: FeedbackSection, fb: Feedback, step: int) -> Proposal:
    """The proposal holding feedback's early stop."""
    return Proposal(run_id=fb.run_id, event_id=proposal_id(fb.event_id), command="stop", reason=fb.reason,
                    proposer="feedback", step=step, verdict_step=fb.step, verdict_id=fb.verdict_id, score=fb.score,
                    timeout_s=settings.approve_timeout_s, on_timeout=settings.on_timeout)


def record(proposal: Proposal, control: Control | None, now: float) -> OpenProposal:
    """What ``Steering.proposals`` keeps of an open proposal."""
    return OpenProposal(proposal=proposal.model_dump(mode="json"), deadline=now + proposal.timeout_s,
                        control=control.model_dump(mode="json") if control else None)


def expired(proposals: dict[str, OpenProposal], now: float) -> list[str]:
    return [pid for pid, p in proposals.items() if p.deadline <= now]


def open_summary(proposals: dict[str, OpenProposal]) -> str:
    return ", ".join(f"{pid} ({p.command})" for pid, p in proposals.items()) or "none"


# ---------------------------------------------------------------- decisions (the Steerer's)
def propose(steer, proposal: Proposal, held: Control | None, at: Boundary) -> Effects:
    """Hold ``proposal`` (and the control it holds) open in ``steer``'s state; answer with it."""
    steer.state.proposals[proposal.event_id] = record(proposal, held, at.now)
    log.info("proposal %s: %s (%s); waiting for an operator, at most %gs", proposal.event_id, proposal.command,
             proposal.reason, proposal.timeout_s)
    return Effects(answer=proposal, write_steering=True)


def resolve(steer, pid: str, apply: bool, outcome: str, by: str, reason: str, at: Boundary,
            decision_id: str | None = None) -> Effects:
    """Answer proposal ``pid`` of ``steer`` (a ``steering.Steerer``): apply what it holds
    (``apply``) as if it came now, or drop it."""
    held = steer.state.proposals.pop(pid, None)
    if held is None:
        return Effects(answer=ProposalResolved(
            run_id=steer.run_id, event_id=derived_id("resolved", decision_id or pid), proposal_id=pid, command="",
            outcome="unknown", applied=False, step=at.step, by=by, decision_id=decision_id,
            reason=f"no open proposal {pid!r} (open: {open_summary(steer.state.proposals)})"))
    proposal = Proposal.model_validate(held.proposal)
    fx, applied, note = Effects(write_steering=True), False, reason
    if apply:
        try:
            if held.control is not None:  # the policy's control, applied as if it came now
                fx.merge(steer.apply(Control.model_validate(held.control), at))
            elif steer.stop_reason is None:  # feedback's stop
                fx.stop = True
                steer.stop_reason = ("feedback", f"{proposal.reason} ({outcome} by {by})")
            else:
                raise controls.Rejected(f"already stopping ({steer.stop_reason[0]})")
            applied = True
        except controls.Rejected as e:
            note = f"{reason}; not applied: {e}" if reason else f"not applied: {e}"
    log.info("proposal %s %s by %s at step %d: %s %s", pid, outcome, by, at.step, proposal.command,
             "applied" if applied else "not applied")
    fx.answer = ProposalResolved(run_id=steer.run_id, event_id=derived_id("resolved", decision_id or pid),
                                 proposal_id=pid, command=proposal.command, outcome=outcome, applied=applied,
                                 step=at.step, by=by, reason=note, decision_id=decision_id)
    return fx
