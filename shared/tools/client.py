"""Operator side of the control plane: publish an event and wait for the answer to it."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable

from ..bus import CONNECT_PATIENCE_S, Bus
from ..events import (Control, ControlApplied, ControlRejected, DatasetReady, DeadLetter, Event, ExportDone, ExportRequest,
                     MixtureRequest, Proposal, ProposalDecision, ProposalResolved, StepMetrics, TrainingFinished)


async def _ask(url: str, event: Event, answers: dict[type[Event], Callable[[Event], bool]], timeout: float,
               bus: Bus | None, what: str) -> Event:
    """Publish ``event``; return the first event of ``answers`` whose predicate says it answers it."""
    own = bus is None
    bus = bus or await Bus.connect(url, "ctl", patience=CONNECT_PATIENCE_S)
    subs = []
    try:
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        for cls, matches in answers.items():
            async def on(ev, matches=matches) -> None:
                if matches(ev) and not answer.done():
                    answer.set_result(ev)

            subs.append(await bus.subscribe(cls, event.run_id, on))   # before publishing: no race
        await bus.publish(event)
        try:
            return await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer to {what} from run {event.run_id} within {timeout:.0f}s") from None
    finally:
        if own:
            await bus.close()
        else:  # a shared connection (the sweep's) keeps no subscription per question
            for sub in subs:
                await sub.unsubscribe()


class ControlRefused(ValueError):
    """Not sent: no trainer will ever apply it (the run is unknown here, or finished)."""


async def why_not_live(bus: Bus, run_id: str) -> str | None:
    """Why a control for ``run_id`` would never be applied, or None. Controls are durable: one
    sent to a typo or a finished run would wait in the stream and surprise whoever next starts
    a trainer under that id. An interrupted run resumes, so its controls are kept for it."""
    if not await bus.stored(run_id):
        return f"no run {run_id!r} on this server: nothing was ever published for it (a typo? see `tuneloop runs`)"
    done = await bus.latest(TrainingFinished, run_id)
    if done is not None and done.reason != "interrupted":
        last = await bus.latest(StepMetrics, run_id)
        if last is None or last.time <= done.time:  # no step since: not restarted
            return f"run {run_id} finished at step {done.step} ({done.reason}); no trainer will apply it"
    return None


async def send_control(url: str, run_id: str, command: str, value=None, *, timeout: float = 120.0,
                       bus: Bus | None = None, operator: str | None = None, live_only: bool = False,
                       guard: str | None = None, within: int | None = None,
                       policy: str = "") -> ControlApplied | ControlRejected | Proposal:
    """Publish ``command`` for ``run_id``; return the trainer's ControlApplied or ControlRejected
    (or, for a ``policy``'s command that ``feedback.approve`` names, the Proposal holding it).
    ``live_only``: raise ControlRefused instead of sending to a run that cannot apply it;
    ``guard``/``within``: keep the change only while the next verdicts meet the guard."""
    event = Control(run_id=run_id, command=command, value=value, operator=operator or _whoami(), guard=guard,
                    within=within, policy=policy)
    if live_only:
        own = bus is None
        bus = bus or await Bus.connect(url, "ctl", patience=CONNECT_PATIENCE_S)
        try:
            if reason := await why_not_live(bus, run_id):
                raise ControlRefused(reason)
            return await send_control(url, run_id, command, value, timeout=timeout, bus=bus, operator=event.operator,
                                      guard=guard, within=within, policy=policy)
        finally:
            if own:
                await bus.close()
    mine = lambda ev: ev.control_id == event.event_id  # noqa: E731
    return await _ask(url, event, {ControlApplied: mine, ControlRejected: mine,
                                   Proposal: lambda ev: ev.control_id == event.event_id}, timeout, bus,
                      f"{command!r} (is its trainer running?)")


async def decide_proposal(url: str, run_id: str, proposal_id: str, approve: bool, reason: str = "", *,
                          timeout: float = 120.0, bus: Bus | None = None) -> ProposalResolved:
    """Approve or reject ``proposal_id``; return the trainer's ProposalResolved (applied at its
    next step boundary). Only the operator identity may publish the decision: the server refuses
    anyone else's."""
    event = ProposalDecision(run_id=run_id, proposal_id=proposal_id, decision="approve" if approve else "reject",
                             operator=_whoami(), reason=reason)
    return await _ask(url, event, {ProposalResolved: lambda ev: ev.decision_id == event.event_id}, timeout, bus,
                      f"the decision on proposal {proposal_id} (is its trainer running?)")


async def open_proposals(bus: Bus, run_id: str) -> list[Proposal]:
    """The run's proposals nobody has resolved yet, oldest first."""
    resolved = {r.proposal_id for r in await bus.history(ProposalResolved, run_id)}
    return [p for p in await bus.history(Proposal, run_id) if p.event_id not in resolved]


class MixtureRefused(ValueError):
    """data-pipeline could not prepare the requested mixture; the message says why."""


async def request_mixture(url: str, run_id: str, weights: dict[str, float], reason: str = "", *,
                          timeout: float = 120.0, bus: Bus | None = None) -> DatasetReady:
    """Ask data-pipeline for the run's data with other source weights; return the new ``DatasetReady``."""
    event = MixtureRequest(run_id=run_id, weights=weights, reason=reason or f"requested by {_whoami()}")
    return await _request(url, event, DatasetReady, MixtureRefused, timeout, bus,
                          "the mixture request (is its data-pipeline running?)")


class ExportRefused(ValueError):
    """The checkpoint service could not export; the message says why."""


async def request_merged_export(url: str, run_id: str, reason: str = "", *, timeout: float = 300.0,
                                bus: Bus | None = None) -> ExportDone:
    """Ask the checkpoint service to merge ``run_id``'s exported adapter; return its ``ExportDone``."""
    event = ExportRequest(run_id=run_id, reason=reason or f"requested by {_whoami()}")
    return await _request(url, event, ExportDone, ExportRefused, timeout, bus,
                          "the export request (is its checkpoint service running?)")


async def _request(url: str, event: Event, answer_cls: type[Event], refused: type[Exception], timeout: float,
                   bus: Bus | None, what: str):
    """Publish a request; return the ``answer_cls`` event naming it (``requested_by``), or raise
    ``refused`` with the reason when its service dead-lettered it instead."""
    answer = await _ask(url, event, {
        answer_cls: lambda ev: ev.requested_by == event.event_id,
        DeadLetter: lambda ev: ev.subject.endswith(event.KIND) and event.event_id in ev.payload,
    }, timeout, bus, what)
    if isinstance(answer, DeadLetter):
        raise refused(answer.reason)
    return answer


def _whoami() -> str:
    try:
        return getpass.getuser()[:64]
    except Exception:
        return "operator"
