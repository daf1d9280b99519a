"""rl-reward service: serves reward requests (queue group) and turns periodic verdicts into feedback.

The feedback policy's memory of each run (best score, evaluations since, what was decided for
each verdict) lives in the KV bucket ``tuneloop-policy``, updated by compare-and-set: any
number of replicas, and a restarted one, decide as one replica that never stopped would."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from tuneloop import metrics, subjects
from tuneloop.events import ControlRolledBack, EvalVerdict, RewardReply, RewardRequest, derived_id
from tuneloop.service import ServiceContext, consume_handlers, handles, run_service

from . import rewards
from tuneloop.policy import PolicyState, decide, rewind

log = logging.getLogger("tuneloop.rl_reward")


def score_batch(req: RewardRequest, scorer: rewards.Rewards, parts: dict[str, list[float]] | None = None) -> RewardReply:
    """One reward or one error per completion; a bad item never fails the batch. With ``parts``,
    each function's own reward per scored item is collected there too (for the metrics)."""
    out, errors = scorer.score(req, parts)
    return RewardReply(run_id=req.run_id, rewards=out, errors=errors)


def record(req: RewardRequest, reply: RewardReply | None, parts: dict[str, list[float]], seconds: float) -> None:
    run = req.run_id
    metrics.REWARD_REQUESTS.labels(run, "ok" if reply else "error").inc()
    metrics.REWARD_SECONDS.labels(run).observe(seconds)
    for name, values in parts.items():
        metrics.REWARD_ITEMS.labels(run, name, "scored").inc(len(values))
        metrics.REWARD_SUM.labels(run, name).inc(sum(values))
    if reply:
        metrics.REWARD_ITEMS.labels(run, "combined", "error").inc(sum(e is not None for e in reply.errors))


class RewardService:
    """The service's handlers, each declared beside its code with what it consumes
    (``handles``; the reward requests are served, not consumed: see ``main``)."""

    def __init__(self, ctx: ServiceContext, kv):
        self.ctx, self.kv = ctx, kv  # kv: the feedback policy's state per run
        self.scorers: dict[tuple, rewards.Rewards] = {}

    def scorer(self, run_id: str) -> rewards.Rewards:
        """The run's rewards, its task's functions imported once per run and config."""
        cfg = self.ctx.config(run_id)
        key = (run_id, cfg.task.model_dump_json(), cfg.base_dir)
        if key not in self.scorers:
            self.scorers[key] = rewards.Rewards(cfg.task, cfg.base_dir)
        return self.scorers[key]

    async def on_reward(self, req: RewardRequest) -> RewardReply:
        t0, parts, reply = time.perf_counter(), {}, None
        try:
            reply = await asyncio.to_thread(score_batch, req, self.scorer(req.run_id), parts)
            return reply
        finally:
            record(req, reply, parts, time.perf_counter() - t0)

    @handles(EvalVerdict)
    async def on_verdict(self, verdict: EvalVerdict) -> None:
        if verdict.purpose != "periodic":
            return
        run_cfg = self.ctx.config(verdict.run_id)
        cfg, margin = run_cfg.feedback, run_cfg.data.adapt.margin

        def decide_on(state: PolicyState):
            return state, decide(cfg, state, verdict, margin) or state.decided.get(verdict.event_id)


        feedback = await self.update(verdict.run_id, decide_on)
        if feedback is None:
            log.info("verdict of step %d is of a checkpoint a rollback discarded: not counted", verdict.step)
            return
        # A decision made before (by a replica that died before sending it) goes out again;
        # its event id is the same, so JetStream stores it once.
        await self.ctx.bus.publish(feedback)
        log.info("feedback for step %d: %s (%s)", feedback.step, feedback.action, feedback.reason)

    @handles(ControlRolledBack)
    async def on_rolled_back(self, ev: ControlRolledBack) -> None:
        """The run went back to a savepoint: its policy forgets the discarded checkpoints' verdicts
        (a patience counted on training that no longer exists would stop the run too early)."""
        requests = [derived_id("eval", saved) for saved in ev.discarded_saves]

        def forget(state: PolicyState):
            rewound = rewind(state, requests)
            return rewound, rewound

        state = await self.update(ev.run_id, forget)
        log.info("rollback to step %d: %d discarded checkpoint(s) forgotten; best %s at step %s, %d evaluation(s) "
                 "since", ev.savepoint_step, len(requests),
                 "-" if state.best_score is None else f"{state.best_score:.3f}", state.best_step, state.since_best)

    async def update(self, run_id: str, change):
        """``change(state) -> (new state, result)`` on the run's state, by compare-and-set: another
        replica may update it meanwhile, and then ``change`` runs again on what it wrote."""
        while True:
            state, revision = await self.load_state(run_id)
            state, result = change(state)
            try:
                await self.save_state(run_id, state, revision)
                return result
            except KeyWrongLastSequenceError:
                continue

    async def load_state(self, run_id: str) -> tuple[PolicyState, int]:
        try:
            entry = await self.kv.get(run_id)
        except KeyNotFoundError:
            return PolicyState(), 0
        return PolicyState.model_validate_json(entry.value), entry.revision

    async def save_state(self, run_id: str, state: PolicyState, revision: int) -> None:
        data = state.model_dump_json().encode()
        if revision:
            await self.kv.update(run_id, data, last=revision)
        else:  # KeyWrongLastSequenceError too when a peer created it meanwhile
            await self.kv.create(run_id, data)


async def main(ctx: ServiceContext) -> None:
    service = RewardService(ctx, await ctx.bus.key_value(subjects.POLICY_BUCKET))
    await ctx.bus.serve(RewardRequest, ctx.run_id, service.on_reward, queue="rl-reward")
    await consume_handlers(ctx.bus, ctx.run_id, service)
    await ctx.stop.wait()


if __name__ == "__main__":
    run_service("rl-reward", main)
